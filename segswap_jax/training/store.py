"""What a training run keeps in its workdir: Orbax checkpoints of the train state and the data
iterators, exported model checkpoints, and the configs of the run.

  WORKDIR/checkpoints/STEP/   the train state and every process's data-iterator state (the last K kept)
  WORKDIR/model/, best/       model checkpoints (`segswap_jax.checkpoints` layout) every tool loads
  WORKDIR/config.json, model_config.json
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax

from segswap_jax import checkpoints
from segswap_jax import errors
from segswap_jax import multihost
from segswap_jax.training import config as config_lib
from segswap_jax.training import step as step_lib


class CheckpointStore:
  """Orbax CheckpointManager of the train state and the data iterators (one state file per process)."""

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.manager = ocp.CheckpointManager(
        directory, item_names=('state', 'data'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, host_state, data_iterator) -> None:
    import grain
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(host_state), data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=True)

  def restore(self, step: int, host_state_target, data_iterator):
    import grain
    ocp = self._ocp
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(host_state_target),
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:  # Orbax raises several types for trees that do not match
      first = str(e).splitlines()[0] if str(e) else ''
      raise errors.CheckpointError(f'cannot restore checkpoint step {step} of {self.manager.directory}: '
                                   f'{type(e).__name__}: {first}') from e
    return restored.state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def export_model(directory: str, trainable, frozen, model_config, metadata: dict) -> None:
  """Writes a model checkpoint from host trees, replacing an older one. Collective: every process calls
  it (Orbax synchronises its writers); process 0 writes the files."""
  temporary = directory + '.tmp'
  if jax.process_index() == 0:
    shutil.rmtree(temporary, ignore_errors=True)
  multihost.barrier(f'export_start:{directory}')
  checkpoints.save_model(temporary, step_lib.merge_params(trainable, frozen), model_config, metadata)
  multihost.barrier(f'export_written:{directory}')
  if jax.process_index() == 0:
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(temporary, directory)
  multihost.barrier(f'export_done:{directory}')


def check_workdir(workdir: str, model_config, config) -> None:
  """A workdir that holds a run must hold one of the same model (read-only: nothing is written)."""
  path = os.path.join(workdir, 'model_config.json')
  if not os.path.isfile(path):
    return
  with open(path) as f:
    found = json.load(f)
  differ = config_lib.config_differences(found, json.loads(model_config.to_json()))
  if differ:
    raise errors.ConfigError(f'{workdir} holds a run of another model (differs in: {", ".join(differ)}); '
                             'use a new --workdir or the same model settings')
  with open(os.path.join(workdir, 'config.json')) as f:
    found_train = json.load(f).get('train_backbone')
  if found_train != config.train_backbone:
    raise errors.ConfigError(f'{workdir} holds a run with train_backbone={found_train}; use a new --workdir')


def record_configs(workdir: str, model_config, config) -> None:
  """Writes config.json and model_config.json on a workdir's first run (process 0)."""
  path = os.path.join(workdir, 'model_config.json')
  if os.path.isfile(path) or jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json(indent=2, sort_keys=True))
  with open(path, 'w') as f:
    f.write(model_config.to_json(indent=2, sort_keys=True))


def read_json(path: str):
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value) -> None:
  """Process 0 writes `value` atomically (temp file + rename)."""
  if jax.process_index() != 0:
    return
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)
