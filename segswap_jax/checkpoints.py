"""Model checkpoints: Orbax-saved parameters plus the model config, loadable with one call.

Layout of a model checkpoint directory:
  model_config.json   the `model.model_config()` dict (and free-form `metadata`)
  params/             Orbax StandardCheckpointer tree
                      {'backbone': {'params', 'batch_stats'}, 'transformer': {'params'}}

Training checkpoints (TrainState + data iterator) belong to `segswap_jax/training/store.py`; `export` of a trained
model writes this layout so every tool (predict, eval, discover) loads the same thing.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from segswap_jax import errors
from segswap_jax import model as model_lib

CONFIG_FILE = 'model_config.json'
PARAMS_DIR = 'params'


def save_model(directory: str, params: dict, config: ml_collections.ConfigDict,
               metadata: Optional[dict] = None) -> str:
  """Writes `params` and `config` to `directory` (created; must not hold a checkpoint already).

  With several JAX processes every process calls it (Orbax saves collectively).
  """
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, PARAMS_DIR)):
    raise errors.CheckpointError(f'{directory}: already holds a checkpoint; choose a new directory')
  os.makedirs(directory, exist_ok=True)
  params = jax.tree.map(np.asarray, params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, PARAMS_DIR), params)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:  # several processes save collectively; one writes the config
    with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
      json.dump({'model': config.to_dict(), 'metadata': metadata or {}}, f, indent=2, sort_keys=True)
  return directory


def load_config(directory: str) -> Tuple[ml_collections.ConfigDict, dict]:
  """Reads the model config and metadata of a checkpoint directory."""
  path = os.path.join(directory, CONFIG_FILE)
  if os.path.isfile(directory):
    raise errors.CheckpointError(f'{directory}: a file, not a checkpoint directory; convert PyTorch .pth files '
                          'with `python -m segswap_jax.convert`')
  if not os.path.isdir(directory):
    raise errors.CheckpointError(f'{directory}: no such checkpoint directory')
  if not os.path.isfile(path):
    raise errors.CheckpointError(f'{directory}: not a segswap-jax checkpoint (no {CONFIG_FILE}); '
                          'convert PyTorch weights with `python -m segswap_jax.convert`')
  try:
    with open(path) as f:
      stored = json.load(f)
    config = model_lib.model_config(stored['model']['size'], stored['model']['block_types'],
                                    stored['model'].get('arch', 'transformer'))
    config.update(stored['model'])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise errors.CheckpointError(f'{path}: unreadable model config ({e})') from e
  return config, stored.get('metadata', {})


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """Shape/dtype tree of the parameters of `config`, without allocating them."""
  return jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))


def load_model(directory: str) -> Tuple[dict, ml_collections.ConfigDict]:
  """Loads `(params, config)` from a directory written by `save_model` (or `convert`)."""
  directory = os.path.abspath(directory)
  config, _ = load_config(directory)
  target = abstract_params(config)
  params_path = os.path.join(directory, PARAMS_DIR)
  if not os.path.isdir(params_path):
    raise errors.CheckpointError(f'{directory}: missing {PARAMS_DIR}/ (incomplete checkpoint)')
  try:
    params = ocp.StandardCheckpointer().restore(params_path, target)
  except Exception as e:  # Orbax raises several types for corrupt or mismatching trees.
    raise errors.CheckpointError(f'{params_path}: cannot restore parameters for this model config '
                          f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from e
  return params, config
