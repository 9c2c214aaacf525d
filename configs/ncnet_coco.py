"""Stage 1 on COCO segment-swapping pairs with NC-Net as the matcher (the paper's second architecture).

  python -m segswap_jax.train --config=configs/ncnet_coco.py --workdir workdirs/ncnet_coco \\
      --config.data.data_dir=DATA --config.backbone_checkpoint=ckpt/moco \\
      --config.brueghel_dir=/datasets/Brueghel

The data recipe, losses, optimiser and schedule of coco.py; the matcher is NC-Net's NeighConsensus
(Conv4d kernels 3, 3, 3, channels 16, 16, 1) over the correlation of the frozen MoCo-v2 ResNet-50 conv4
features, with a soft-argmax and a small mask head giving the transformer's outputs (docs/training.md
"NC-Net"). `--config.model.ncnet_relocalization=2` runs the consensus on the correlation max-pooled by 2
(16x fewer 4-D cells, matches brought back to the feature grid by the pooling offsets).
"""
from configs import coco


def get_config():
  config = coco.get_config()
  config.model.arch = 'ncnet'
  config.model.ncnet_kernel_sizes = (3, 3, 3)
  config.model.ncnet_channels = (16, 16, 1)
  return config
