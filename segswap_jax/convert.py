"""Converts PyTorch checkpoints to a segswap-jax (Orbax) model checkpoint.

  python -m segswap_jax.convert --torch-checkpoint hard_mining_neg5.pth --out checkpoints/segswap_official
  python -m segswap_jax.convert --torch-checkpoint moco_v2_800ep_pretrain.pth.tar --out checkpoints/moco_init
  python -m segswap_jax.convert --torch-checkpoint ncnet_pfpascal.pth.tar --out checkpoints/ncnet_pfpascal
  python -m segswap_jax.convert --random-init --seed 0 --out checkpoints/random [--arch ncnet]

Sources:
  (a) an official SegSwap checkpoint: a dict with `backbone` (state dict of the reference nn.Sequential:
      `0.weight` = conv1, `1.*` = bn1, `4.*`/`5.*`/`6.*` = layer1..3) and `encoder` (keys under `net.`);
      `optimiser`, if present, is ignored.
  (b) a ResNet-50 checkpoint (MoCo-v2 or torchvision) for the backbone only, under `model`, `state_dict`
      or plain; prefixes `module.` and `encoder_q.` are stripped; `fc.*` and `layer4.*` (past conv4) are
      reported as unused. The transformer is then freshly initialised from `--seed`.
  (c) an original NC-Net checkpoint (`ncnet_pfpascal.pth.tar`, `ncnet_ivd.pth.tar`): `state_dict` with
      `FeatureExtraction.model.*` (ResNet-101 to layer3, as an nn.Sequential) and `NeighConsensus.conv.*`,
      and `args` with `ncons_kernel_sizes` / `ncons_channels`: an `arch='ncnet'` model over a
      `resnet101_conv4` backbone. The matcher's parts NC-Net does not have (the soft-argmax temperature
      and the mask head) are initialised from `--seed`.

Every source key is either consumed or reported; a missing key or a shape mismatch is an error naming
the key. PyTorch is needed only to read `.pth` files (`pip install -r requirements-torch.txt`).
"""
from __future__ import annotations

import re
import sys
from typing import Dict, List, Mapping, Sequence, Tuple

import jax
import numpy as np

from segswap_jax import checkpoints
from segswap_jax import cli
from segswap_jax import errors
from segswap_jax import model as model_lib

