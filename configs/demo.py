"""The demo: trains on pairs made from the photographs bundled with scikit-image, on a 2-core CPU.

  python -m segswap_jax.train --config=configs/demo.py --workdir workdirs/demo

Makes the pairs first when missing (configs/data/demo_train.py, into WORKDIR/data), validates on the
held-out pairs, trains for about 12 minutes on 2 cores (13 in all), validates again, prints both, and
writes WORKDIR/predictions.png. No pretrained weights reach the machines this runs on, so instead of the
reference's frozen MoCo-v2 ResNet-50 the demo trains a small stride-16 CNN jointly with the tiny
transformer; measurements behind every choice here are in docs/training.md.
"""
from configs import base


def get_config():
  config = base.get_config()
  config.data.generate_config = 'configs/data/demo_train.py'
  config.data.image_size = 128
  config.data.p_style = 0.0             # the classical styles change appearance too much to learn in minutes
  config.data.num_threads = 2
  config.model.size = 'tiny'
  config.model.dropout = 0.0
  config.model.drop_feat = 0.0
  config.model.pos_weight = 1.0         # localises faster from scratch than the reference's 0.1
  config.corr_cells = 'foreground'      # 8 x 8 masks rarely reach 1: 'peak' would supervise one cell
  config.model.backbone = 'small_convnet'
  config.model.backbone_widths = (16, 32, 64, 128)
  config.train_backbone = True
  config.batch_pos = 8
  config.batch_neg = 4
  config.learning_rate = 1e-3
  config.warmup_steps = 100
  config.steps_per_epoch = 650
  config.num_epochs = 7                 # 100 + 6 x 650 = 4000 steps
  config.lr_decay_epochs = (5,)
  config.lr_decay_factor = 0.1
  config.log_every_steps = 50
  config.checkpoint_every_steps = 600
  config.eval_batch_size = 25
  return config
