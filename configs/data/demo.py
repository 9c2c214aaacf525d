"""Demo pairs from the photographs bundled with scikit-image: no download, a few minutes on 2 cores.

  python -m data_pipeline.generate --config=configs/data/demo.py --data-dir /tmp/segswap_data

256 x 256 pairs (16 x 16 cells), 1000 train + 100 validation, classical stylisation. At this size
the reference's 9-cell minimum (1% of a 30 x 30 map) would reject most small objects, so pairs need
4 cells (1.6% of 16 x 16); two-object segments must be 20% of the image apart (their dilated margins
otherwise meet at 16-px cell resolution).
"""
from configs.data import base


def get_config():
  config = base.get_config()
  config.source = 'bundled'
  config.image_size = 256
  config.swap.min_mask_cells = 4.0
  config.unsupervised.min_pair_gap = 0.2
  config.num_pairs = 1000
  config.num_validation = 100
  config.shard_size = 25
  return config
