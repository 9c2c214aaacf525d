"""From a training config (configs/*.py) to what the loop needs: the model config, checks, step settings.

Config files are Python files with `get_config()`; a path that does not exist as given is looked up
in the installed `configs` package too, so `--config=configs/demo.py` works from any directory.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from segswap_jax import cli
from segswap_jax import errors
from segswap_jax import losses
from segswap_jax import model as model_lib


def build_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model config (`model.model_config`) described by a training config's `model` block."""
  spec = config.model
  try:
    model_config = model_lib.model_config(spec.size, spec.block_types or None, spec.get('arch', 'transformer'))
  except errors.ConfigError as e:
    raise errors.ConfigError(f'config.model: {e}') from e
  for key in ('dropout', 'drop_feat', 'pos_weight', 'feat_weight', 'backbone', 'compute_dtype', 'attention_impl',
              'attention_dropout'):
    model_config[key] = spec[key]
  model_config.backbone_widths = tuple(int(w) for w in spec.backbone_widths)
  if spec.backbone == 'small_convnet':
    model_config.feature_dim = model_config.backbone_widths[-1]
  elif spec.backbone not in model_lib.BACKBONES:
    raise errors.ConfigError(f'config.model.backbone: unknown backbone {spec.backbone!r} '
                             f'(expected one of {model_lib.BACKBONES})')
  if model_config.arch == 'ncnet':
    kernel_sizes = tuple(int(k) for k in spec.ncnet_kernel_sizes)
    channels = tuple(int(c) for c in spec.ncnet_channels)
    if len(kernel_sizes) != len(channels) or not kernel_sizes or channels[-1] != 1 or any(k % 2 == 0 for k in kernel_sizes):
      raise errors.ConfigError(f'config.model.ncnet_kernel_sizes={list(kernel_sizes)} / ncnet_channels='
                               f'{list(channels)}: one odd kernel size per layer, and 1 channel in the last layer')
    if spec.ncnet_relocalization not in (0, 2):
      raise errors.ConfigError(f'config.model.ncnet_relocalization must be 0 or 2, got {spec.ncnet_relocalization}')
    model_config.ncnet_kernel_sizes, model_config.ncnet_channels = kernel_sizes, channels
    model_config.ncnet_relocalization = int(spec.ncnet_relocalization)
    model_config.ncnet_conv = spec.ncnet_conv
  return model_config


# Every value a training config holds, and what it may be (`cli.check_config_values`).
RULES = {
    'seed': 'count0', 'batch_pos': 'count', 'batch_neg': 'count0', 'warmup_steps': 'count0',
    'steps_per_epoch': 'count', 'num_epochs': 'count', 'learning_rate': 'positive', 'weight_decay': 'nonneg',
    'grad_clip_norm': 'nonneg', 'lr_decay_factor': 'positive', 'lr_decay_epochs': 'counts>=0',
    'eta_corr': 'nonneg', 'swap_prob': 'fraction', 'corr_cells': 'in:peak|foreground',
    'log_every_steps': 'count', 'checkpoint_every_steps': 'count', 'keep_checkpoints': 'count',
    'eval_every_steps': 'count0', 'eval_num_pairs': 'count0', 'eval_batch_size': 'count',
    'brueghel_batch_size': 'count', 'brueghel_db_size': 'size16', 'brueghel_box_size': 'count',
    'vis_num_pairs': 'count0',
    'data.image_size': 'size16', 'data.num_workers': 'count0', 'data.num_threads': 'count',
    'data.p_style': 'fraction', 'data.p_tps': 'fraction', 'data.p_pad': 'fraction', 'data.tps_grids': 'counts>=2',
    'model.dropout': 'rate', 'model.drop_feat': 'rate', 'model.pos_weight': 'nonneg', 'model.feat_weight': 'nonneg',
    'model.backbone_widths': 'counts>=1', 'model.arch': 'in:transformer|ncnet',
    'model.ncnet_relocalization': 'count0', 'model.ncnet_conv': 'in:4d|3d',
    'model.compute_dtype': 'in:float32|bfloat16', 'model.attention_impl': 'in:xla|cudnn|einsum',
    'dropout_rng_impl': 'in:threefry|rbg|unsafe_rbg', 'prefetch_batches': 'count0', 'profile_steps': 'counts>=0',
    'hard_mining.pool_size': 'count', 'hard_mining.round_steps': 'count', 'hard_mining.num_hard': 'count',
    'hard_mining.zero_below': 'nonneg', 'hard_mining.min_score': 'nonneg', 'hard_mining.batch_size': 'count',
}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses settings the loop cannot run with, naming the key (all of them, before the first step)."""
  cli.check_config_values(config, RULES)
  if config.batch_pos < 1:
    raise errors.ConfigError(f'config.batch_pos must be >= 1, got {config.batch_pos}')
  if config.batch_neg > config.batch_pos * (config.batch_pos - 1) or config.batch_neg < 0:
    raise errors.ConfigError(f'config.batch_neg={config.batch_neg}: {config.batch_pos} positives give 0 to '
                             f'{config.batch_pos * (config.batch_pos - 1)} in-batch negatives')
  if config.num_train_steps < 1:
    raise errors.ConfigError(f'config.num_train_steps must be >= 1, got {config.num_train_steps}')
  if config.corr_cells not in losses.CORR_CELLS:
    raise errors.ConfigError(f'config.corr_cells must be one of {losses.CORR_CELLS}, got {config.corr_cells!r}')
  profile = tuple(config.get('profile_steps', ()))
  if profile and (len(profile) != 2 or profile[0] > profile[1]):
    raise errors.ConfigError(f'config.profile_steps={profile}: expected (first, last) with first <= last, or ()')
  if config.hard_mining.enabled and config.train_backbone:
    raise errors.ConfigError('hard mining keeps mined features across a round: it needs a frozen backbone '
                             '(config.train_backbone=False)')
  if config.hard_mining.enabled and config.hard_mining.pool_size < 2:
    raise errors.ConfigError(f'config.hard_mining.pool_size={config.hard_mining.pool_size}: a pool needs at least 2 '
                             'images')


def training_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The flat settings the train step reads, with the decay epochs turned into steps."""
  settings = ml_collections.ConfigDict({
      key: config[key] for key in ('seed', 'dropout_rng_impl', 'batch_pos', 'batch_neg', 'warp_mask', 'eta_corr', 'corr_cells',
                                   'drop_shared_scene_negatives',
                                   'swap_prob', 'train_backbone', 'learning_rate', 'weight_decay',
                                   'grad_clip_norm', 'warmup_steps')})
  settings.lr_decay_steps = tuple(config.warmup_steps + int(e) * config.steps_per_epoch
                                  for e in config.lr_decay_epochs)
  settings.lr_decay_factor = config.lr_decay_factor
  return settings


def load_config_file(path: str, what: str = 'config.data.generate_config') -> ml_collections.ConfigDict:
  """`get_config()` of a config file (the data configs a training config names)."""
  resolved = cli.resolve_config_path(path)
  if not os.path.isfile(resolved):
    raise errors.ConfigError(f'{what}: no such file {path}')
  spec = importlib.util.spec_from_file_location('segswap_config_file', resolved)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def config_differences(found: dict, expected: dict, ignore=()) -> list:
  """The keys whose values differ between two config dicts (tuples and lists compare equal)."""
  normalise = lambda v: list(v) if isinstance(v, tuple) else v
  keys = (set(found) | set(expected)) - set(ignore)
  return sorted(k for k in keys if normalise(found.get(k)) != normalise(expected.get(k)))
