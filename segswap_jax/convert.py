"""Converts PyTorch checkpoints to a segswap-jax (Orbax) model checkpoint.

  python -m segswap_jax.convert --torch-checkpoint hard_mining_neg5.pth --out checkpoints/segswap_official
  python -m segswap_jax.convert --torch-checkpoint moco_v2_800ep_pretrain.pth.tar --out checkpoints/moco_init
  python -m segswap_jax.convert --random-init --seed 0 --out checkpoints/random

Sources:
  (a) an official SegSwap checkpoint: a dict with `backbone` (state dict of the reference nn.Sequential:
      `0.weight` = conv1, `1.*` = bn1, `4.*`/`5.*`/`6.*` = layer1..3) and `encoder` (keys under `net.`);
      `optimiser`, if present, is ignored.
  (b) a ResNet-50 checkpoint (MoCo-v2 or torchvision) for the backbone only, under `model`, `state_dict`
      or plain; prefixes `module.` and `encoder_q.` are stripped; `fc.*` and `layer4.*` (past conv4) are
      reported as unused. The transformer is then freshly initialised from `--seed`.

Every source key is either consumed or reported; a missing key or a shape mismatch is an error naming
the key. PyTorch is needed only to read `.pth` files (`pip install -r requirements-torch.txt`).
"""
from __future__ import annotations

import re
import sys
from typing import Dict, List, Mapping, Tuple

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


def convert_state(checkpoint: Mapping[str, object], config, seed: int = 0) -> Tuple[dict, dict]:
  """A loaded PyTorch checkpoint dict -> (params, report). Detects the official vs backbone-only kind."""
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
    raise errors.CheckpointError('not a SegSwap (backbone + encoder) nor a ResNet-50 checkpoint: '
                          f'top-level keys {sorted(checkpoint)[:6]}')
  backbone, ignored = convert_backbone(state, config)
  transformer = model_lib.init_params(config, jax.random.key(seed))['transformer']
  report['kind'] = 'resnet50'
  report['ignored_keys'] += ignored
  report['transformer'] = f'random init, seed {seed}'
  return {'backbone': backbone, 'transformer': jax.tree.map(np.asarray, transformer)}, report


def read_torch_checkpoint(path: str) -> Mapping[str, object]:
  """Reads a `.pth` / `.pth.tar` with PyTorch (imported lazily: an optional extra)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.CheckpointError('reading .pth files needs PyTorch: pip install -r requirements-torch.txt') from e
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except FileNotFoundError as e:
    raise errors.CheckpointError(f'{path}: no such file') from e
  except Exception as e:  # pickle, zip and torch errors alike: not a readable checkpoint.
    raise errors.CheckpointError(f'{path}: not a readable PyTorch checkpoint ({type(e).__name__})') from e


def convert_file(path: str, out_dir: str, config, seed: int = 0) -> dict:
  checkpoint = read_torch_checkpoint(path)
  if not isinstance(checkpoint, Mapping):
    raise errors.CheckpointError(f'{path}: expected a dict of tensors, got {type(checkpoint).__name__}')
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
  cli.add_out(parser, 'output checkpoint directory (must not exist or be empty)', required=True)
  parser.add_argument('--size', default='small', choices=sorted(model_lib.TRANSFORMER_SIZES))
  parser.add_argument('--block-types', default=None, help="e.g. 'I C I C I N' (default for the size)")
  parser.add_argument('--seed', type=int, default=0, help='transformer init for backbone-only sources')
  args = parser.parse_args(argv)
  config = model_lib.model_config(args.size, args.block_types)
  if args.random_init:
    params = jax.tree.map(np.asarray, model_lib.init_params(config, jax.random.key(args.seed)))
    checkpoints.save_model(args.out, params, config, metadata={'random_init_seed': args.seed})
    print(f'wrote randomly initialised {config.size} model (seed {args.seed}) -> {args.out}')
    return 0
  report = convert_file(args.torch_checkpoint, args.out, config, args.seed)
  print(f'converted {report["kind"]} checkpoint {args.torch_checkpoint} -> {args.out}')
  if report['ignored_keys']:
    shown = ', '.join(report['ignored_keys'][:8])
    more = len(report['ignored_keys']) - 8
    print(f'unused source keys ({len(report["ignored_keys"])}): {shown}{f", ... +{more}" if more > 0 else ""}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