# Reference nn.Sequential indices -> torchvision module names.
_SEQUENTIAL_TO_TORCHVISION = {'0': 'conv1', '1': 'bn1', '4': 'layer1', '5': 'layer2', '6': 'layer3'}
_BN_LEAVES = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
_IGNORED_BACKBONE = re.compile(r'^(fc\.|layer4\.)|num_batches_tracked$')


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], object]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: Dict[Tuple[str, ...], np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def canonical_backbone_keys(state: Mapping[str, object]) -> Dict[str, np.ndarray]:
  """Any accepted ResNet-50 layout -> torchvision names (`conv1.weight`, `layer3.5.bn3.running_var`)."""
  out = {}
  for key, value in state.items():
    name = key
    for prefix in ('module.', 'encoder_q.', 'backbone.'):
      if name.startswith(prefix):
        name = name[len(prefix):]
    head, _, rest = name.partition('.')
    if head in _SEQUENTIAL_TO_TORCHVISION:
      name = f'{_SEQUENTIAL_TO_TORCHVISION[head]}.{rest}'
    if name in out:
      raise errors.CheckpointError(f'backbone key {key!r} collides with another key after prefix stripping')
    out[name] = _to_numpy(value)
  return out


def _backbone_source_name(path: Tuple[str, ...]) -> str:
  """Our backbone leaf path -> torchvision key, e.g. ('params','layer1_0','downsample_bn','scale')."""
  collection, *modules, leaf = path
  parts = []
  for module in modules:
    match = re.fullmatch(r'(layer\d)_(\d+)', module)
    if match:
      parts += [match.group(1), match.group(2)]
    elif module == 'downsample_conv':
      parts += ['downsample', '0']
    elif module == 'downsample_bn':
      parts += ['downsample', '1']
    else:
      parts.append(module)
  if leaf == 'kernel':
    return '.'.join(parts + ['weight'])
  return '.'.join(parts + [_BN_LEAVES[leaf]])


def _transformer_source_names(path: Tuple[str, ...], block_pairs) -> List[str]:
  """Our transformer leaf path -> reference `net.*` key(s) (two when a block shares one layer)."""
  _, module, *rest = path
  leaf = rest[-1]
  if module in ('feat_proj', 'final_linear'):
    return [f'net.{module}.{"weight" if leaf == "kernel" else "bias"}']
  match = re.fullmatch(r'block(\d+)_(inner|cross)', module)
  if not match:
    raise errors.CheckpointError(f'unexpected transformer parameter {"/".join(path)}')
  block, kind = int(match.group(1)), match.group(2)
  letter = 'I' if kind == 'inner' else 'C'
  sub = rest[0]
  if sub == 'in_proj':
    suffix = 'self_attn.in_proj_weight' if leaf == 'kernel' else 'self_attn.in_proj_bias'
  elif sub == 'out_proj':
    suffix = f'self_attn.out_proj.{"weight" if leaf == "kernel" else "bias"}'
  else:  # linear1, linear2, norm1, norm2
    suffix = f'{sub}.{"bias" if leaf == "bias" else "weight"}'
  return [f'net.encoder_blocks.{block}.layer{pos + 1}.{kind}_encoder_layer.{suffix}'
          for pos, l in enumerate(block_pairs[block]) if l == letter]


def _convert_leaf(source: np.ndarray, target_shape, key: str) -> np.ndarray:
  """PyTorch layout -> Flax layout for one tensor, checking the result's shape."""
  value = np.asarray(source, np.float32)
  if value.ndim == 4 and len(target_shape) == 4:  # conv OIHW -> HWIO
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 4 and len(target_shape) == 2:  # 1x1 conv used as a dense layer
    value = value.reshape(value.shape[:2]).T
  elif value.ndim == 2:  # linear (out, in) -> (in, out)
    value = value.T
  if tuple(value.shape) != tuple(target_shape):
    raise errors.CheckpointError(f'{key}: shape {tuple(source.shape)} does not fit the model '
                          f'(expects {tuple(target_shape)} after layout change)')
  return value


def _fill(target_flat, lookup, source: Dict[str, np.ndarray], label: str) -> Tuple[dict, set]:
  out, used = {}, set()
  for path, target in target_flat.items():
    keys = lookup(path)
    missing = [k for k in keys if k not in source]
    if missing:
      raise errors.CheckpointError(f'{label}: missing key {missing[0]!r} (for {"/".join(path)})')
    values = [source[k] for k in keys]
    for k, v in zip(keys[1:], values[1:]):
      if not np.array_equal(v, values[0]):
        raise errors.CheckpointError(f'{label}: {k!r} should equal the shared layer {keys[0]!r}')
    out[path] = _convert_leaf(values[0], target.shape, keys[0])
    used.update(keys)
  return out, used


def convert_backbone(state: Mapping[str, object], config) -> Tuple[dict, List[str]]:
  """ResNet-50 state dict (any accepted layout) -> `{'params', 'batch_stats'}` + ignored keys."""
  source = canonical_backbone_keys(state)
  abstract = checkpoints.abstract_params(config)['backbone']
  flat, used = _fill(_flatten(abstract), lambda p: [_backbone_source_name(p)], source, 'backbone')
  unused = sorted(set(source) - used)
  unexpected = [k for k in unused if not _IGNORED_BACKBONE.search(k)]
  if unexpected:
    raise errors.CheckpointError(f'backbone: unexpected key {unexpected[0]!r} ({len(unexpected)} unused in all)')
  return _unflatten(flat), unused


def convert_transformer(state: Mapping[str, object], config) -> Tuple[dict, List[str]]:
  """Reference `encoder` state dict (`net.*`) -> `{'params'}` + ignored keys (none are allowed)."""
  source = {k[len('module.'):] if k.startswith('module.') else k: _to_numpy(v) for k, v in state.items()}
  pairs = model_lib.parse_block_types(config.block_types)
  abstract = checkpoints.abstract_params(config)['transformer']
  flat, used = _fill(_flatten(abstract), lambda p: _transformer_source_names(p, pairs), source, 'encoder')
  unused = sorted(set(source) - used)
  if unused:
    raise errors.CheckpointError(f'encoder: unexpected key {unused[0]!r} ({len(unused)} unused in all); '
                          f'wrong --size/--block-types? (model: {config.size}, {config.block_types})')
  return _unflatten(flat), unused


def ncnet_consensus_params(state_dict: Mapping[str, object], kernel_sizes: Sequence[int],
                           channels: Sequence[int], prefix: str = '') -> dict:
  """An original NC-Net `NeighConsensus` state dict -> the parameters of `ncnet.NeighConsensus`.

  Keys `conv.0.weight`, `conv.0.bias`, `conv.2.*`, ... (Conv4d layers at even indices, ReLUs between),
  optionally under `prefix` (e.g. 'NeighConsensus.'); weights in the original's stored, pre-permuted
  layout (k1, out, in, k2, k3, k4), which becomes our (k1, k2, k3, k4, in, out). Every key of the state
  dict under `prefix` must be used, and every layer's shape must fit `kernel_sizes` and `channels`; a
  mismatch is a CheckpointError naming the key.

  Returns:
    `{'conv_0': {'kernel', 'bias'}, 'conv_1': ...}`, as `NeighConsensus(kernel_sizes, channels).apply`
    takes under 'params'.
  """
  source = {k[len(prefix):]: _to_numpy(v) for k, v in state_dict.items() if k.startswith(prefix)}
  if len(kernel_sizes) != len(channels):
    raise errors.CheckpointError(f'kernel_sizes {list(kernel_sizes)} and channels {list(channels)} differ in length')
  params, used = {}, set()
  in_channels = 1
  for layer, (k, out_channels) in enumerate(zip(kernel_sizes, channels)):
    weight_key, bias_key = f'conv.{2 * layer}.weight', f'conv.{2 * layer}.bias'
    for key in (weight_key, bias_key):
      if key not in source:
        raise errors.CheckpointError(f'NeighConsensus: missing key {prefix + key!r} (layer {layer} of '
                                     f'kernel_sizes {list(kernel_sizes)})')
    weight, bias = source[weight_key], source[bias_key]
    expected = (k, out_channels, in_channels, k, k, k)
    if tuple(weight.shape) != expected:
      raise errors.CheckpointError(
          f'NeighConsensus: {prefix + weight_key} has shape {tuple(weight.shape)}, expected {expected} for '
          f'kernel_sizes {list(kernel_sizes)} and channels {list(channels)} (stored layout (k1, out, in, k2, k3, k4))')
    if tuple(bias.shape) != (out_channels,):
      raise errors.CheckpointError(f'NeighConsensus: {prefix + bias_key} has shape {tuple(bias.shape)}, '
                                   f'expected ({out_channels},)')
    params[f'conv_{layer}'] = {'kernel': np.ascontiguousarray(weight.transpose(0, 3, 4, 5, 2, 1), np.float32),
                               'bias': np.asarray(bias, np.float32)}
    used.update((weight_key, bias_key))
    in_channels = out_channels
  unused = sorted(set(source) - used)
  if unused:
    raise errors.CheckpointError(f'NeighConsensus: unexpected key {prefix + unused[0]!r} ({len(unused)} unused '
                                 f'in all): more layers than kernel_sizes {list(kernel_sizes)}?')
  return params


NCNET_BACKBONE_PREFIX = 'FeatureExtraction.model.'
NCNET_CONSENSUS_PREFIX = 'NeighConsensus.'


def is_ncnet_checkpoint(checkpoint: Mapping[str, object]) -> bool:
  state = checkpoint.get('state_dict')
  return isinstance(state, Mapping) and any(str(k).startswith(NCNET_CONSENSUS_PREFIX) for k in state)


def ncnet_args(checkpoint: Mapping[str, object]) -> Tuple[Sequence[int], Sequence[int]]:
  """(kernel sizes, channels) of an original NC-Net checkpoint's NeighConsensus, from its stored args."""
  args = checkpoint.get('args')
  kernel_sizes = getattr(args, 'ncons_kernel_sizes', None) if args is not None else None
  channels = getattr(args, 'ncons_channels', None) if args is not None else None
  if kernel_sizes is None or channels is None:
    raise errors.CheckpointError('NC-Net checkpoint without args.ncons_kernel_sizes / ncons_channels: give '
                                 '--ncnet-kernel-sizes and --ncnet-channels')
  return tuple(int(k) for k in kernel_sizes), tuple(int(c) for c in channels)


def ncnet_model_config(kernel_sizes: Sequence[int], channels: Sequence[int], relocalization: int = 0):
  """The model config of a converted original NC-Net: ResNet-101 conv4 + NC-Net matcher."""
  config = model_lib.model_config('small', arch='ncnet')
  config.backbone = 'resnet101_conv4'
  config.ncnet_kernel_sizes = tuple(kernel_sizes)
  config.ncnet_channels = tuple(channels)
  config.ncnet_relocalization = relocalization
  return config


def convert_ncnet(checkpoint: Mapping[str, object], config, seed: int = 0) -> Tuple[dict, dict]:
  """An original NC-Net checkpoint -> (params, report) for `config` (arch 'ncnet'). Every key of its
  state dict is used (BatchNorm `num_batches_tracked` aside) or the conversion fails naming it."""
  state = {str(k).replace('vgg', 'model'): v for k, v in checkpoint['state_dict'].items()}  # as the original
  stray = sorted(k for k in state if not k.startswith((NCNET_BACKBONE_PREFIX, NCNET_CONSENSUS_PREFIX)))
  if stray:
    raise errors.CheckpointError(f'NC-Net state_dict: unexpected key {stray[0]!r} ({len(stray)} unused in all)')
  backbone_state = {k[len(NCNET_BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(NCNET_BACKBONE_PREFIX)}
  backbone, ignored = convert_backbone(backbone_state, config)
  consensus = ncnet_consensus_params(state, config.ncnet_kernel_sizes, config.ncnet_channels,
                                     prefix=NCNET_CONSENSUS_PREFIX)
  matcher = jax.tree.map(np.asarray, model_lib.init_params(config, jax.random.key(seed))['ncnet'])
  matcher['params']['consensus'] = consensus
  report = {'kind': 'ncnet', 'ignored_keys': [NCNET_BACKBONE_PREFIX + k for k in ignored]
            + sorted(k for k in checkpoint if k not in ('state_dict', 'args')),
            'ncnet': f'consensus kernel sizes {list(config.ncnet_kernel_sizes)}, channels '
                     f'{list(config.ncnet_channels)}; mask head and temperature: random init, seed {seed}'}
  return {'backbone': backbone, 'ncnet': matcher}, report


def convert_state(checkpoint: Mapping[str, object], config, seed: int = 0) -> Tuple[dict, dict]:
  """A loaded PyTorch checkpoint dict -> (params, report). Detects the official SegSwap, NC-Net and
  backbone-only kinds (for NC-Net, `config` must be an 'ncnet' config: `ncnet_model_config`)."""
  if is_ncnet_checkpoint(checkpoint):
    if model_lib.matcher_key(config) != 'ncnet':
      raise errors.CheckpointError('an NC-Net checkpoint needs an arch=ncnet model config')
    return convert_ncnet(checkpoint, config, seed)
  report = {'ignored_keys': []}
  if 'backbone' in checkpoint and 'encoder' in checkpoint:
    backbone, ignored = convert_backbone(checkpoint['backbone'], config)
    transformer, _ = convert_transformer(checkpoint['encoder'], config)
    report['kind'] = 'segswap'
    report['ignored_keys'] = ignored + sorted(k for k in checkpoint if k not in ('backbone', 'encoder'))
    return {'backbone': backbone, 'transformer': transformer}, report
  state = checkpoint
  for container in ('model', 'state_dict'):
    if container in state and isinstance(state[container], Mapping):
      report['ignored_keys'] += sorted(k for k in state if k != container)
      state = state[container]
      break
  if not any(k.endswith('conv1.weight') or k == '0.weight' for k in state):
    raise errors.CheckpointError('not a SegSwap (backbone + encoder), NC-Net nor ResNet checkpoint: '
                                 f'top-level keys {sorted(checkpoint)[:6]}')
  backbone, ignored = convert_backbone(state, config)
  key = model_lib.matcher_key(config)
  matcher = model_lib.init_params(config, jax.random.key(seed))[key]
  report['kind'] = config.backbone.split('_')[0]   # resnet50 or resnet101
  report['ignored_keys'] += ignored
  report[key] = f'random init, seed {seed}'
  return {'backbone': backbone, key: jax.tree.map(np.asarray, matcher)}, report


def read_torch_checkpoint(path: str) -> Mapping[str, object]:
  """Reads a `.pth` / `.pth.tar` with PyTorch (imported lazily: an optional extra)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.CheckpointError('reading .pth files needs PyTorch: pip install -r requirements-torch.txt') from e
  import argparse  # the original NC-Net checkpoints store their training args as a Namespace
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location='cpu', weights_only=True)
  except FileNotFoundError as e:
    raise errors.CheckpointError(f'{path}: no such file') from e
  except Exception as e:  # pickle, zip and torch errors alike: not a readable checkpoint.
    raise errors.CheckpointError(f'{path}: not a readable PyTorch checkpoint ({type(e).__name__})') from e


def convert_file(path: str, out_dir: str, config, seed: int = 0,
                 ncnet_layers: Tuple[Sequence[int], Sequence[int]] = (None, None)) -> dict:
  """Converts one `.pth` file into a model checkpoint in `out_dir`; returns the report.

  For an NC-Net checkpoint the model config comes from its stored args; `ncnet_layers` = (kernel sizes,
  channels) given by the user must agree with them (or stand in when the file has none).
  """
  checkpoint = read_torch_checkpoint(path)
  if not isinstance(checkpoint, Mapping):
    raise errors.CheckpointError(f'{path}: expected a dict of tensors, got {type(checkpoint).__name__}')
  if is_ncnet_checkpoint(checkpoint):
    given = tuple(None if v is None else tuple(v) for v in ncnet_layers)
    try:
      stored = ncnet_args(checkpoint)
    except errors.CheckpointError:
      if None in given:
        raise
      stored = given
    for name, mine, theirs in (('--ncnet-kernel-sizes', given[0], stored[0]), ('--ncnet-channels', given[1], stored[1])):
      if mine is not None and mine != theirs:
        raise errors.CheckpointError(f'{path}: {name} {list(mine)} does not match the checkpoint\'s {list(theirs)}')
    config = ncnet_model_config(*stored, relocalization=config.ncnet_relocalization)
  params, report = convert_state(checkpoint, config, seed)
  report['source'] = path
  checkpoints.save_model(out_dir, params, config, metadata={'converted_from': report})
  return report


@cli.command
def main(argv=None) -> int:
  parser = cli.parser('python -m segswap_jax.convert', __doc__,
                      example='python -m segswap_jax.convert --torch-checkpoint hard_mining_neg5.pth '
                              '--out checkpoints/segswap_official')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--torch-checkpoint', help='.pth / .pth.tar file')
  source.add_argument('--random-init', action='store_true',
                      help='no source: random weights from --seed (for trying the tools end to end)')
  cli.add_out(parser, 'output checkpoint directory (must not exist or be empty)', required=True, kind='dir')
  parser.add_argument('--arch', default='transformer', choices=model_lib.ARCHS,
                      help='matcher of --random-init models (converted files say their own)')
  parser.add_argument('--size', default='small', choices=sorted(model_lib.TRANSFORMER_SIZES))
  parser.add_argument('--block-types', default=None, help="e.g. 'I C I C I N' (default for the size)")
  parser.add_argument('--backbone', default='resnet50_conv4', choices=[b for b in model_lib.BACKBONES
                                                                       if b != 'small_convnet'],
                      help='backbone of --random-init and ResNet sources (NC-Net files: resnet101_conv4)')
  parser.add_argument('--ncnet-kernel-sizes', type=cli.positive_int, nargs='+', default=None,
                      help='NC-Net consensus kernel sizes (checked against an NC-Net file\'s stored args)')
  parser.add_argument('--ncnet-channels', type=cli.positive_int, nargs='+', default=None,
                      help='NC-Net consensus channels (checked against an NC-Net file\'s stored args)')
  parser.add_argument('--ncnet-relocalization', type=int, choices=(0, 2), default=0,
                      help='NC-Net models: consensus on the correlation max-pooled by 2 (default 0: off)')
  parser.add_argument('--seed', type=int, default=0, help='init of the parts a source does not hold')
  args = parser.parse_args(argv)
  config = model_lib.model_config(args.size, args.block_types, args.arch)
  config.backbone = args.backbone
  config.ncnet_relocalization = args.ncnet_relocalization
  if args.ncnet_kernel_sizes:
    config.ncnet_kernel_sizes = tuple(args.ncnet_kernel_sizes)
  if args.ncnet_channels:
    config.ncnet_channels = tuple(args.ncnet_channels)
  if args.random_init:
    params = jax.tree.map(np.asarray, model_lib.init_params(config, jax.random.key(args.seed)))
    checkpoints.save_model(args.out, params, config, metadata={'random_init_seed': args.seed})
    print(f'wrote randomly initialised {config.arch} model (seed {args.seed}) -> {args.out}')
    return 0
  report = convert_file(args.torch_checkpoint, args.out, config, args.seed,
                        (args.ncnet_kernel_sizes, args.ncnet_channels))
  print(f'converted {report["kind"]} checkpoint {args.torch_checkpoint} -> {args.out}')
  if report['ignored_keys']:
    shown = ', '.join(report['ignored_keys'][:8])
    more = len(report['ignored_keys']) - 8
    print(f'unused source keys ({len(report["ignored_keys"])}): {shown}{f", ... +{more}" if more > 0 else ""}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
