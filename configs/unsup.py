"""Stage 1 on pairs of unsupervised segments of an image folder (the paper's "unsupervised" variant).

  python -m data_pipeline.generate --config=configs/data/unsup.py --data-dir DATA \\
      --config.source_dir=/datasets/images
  python -m segswap_jax.train --config=configs/unsup.py --workdir workdirs/unsup \\
      --config.data.data_dir=DATA --config.backbone_checkpoint=ckpt/moco

Same recipe as coco.py; only the segment source differs.
"""
from configs import base


def get_config():
  config = base.get_config()
  config.data.source = 'folder'
  return config
