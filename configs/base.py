"""Training settings shared by every training config: the reference recipe (docs/reference.md §2), stage 1.

Not run directly: `coco.py`, `unsup.py`, `hardmining.py` and `demo.py` start from `get_config()` here.
Derived values (the step count, the decay step) follow the keys they come from, also when those are
overridden on the command line (ml_collections field references).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # -- data: a `segswap_pairs` dataset (python -m data_pipeline.generate) --------------------------------
  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ''             # the --data-dir given to data_pipeline.generate, or the dataset dir
  config.data.source = ''               # which dataset under data_dir (bundled|folder|coco|reference); '' = the only one
  config.data.generate_config = ''      # a configs/data/*.py file: generate the pairs first if missing
  config.data.image_size = 480          # side of the stored pairs (checked against the dataset)
  config.data.num_workers = 0           # grain prefetch processes (0: threads of the training process)
  config.data.num_threads = 8
  config.data.p_style = 0.5             # docs/reference.md §2 augmentation
  config.data.p_tps = 0.5
  config.data.tps_grids = (4, 6)
  config.data.p_pad = 0.5

  # -- model: the reference's small transformer over a frozen MoCo-v2 ResNet-50 ----------------------------
  config.model = ml_collections.ConfigDict()
  config.model.size = 'small'           # tiny | small | base | large
  config.model.block_types = 'I C I C I N'
  config.model.dropout = 0.1
  config.model.drop_feat = 0.1
  config.model.pos_weight = 0.1
  config.model.feat_weight = 1.0
  config.model.backbone = 'resnet50_conv4'   # or small_convnet (trained from scratch: the demo)
  config.model.backbone_widths = (32, 64, 128, 256)  # small_convnet only
  config.model.arch = 'transformer'          # or 'ncnet' (4-D neighbourhood consensus, configs/ncnet_coco.py)
  config.model.ncnet_kernel_sizes = (3, 3, 3)
  config.model.ncnet_channels = (16, 16, 1)
  config.model.ncnet_relocalization = 0      # 2: consensus on the correlation max-pooled by 2
  config.model.ncnet_conv = '4d'             # Conv4d as one 4-D convolution, or '3d' (a sum of 3-D ones)
  # Compute policy (docs/performance.md): bfloat16 matrix products on accelerators (parameters,
  # optimiser state, softmax, norms and losses stay float32); attention_impl 'xla' | 'cudnn' | 'einsum';
  # attention_dropout=False drops the reference's attention-weight dropout (fused kernels have none).
  config.model.compute_dtype = 'float32'
  config.model.attention_impl = 'xla'
  config.model.attention_dropout = True

  # -- initialisation ---------------------------------------------------------------------------------------
  config.backbone_checkpoint = ''       # converted MoCo-v2 (python -m segswap_jax.convert); '' = random
  config.init_checkpoint = ''           # a whole model to start from (official weights, stage 1 for stage 2)
  config.train_backbone = False         # the reference keeps the backbone frozen

  # -- objective --------------------------------------------------------------------------------------------
  config.batch_pos = 5                  # positive pairs per device (the reference's batch)
  config.batch_neg = 15                 # in-batch negatives per device
  config.warp_mask = True
  config.eta_corr = 8.0
  config.corr_cells = 'peak'            # L_corr's cells: the reference's GT-mask maximum, or 'foreground'
  # In-batch negatives whose images show one scene are not negatives (the reference has no scene ids;
  # on COCO such collisions are ~1e-5 of negatives, on an 11-photo collection a quarter).
  config.drop_shared_scene_negatives = True
  config.swap_prob = 0.5

  # -- optimisation -----------------------------------------------------------------------------------------
  config.learning_rate = 2e-4
  config.weight_decay = 0.0
  config.grad_clip_norm = 0.0           # 0 = off (the reference does not clip)
  config.warmup_steps = 1000
  config.steps_per_epoch = 9000
  config.num_epochs = 100               # epoch 0 is the warm-up
  config.num_train_steps = (config.get_ref('warmup_steps')
                           + (config.get_ref('num_epochs') - 1) * config.get_ref('steps_per_epoch'))
  config.lr_decay_epochs = (50,)        # lr x lr_decay_factor after these epochs
  config.lr_decay_factor = 0.05

  # -- accelerator housekeeping (docs/performance.md) ---------------------------------------------------
  config.dropout_rng_impl = 'threefry'  # or 'rbg' / 'unsafe_rbg': cheaper random bits for dropout
  config.prefetch_batches = 2           # batches put on the devices ahead of the step
  config.profile_steps = ()             # (first, last): a jax.profiler trace of these steps in workdir/profile
  config.compilation_cache_dir = ''     # persistent XLA cache; '' = ~/.cache/segswap_jax/xla

  # -- bookkeeping ------------------------------------------------------------------------------------------
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.eval_every_steps = config.get_ref('steps_per_epoch')  # validation at warm-up end, then per epoch
  config.eval_num_pairs = 0             # held-out pairs per validation (0 = the whole validation split)
  config.eval_batch_size = 8            # per device
  config.brueghel_dir = ''              # Brueghel folder: validation mAP picks the best checkpoint
  config.brueghel_batch_size = 32
  config.brueghel_db_size = 640         # the reference's database side and query crop (quick checks: less)
  config.brueghel_box_size = 64         # the reference's query box side
  config.vis_num_pairs = 6              # held-out pairs drawn in predictions.png
  # A resumed run must have the settings it started with; name here the ones it may change (comma-
  # separated, e.g. 'learning_rate,num_epochs'): the change and its step go to config_history.jsonl.
  config.allow_changes = ''

  # -- stage 2 (configs/hardmining.py) ----------------------------------------------------------------------
  config.hard_mining = ml_collections.ConfigDict()
  config.hard_mining.enabled = False
  config.hard_mining.pool_size = 500
  config.hard_mining.round_steps = 100
  config.hard_mining.num_hard = 5       # mined negative pairs per device and step
  config.hard_mining.zero_below = 0.04
  config.hard_mining.min_score = 0.1
  config.hard_mining.batch_size = 64    # pool pairs scored per device batch
  return config
