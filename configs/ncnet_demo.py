"""The demo with NC-Net as the matcher: the same pairs, backbone and wall-time budget as configs/demo.py
(2-core CPU, about 13 minutes).

  python -m segswap_jax.train --config=configs/ncnet_demo.py --workdir workdirs/ncnet_demo

What differs from demo.py is the matcher: NeighConsensus 3, 3 / 16, 1 (the original's InLoc and
Sparse-NCNet layers) over the 8 x 8 x 8 x 8 correlation of the small CNN's features. A step costs about
twice the transformer demo's on this CPU, so the schedule has half the steps (1900); the measurements
against the transformer demo are in docs/training.md ("NC-Net").
"""
from configs import demo


def get_config():
  config = demo.get_config()
  config.model.arch = 'ncnet'
  config.model.ncnet_kernel_sizes = (3, 3)
  config.model.ncnet_channels = (16, 1)
  config.steps_per_epoch = 300
  config.num_epochs = 7                 # 100 + 6 x 300 = 1900 steps
  config.checkpoint_every_steps = 300
  return config
