"""The demo: trains on pairs made from the photographs bundled with scikit-image, on a 2-core CPU.

  python -m segswap_jax.train --config=configs/demo.py --workdir workdirs/demo

Builds the pairs first when missing (configs/data/demo.py into WORKDIR/data), trains, validates on the
held-out pairs before and after, prints both, and writes WORKDIR/predictions.png.
No pretrained weights reach the machines this runs on, so the demo trains a small stride-16 CNN jointly
with a tiny transformer instead of the frozen MoCo-v2 ResNet-50 of the reference recipe (measurements
behind this choice: docs/training.md).
"""
from configs import base


def get_config():
  config = base.get_config()
  config.data.generate_config = 'configs/data/demo.py'
  config.data.image_size = 256
  config.model.size = 'tiny'
  config.model.block_types = 'I C'
  config.model.dropout = 0.0
  config.model.drop_feat = 0.0
  config.model.backbone = 'small_convnet'
  config.model.backbone_widths = (16, 32, 64, 128)
  config.train_backbone = True
  config.batch_pos = 4
  config.batch_neg = 4
  config.learning_rate = 1e-3
  config.warmup_steps = 100
  config.steps_per_epoch = 500
  config.num_epochs = 5
  config.lr_decay_epochs = ()
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return config
