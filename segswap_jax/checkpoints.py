"""Model checkpoints: Orbax-saved parameters plus the model config, verified and loadable with one call.

Layout of a model checkpoint directory:
  model_config.json   {'model': the `model.model_config()` dict, 'metadata': free-form,
                       'digest': {'params', 'backbone', 'matcher'}: digests of the parameters}
  params/             Orbax StandardCheckpointer tree
                      {'backbone': {'params', 'batch_stats'}, MATCHER: {'params'}} (`model.matcher_key`)

The digest (`tree_digest`: BLAKE2b over every array's path, dtype, shape and bytes) is written at save and
checked at load, so a checkpoint whose bytes changed (a corrupted or partly overwritten file) is refused
instead of giving wrong numbers; it is also what every cache and resumable result is keyed on (two
models are the same when their digests are). Parameters must be finite and have the shapes the model
config asks for; each failure is one `CheckpointError` naming the file and the parameter.

Training checkpoints (TrainState + data iterator) belong to `segswap_jax/training/store.py`; the training
loop exports trained models in this layout so every tool (predict, eval, discover) loads the same thing.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from segswap_jax import errors
from segswap_jax import model as model_lib

CONFIG_FILE = 'model_config.json'
PARAMS_DIR = 'params'
DIGEST_SIZE = 16  # bytes of BLAKE2b: 32 hex digits


def tree_digest(tree: Any) -> str:
  """BLAKE2b (32 hex digits) over the paths, dtypes, shapes and bytes of a tree's arrays, in tree order."""
  digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f'{array.dtype}{array.shape}'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def model_digests(params: dict) -> Dict[str, str]:
  """{'params': all of it, 'backbone': the backbone's, 'matcher': the matcher's} digests."""
  matcher = {k: v for k, v in params.items() if k != 'backbone'}
  return {'params': tree_digest(params), 'backbone': tree_digest(params['backbone']),
          'matcher': tree_digest(matcher)}


def model_fingerprint(digests: Dict[str, str], config: ml_collections.ConfigDict) -> str:
  """What determines a model's numbers: its parameters' digest and its config (32 hex digits)."""
  text = json.dumps({'params': digests['params'], 'config': config.to_dict()}, sort_keys=True, default=list)
  return hashlib.blake2b(text.encode(), digest_size=DIGEST_SIZE).hexdigest()


def save_model(directory: str, params: dict, config: ml_collections.ConfigDict,
               metadata: Optional[dict] = None) -> str:
  """Writes `params` and `config` to `directory` (created; must not hold a checkpoint already).

  With several JAX processes every process calls it (Orbax saves collectively).
  """
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, PARAMS_DIR)):
    raise errors.CheckpointError(f'{directory}: already holds a checkpoint; choose a new directory')
  if os.path.isfile(directory) or (os.path.isdir(directory) and os.listdir(directory)):
    raise errors.CheckpointError(f'{directory}: not an empty directory; a checkpoint goes to a new or empty one')
  os.makedirs(directory, exist_ok=True)
  params = jax.tree.map(np.asarray, params)
  check_finite(params, directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS_DIR), params)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:  # several processes save collectively; one writes the config
    stored = {'model': config.to_dict(), 'metadata': metadata or {}, 'digest': model_digests(params)}
    temporary = os.path.join(directory, CONFIG_FILE + '.tmp')
    with open(temporary, 'w') as f:
      json.dump(stored, f, indent=2, sort_keys=True)
    os.replace(temporary, os.path.join(directory, CONFIG_FILE))
  return directory


