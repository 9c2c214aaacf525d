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
import numpy as np

from segswap_jax import checkpoints
from segswap_jax import errors
from segswap_jax import model as model_lib
from segswap_jax import multihost
from segswap_jax.training import config as config_lib
from segswap_jax.training import step as step_lib


DIGESTS_FILE = 'digests.json'


class CheckpointStore:
  """Orbax CheckpointManager of the train state and the data iterators (one state file per process).

  Each saved train state's digest (`checkpoints.tree_digest`) goes to `digests.json` beside the step
  folders and is checked at restore: a corrupted or truncated step is refused, naming its folder.
  """

  def __init__(self, directory: str, keep: int):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        directory, item_names=('state', 'data'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def _digests(self) -> dict:
    path = os.path.join(self.directory, DIGESTS_FILE)
    if not os.path.isfile(path):
      return {}
    try:
      with open(path) as f:
        return dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
      raise errors.CheckpointError(f'{path}: unreadable ({type(e).__name__}); delete it to resume without '
                                   'verifying the checkpoints') from e

  def save(self, step: int, host_state, data_iterator) -> None:
    import grain
    ocp = self._ocp
    if jax.process_index() == 0:
      digests = self._digests()
      digests[str(step)] = checkpoints.tree_digest(host_state)
      path = os.path.join(self.directory, DIGESTS_FILE)
      with open(path + '.tmp', 'w') as f:
        json.dump(digests, f, indent=1, sort_keys=True)
      os.replace(path + '.tmp', path)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(host_state), data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=True)

  def restore(self, step: int, host_state_target, data_iterator):
    import grain
    ocp = self._ocp
    step_dir = os.path.join(self.directory, str(step))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(host_state_target),
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:  # Orbax raises several types for corrupt trees or trees that do not match
      first = str(e).splitlines()[0] if str(e) else ''
      self.close()
      raise errors.CheckpointError(f'{step_dir}: cannot restore this training checkpoint (truncated, corrupted '
                                   f'or of another model; {type(e).__name__}: {first}); delete the step folder '
                                   'to resume from an earlier one') from None
    state = jax.tree.map(np.asarray, restored.state)
    expected = self._digests().get(str(step))
    if expected is not None and checkpoints.tree_digest(state) != expected:
      self.close()
      raise errors.CheckpointError(f'{step_dir}: the train state does not match the digest written with it (the '
                                   'files are corrupted); delete the step folder to resume from an earlier one')
    checkpoints.check_finite(state.params, step_dir)
    return state

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


# Settings that runs started before they existed ran with, at these values.
ADDED_SETTINGS = {'model.compute_dtype': 'float32', 'model.attention_dropout': True,
                  'dropout_rng_impl': 'threefry'}
# Settings that never change the trained parameters (attention_impl: the same function to ~1e-7): free
# to differ when a run resumes.
BOOKKEEPING_KEYS = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'data.num_workers',
                    'data.num_threads', 'eval_batch_size', 'brueghel_batch_size', 'vis_num_pairs', 'allow_changes',
                    'model.attention_impl', 'profile_steps', 'compilation_cache_dir', 'prefetch_batches')
HISTORY_FILE = 'config_history.jsonl'


def has_checkpoint(workdir: str) -> bool:
  """Whether the workdir holds a training checkpoint to resume from (a step folder under checkpoints/)."""
  directory = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return out


def setting_changes(workdir: str, config) -> dict:
  """{key: (stored, now)} for every training setting that differs from the run in `workdir`."""
  with open(os.path.join(workdir, 'config.json')) as f:
    stored = _flat(json.load(f))
  current = _flat(json.loads(config.to_json()))
  keys = (set(stored) | set(current)) - set(BOOKKEEPING_KEYS)
  # Settings added after a run started hold their defaults in it: a key the stored config lacks at its
  # default is no change.
  added = {k for k in set(current) - set(stored) if k in ADDED_SETTINGS and current[k] == ADDED_SETTINGS[k]}
  return {k: (stored.get(k), current.get(k)) for k in sorted(keys - added) if stored.get(k) != current.get(k)}


# Keys derived from others in configs/base.py: allowed to change with them.
DERIVED_KEYS = {'num_train_steps': ('warmup_steps', 'num_epochs', 'steps_per_epoch'),
                'eval_every_steps': ('steps_per_epoch',)}


def allowed_changes(config) -> set:
  """The keys named in `config.allow_changes`, and the keys derived from them."""
  named = {k.strip() for k in str(config.get('allow_changes', '') or '').split(',') if k.strip()}
  return named | {k for k, sources in DERIVED_KEYS.items() if named & set(sources)}


def check_workdir(workdir: str, model_config, config) -> None:
  """A workdir that holds a run (a checkpoint) must hold one of the same model and settings.

  Model settings can never change; a training setting may change only when named in
  `config.allow_changes` (recorded by `record_configs`). Read-only: nothing is written.
  """
  if not has_checkpoint(workdir) or not os.path.isfile(os.path.join(workdir, 'model_config.json')):
    return  # a fresh workdir, or one whose first start failed before any checkpoint: nothing to resume
  with open(os.path.join(workdir, 'model_config.json')) as f:
    found = json.load(f)
  # The compute policy is a training setting (config.model.*, checked below), not a model difference.
  differ = config_lib.config_differences(found, json.loads(model_config.to_json()),
                                         ignore=model_lib.COMPUTE_POLICY_KEYS)
  if differ:
    raise errors.ConfigError(f'{workdir} holds a run of another model (differs in: {", ".join(differ)}); '
                             'use a new --workdir or the same model settings')
  changes = setting_changes(workdir, config)
  refused = {k: v for k, v in changes.items() if k not in allowed_changes(config)}
  if refused:
    listed = ', '.join(f'{k} ({old!r} -> {new!r})' for k, (old, new) in refused.items())
    raise errors.ConfigError(f'{workdir} holds a run with other settings: {listed}; resume with the same ones, '
                             f'or allow the change with --config.allow_changes={",".join(refused)}')


def record_configs(workdir: str, model_config, config, step: int = 0) -> None:
  """Writes config.json and model_config.json for the run in `workdir` (process 0).

  On a resume with allowed changes, the changed settings and the step they take effect at are appended
  to config_history.jsonl and config.json is rewritten with the settings now in force.
  """
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, 'config.json')
  if has_checkpoint(workdir) and os.path.isfile(config_path):
    changes = {k: v for k, v in setting_changes(workdir, config).items() if k in allowed_changes(config)}
    if not changes:
      return
    with open(os.path.join(workdir, HISTORY_FILE), 'a') as f:
      f.write(json.dumps({'step': int(step), 'changes': {k: {'from': old, 'to': new}
                                                        for k, (old, new) in changes.items()}},
                         sort_keys=True) + '\n')
  for path, text in ((config_path, config.to_json(indent=2, sort_keys=True)),
                     (os.path.join(workdir, 'model_config.json'), model_config.to_json(indent=2, sort_keys=True))):
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)


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
