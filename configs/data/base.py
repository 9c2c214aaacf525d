"""Pair generation: the reference setting (docs/reference.md §3), shared by the other data configs.

  python -m data_pipeline.generate --config=configs/data/coco.py --data-dir DATA \\
      --config.source_dir=/datasets/coco
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.source = 'coco'              # bundled | folder | coco
  config.source_dir = ''              # image folder, or COCO root (annotations/, train2017/)
  config.image_size = 480             # S: pairs are S x S, ground truth (S/16) x (S/16)
  config.num_pairs = 200_000          # train split (reference: 100k one-object + 100k two-object)
  config.num_validation = 1_000       # held-out pairs for evaluation during training
  config.two_object_fraction = 0.5
  config.poisson_prob = 1.0           # Poisson blending (the reference); else a plain copy-paste
  config.copy_feather = 0.0           # copy-paste alpha edge: Gaussian sigma in pixels (0 = hard edge)
  config.seed = 0
  config.shard_size = 64              # pairs per work shard: the unit of parallelism and of resume
  config.num_workers = 0              # processes; 0 = all CPU cores
  config.jpeg_quality = 90
  config.max_attempts = 200           # draws per pair before giving up (rejections, bad images)
  config.keep_work = False            # keep the work shards after the dataset is written

  config.swap = ml_collections.ConfigDict(dict(
      dilation=20, border_cut_prob=0.2, aspect_min=0.7, max_angle=15.0,
      one_object_scale=(0.2, 1.0), two_object_scale=(0.5, 1.0), num_scales=10, min_mask_cells=9.0,
      max_source_side=640, min_source_side=64))
  config.unsupervised = ml_collections.ConfigDict(dict(
      work_side=256, scales=(250.0, 750.0), sigma=0.8, min_region=0.005, min_area=0.02,
      max_area=0.5, min_solidity=0.6, max_extent=0.95, dedupe_iou=0.8, min_pair_gap=0.12))
  config.coco = ml_collections.ConfigDict(dict(
      split='train2017', min_area=0.01, max_area=0.8, min_box_side=16, exclude_crowd=True))
  config.style = ml_collections.ConfigDict(dict(
      kind='classical',               # classical | adain
      style_dir='',                   # style images (reference: Brueghel); '' = the source's images
      adain_weights='',               # converted AdaIN weights (data_pipeline.adain), for kind=adain
      adain_size=512))                # AdaIN content/style short side, as the reference
  return config
