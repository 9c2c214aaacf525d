"""Stage 1 on COCO segment-swapping pairs: the reference recipe (docs/reference.md §2).

  python -m data_pipeline.generate --config=configs/data/coco.py --data-dir DATA \\
      --config.source_dir=/datasets/coco --config.style.style_dir=/datasets/Brueghel/Image
  python -m segswap_jax.convert --torch-checkpoint moco_v2_800ep_pretrain_torchvision.pth.tar --out ckpt/moco
  python -m segswap_jax.train --config=configs/coco.py --workdir workdirs/coco \\
      --config.data.data_dir=DATA --config.backbone_checkpoint=ckpt/moco \\
      --config.brueghel_dir=/datasets/Brueghel

480 x 480 pairs (half one-object, half two-object), small transformer over a frozen MoCo-v2 ResNet-50,
5 positives + 15 in-batch negatives per device, Adam 2e-4, warm-up 1000, 99 epochs of 9000 steps,
lr x0.05 after epoch 50, warped-mask loss, eta 8; best checkpoint by Brueghel validation mAP.
"""
from configs import base


def get_config():
  config = base.get_config()
  config.data.source = 'coco'
  return config
