"""Unsupervised segments of any image folder, at the reference setting (480 x 480, 200k pairs).

  python -m data_pipeline.generate --config=configs/data/unsup.py --data-dir DATA \\
      --config.source_dir=/datasets/images
"""
from configs.data import base


def get_config():
  config = base.get_config()
  config.source = 'folder'
  return config
