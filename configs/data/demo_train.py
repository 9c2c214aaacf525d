"""The pairs the training demo learns from on a 2-core CPU: the bundled photographs at 128 x 128.

  python -m data_pipeline.generate --config=configs/data/demo_train.py --data-dir /tmp/segswap_demo

`python -m segswap_jax.train --config=configs/demo.py` makes them itself (about 40 s on 2 cores).
Smaller and easier than configs/data/demo.py, so that a model trained from scratch learns something
visible in minutes (docs/training.md): 128 px (8 x 8 cells), one-object pairs only, objects filling
50-100% of the background's side, rotations within 5 degrees, at least 6 mask cells, copy-pasted with a
feathered edge rather than Poisson-blended; 2000 + 100 pairs.
"""
from configs.data import demo


def get_config():
  config = demo.get_config()
  config.image_size = 128
  config.num_pairs = 2000
  config.num_validation = 100
  config.two_object_fraction = 0.0
  config.poisson_prob = 0.0           # copy-paste (the paper's baseline blending): a model trained from
                                      # scratch needs far longer for Poisson-tinted objects (docs/training.md)
  config.copy_feather = 2.0           # ... with a soft edge: a hard one is a shortcut the masks learn
  config.swap.one_object_scale = (0.5, 1.0)
  config.swap.max_angle = 5.0
  config.swap.min_mask_cells = 6.0
  config.shard_size = 100
  return config
