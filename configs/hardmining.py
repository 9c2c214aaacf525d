"""Stage 2: hard-negative mining from a stage-1 model (how the released `hard_mining_neg5` was made).

  python -m segswap_jax.train --config=configs/hardmining.py --workdir workdirs/hardmining \\
      --config.data.data_dir=DATA --config.init_checkpoint=workdirs/coco/best \\
      --config.brueghel_dir=/datasets/Brueghel

lr 1e-5 without warm-up. Every round of `hard_mining.round_steps` steps the miner (segswap_jax/
hard_mining.py) draws a pool of `pool_size` augmented training images, scores every pool pair with the
current model (mean mask of both sides), and each step adds `num_hard` pool pairs per device, drawn in
proportion to their score, as extra negatives beside the 15 in-batch ones. 49 rounds of 100 steps
match the reference's about 49 epochs of at most 100 iterations.
"""
from configs import base


def get_config():
  config = base.get_config()
  config.data.source = 'coco'
  config.learning_rate = 1e-5
  config.warmup_steps = 0
  config.steps_per_epoch = 100
  config.num_epochs = 50
  config.lr_decay_epochs = ()
  config.checkpoint_every_steps = 100
  config.hard_mining.enabled = True
  return config