def _read_stored(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if os.path.isfile(directory):
    raise errors.CheckpointError(f'{directory}: a file, not a checkpoint directory; convert PyTorch .pth files '
                                 'with `python -m segswap_jax.convert`')
  if not os.path.isdir(directory):
    raise errors.CheckpointError(f'{directory}: no such checkpoint directory')
  if not os.path.isfile(path):
    inside = os.path.join(directory, 'model', CONFIG_FILE)
    hint = (f'; it looks like a training workdir: use {os.path.join(directory, "model")} (or best/)'
            if os.path.isfile(inside) else '; convert PyTorch weights with `python -m segswap_jax.convert`')
    raise errors.CheckpointError(f'{directory}: not a segswap-jax checkpoint (no {CONFIG_FILE}){hint}')
  try:
    with open(path) as f:
      stored = json.load(f)
  except (json.JSONDecodeError, TypeError, ValueError, UnicodeDecodeError) as e:
    raise errors.CheckpointError(f'{path}: unreadable model config ({type(e).__name__}: {e})') from e
  if not isinstance(stored, dict) or not isinstance(stored.get('model'), dict):
    if os.path.isfile(os.path.join(directory, 'model', CONFIG_FILE)):
      raise errors.CheckpointError(f'{directory}: a training workdir, not a model checkpoint; use '
                                   f'{os.path.join(directory, "model")} (or best/)')
    raise errors.CheckpointError(f'{path}: not a model config (no "model" entry)')
  return stored


def load_config(directory: str) -> Tuple[ml_collections.ConfigDict, dict]:
  """Reads the model config and metadata of a checkpoint directory."""
  stored = _read_stored(directory)
  path = os.path.join(directory, CONFIG_FILE)
  try:
    model = stored['model']
    config = model_lib.model_config(model['size'], model['block_types'], model.get('arch', 'transformer'))
    config.update(model)
  except (KeyError, TypeError, ValueError) as e:
    raise errors.CheckpointError(f'{path}: unreadable model config ({type(e).__name__}: {e})') from e
  return config, stored.get('metadata', {})


def stored_digests(directory: str) -> Optional[Dict[str, str]]:
  """The digests written with a checkpoint (None for checkpoints written before digests existed)."""
  digests = _read_stored(directory).get('digest')
  return dict(digests) if isinstance(digests, dict) and 'params' in digests else None


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """Shape/dtype tree of the parameters of `config`, without allocating them."""
  return jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))


def check_finite(params: Any, where: str) -> None:
  """CheckpointError naming the first parameter with a NaN or an infinity."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    array = np.asarray(leaf)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
      raise errors.CheckpointError(f'{where}: parameter {jax.tree_util.keystr(path)} holds NaN or infinite values')


def _first_shape_mismatch(target: Any, restored: Any) -> Optional[str]:
  wanted = {jax.tree_util.keystr(p): tuple(l.shape) for p, l in jax.tree_util.tree_flatten_with_path(target)[0]}
  found = {jax.tree_util.keystr(p): tuple(np.shape(l)) for p, l in jax.tree_util.tree_flatten_with_path(restored)[0]}
  for key, shape in wanted.items():
    if key not in found:
      return f'parameter {key} is missing'
    if found[key] != shape:
      return f'parameter {key} has shape {found[key]} in the checkpoint, the model config needs {shape}'
  extra = sorted(set(found) - set(wanted))
  return f'parameter {extra[0]} is not in the model config' if extra else None


def load_model(directory: str) -> Tuple[dict, ml_collections.ConfigDict]:
  """Loads and verifies `(params, config)` from a directory written by `save_model` (or `convert`)."""
  directory = os.path.abspath(directory)
  config, _ = load_config(directory)
  target = abstract_params(config)
  params_path = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(params_path):
    raise errors.CheckpointError(f'{directory}: missing {PARAMS_DIR}/ (incomplete checkpoint)')
  try:
    params = ocp.StandardCheckpointer().restore(params_path, target)
  except Exception as e:  # Orbax raises several types for corrupt or mismatching trees.
    raise errors.CheckpointError(f'{params_path}: unreadable or incomplete parameters, or not those of '
                                 f'{CONFIG_FILE} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})'
                                 ) from e
  params = jax.tree.map(np.asarray, params)
  mismatch = _first_shape_mismatch(target, params)
  if mismatch:
    raise errors.CheckpointError(f'{directory}: {mismatch} ({CONFIG_FILE} and {PARAMS_DIR}/ disagree)')
  check_finite(params, params_path)
  digests = stored_digests(directory)
  if digests is not None and tree_digest(params) != digests['params']:
    raise errors.CheckpointError(f'{params_path}: the parameters do not match the digest written with them '
                                 '(the files are corrupted or were changed); convert or export the model again')
  return params, config


def load_verified(directory: str) -> Tuple[dict, ml_collections.ConfigDict, Dict[str, str]]:
  """`load_model` plus the model's digests (stored ones, or computed for older checkpoints)."""
  params, config = load_model(directory)
  return params, config, stored_digests(directory) or model_digests(params)
