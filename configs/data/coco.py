"""COCO instances at the reference setting: 480 x 480, 200k pairs (half one-object, half two-object).

  python -m data_pipeline.generate --config=configs/data/coco.py --data-dir DATA \\
      --config.source_dir=/datasets/coco --config.style.style_dir=/datasets/Brueghel/Image
"""
from configs.data import base


def get_config():
  config = base.get_config()
  config.source = 'coco'
  return config
