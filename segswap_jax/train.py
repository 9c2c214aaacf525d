"""Trains SegSwap on segment-swapping pairs (SPEC §2): pmapped step, Orbax checkpoints, exact resume.

  python -m segswap_jax.train --config=configs/demo.py --workdir workdirs/demo
  python -m segswap_jax.train --config=configs/coco.py --workdir workdirs/coco \\
      --config.data.data_dir=DATA --config.backbone_checkpoint=ckpt/moco --config.batch_pos=8
  # several hosts: the same command on each, plus
      --coordinator_address=HOST0:1234 --num_processes=2 --process_id=I   (or --jax_distributed_auto)

The workdir receives:
  checkpoints/STEP/   Orbax: the train state and every process's data-iterator state (the last K kept)
  model/, best/       model checkpoints (`segswap_jax.checkpoints` layout) of the last and best weights,
                      loadable by predict / eval / discover; best.json says which step and metric
  metrics.jsonl, tensorboard/   training and validation scalars (process 0)
  predictions.png     held-out pairs with predicted masks and correspondences
  config.json, model_config.json
Running the same command again resumes from the last checkpoint (same batches, same parameters as an
uninterrupted run); SIGTERM saves a checkpoint and exits (status 143).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys
import time
from typing import Dict, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from data_pipeline import augment
from data_pipeline import builder
from data_pipeline import loader as loader_lib
from data_pipeline.errors import DataError
from segswap_jax import checkpoints
from segswap_jax import config_cli
from segswap_jax import losses
from segswap_jax import model as model_lib
from segswap_jax import multihost
from segswap_jax import train_logging
from segswap_jax import train_step as train_step_lib
from segswap_jax import validation

PREEMPTED_EXIT_CODE = 143


class TrainError(ValueError):
  """A training run that cannot start or continue; the message says why and what to do."""


# -- configuration --------------------------------------------------------------------------------------

def build_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model config (`model.model_config`) described by a training config's `model` block."""
  spec = config.model
  try:
    model_config = model_lib.model_config(spec.size, spec.block_types or None)
  except ValueError as e:
    raise TrainError(f'config.model: {e}') from e
  for key in ('dropout', 'drop_feat', 'pos_weight', 'feat_weight', 'backbone'):
    model_config[key] = spec[key]
  model_config.backbone_widths = tuple(int(w) for w in spec.backbone_widths)
  if spec.backbone == 'small_convnet':
    model_config.feature_dim = model_config.backbone_widths[-1]
  elif spec.backbone != 'resnet50_conv4':
    raise TrainError(f'config.model.backbone: unknown backbone {spec.backbone!r} '
                     f'(expected one of {model_lib.BACKBONES})')
  return model_config


def check_config(config: ml_collections.ConfigDict) -> None:
  if config.batch_pos < 1:
    raise TrainError(f'config.batch_pos must be >= 1, got {config.batch_pos}')
  if config.batch_neg > config.batch_pos * (config.batch_pos - 1) or config.batch_neg < 0:
    raise TrainError(f'config.batch_neg={config.batch_neg}: {config.batch_pos} positives give 0 to '
                     f'{config.batch_pos * (config.batch_pos - 1)} in-batch negatives')
  if config.num_train_steps < 1:
    raise TrainError(f'config.num_train_steps must be >= 1, got {config.num_train_steps}')
  if config.corr_cells not in losses.CORR_CELLS:
    raise TrainError(f'config.corr_cells must be one of {losses.CORR_CELLS}, got {config.corr_cells!r}')
  if config.hard_mining.enabled and config.train_backbone:
    raise TrainError('hard mining keeps mined features across a round: it needs a frozen backbone '
                     '(config.train_backbone=False)')
  if config.data.image_size % model_lib.FEATURE_STRIDE:
    raise TrainError(f'config.data.image_size={config.data.image_size} is not a multiple of '
                     f'{model_lib.FEATURE_STRIDE}')


def training_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The flat settings `train_step` reads, with the decay epochs turned into steps."""
  settings = ml_collections.ConfigDict({
      key: config[key] for key in ('seed', 'batch_pos', 'batch_neg', 'warp_mask', 'eta_corr', 'corr_cells',
                                   'drop_shared_scene_negatives',
                                   'swap_prob', 'train_backbone', 'learning_rate', 'weight_decay',
                                   'grad_clip_norm', 'warmup_steps')})
  settings.lr_decay_steps = tuple(config.warmup_steps + int(e) * config.steps_per_epoch
                                  for e in config.lr_decay_epochs)
  settings.lr_decay_factor = config.lr_decay_factor
  return settings


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file (the data configs a training config names)."""
  if not os.path.isfile(path):
    raise TrainError(f'config.data.generate_config: no such file {path}')
  spec = importlib.util.spec_from_file_location('segswap_data_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# -- data -----------------------------------------------------------------------------------------------

def prepare_dataset(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The dataset directory; generates the pairs first (process 0) when a data config is named."""
  data_dir = config.data.data_dir
  if config.data.generate_config:
    data_dir = data_dir or os.path.join(workdir, 'data')
    data_config = load_config_file(config.data.generate_config)
    if jax.process_index() == 0:
      from data_pipeline import generate
      print(f'pairs: making or finding {config.data.generate_config} pairs under {data_dir}', flush=True)
      generate.generate(data_config, data_dir)
    multihost.barrier('dataset')
  if not data_dir:
    raise TrainError('no training pairs: set --config.data.data_dir (a data_pipeline.generate output) '
                     'or --config.data.generate_config')
  return builder.resolve_dataset_dir(data_dir, config.data.source or None)


def check_dataset(dataset_dir: str, config: ml_collections.ConfigDict) -> None:
  """The stored pairs have the size the config trains at and the documented feature shapes."""
  size = builder.image_size(dataset_dir)
  if size != config.data.image_size:
    raise TrainError(f'{dataset_dir} holds {size}x{size} pairs, the config trains at '
                     f'{config.data.image_size} (set --config.data.image_size={size})')
  cells = size // model_lib.FEATURE_STRIDE
  for split in ('train', 'validation'):
    example = builder.data_source(dataset_dir, split)[0]
    expected = {'corr_a': (cells, cells, 2), 'corr_b': (cells, cells, 2), 'mask_a': (cells, cells),
                'mask_b': (cells, cells)}
    for key, shape in expected.items():
      found = np.shape(example[key])
      if found != shape:
        raise TrainError(f'{dataset_dir} [{split}]: feature {key} has shape {found}, expected {shape} '
                         f'for {size}x{size} images')
    image = builder.decode_jpeg(example['image_a'])
    if image.shape != (size, size, 3):
      raise TrainError(f'{dataset_dir} [{split}]: image_a is {image.shape}, expected ({size}, {size}, 3)')


def augment_config(config: ml_collections.ConfigDict) -> augment.AugmentConfig:
  return augment.AugmentConfig(p_style=config.data.p_style, p_tps=config.data.p_tps,
                               tps_grids=tuple(config.data.tps_grids), p_pad=config.data.p_pad)


def make_loader(dataset_dir: str, config: ml_collections.ConfigDict):
  return loader_lib.make_train_loader(
      dataset_dir, per_device_batch=config.batch_pos, num_devices=jax.local_device_count(),
      seed=config.seed, image_size=config.data.image_size, augment_config=augment_config(config),
      num_workers=config.data.num_workers, num_threads=config.data.num_threads)


# -- parameters and the workdir -------------------------------------------------------------------------

def initial_model_params(config: ml_collections.ConfigDict, model_config) -> dict:
  """Random parameters, then the named checkpoints on top (whole model, or backbone only)."""
  params = model_lib.init_params(model_config, jax.random.PRNGKey(config.seed))
  params = jax.tree.map(np.asarray, params)
  for key, part in (('init_checkpoint', None), ('backbone_checkpoint', 'backbone')):
    path = config[key]
    if not path:
      continue
    loaded, loaded_config = checkpoints.load_model(path)
    differ = config_differences(loaded_config.to_dict(), model_config.to_dict(),
                                ignore=('dropout', 'drop_feat') if part is None else
                                ('size', 'block_types', 'd_model', 'num_heads', 'dim_feedforward',
                                 'num_blocks', 'dropout', 'drop_feat', 'pos_weight', 'feat_weight'))
    if differ:
      raise TrainError(f'config.{key}: {path} is a model with other settings ({", ".join(differ)})')
    if part is None:
      params = loaded
    else:
      params = dict(params, backbone=loaded['backbone'])
  if not config.backbone_checkpoint and not config.init_checkpoint and not config.train_backbone:
    logging.warning('the frozen backbone is random: set config.backbone_checkpoint to a converted '
                    'MoCo-v2 ResNet-50 (python -m segswap_jax.convert) for the reference recipe')
  return params


def config_differences(found: dict, expected: dict, ignore=()) -> list:
  normalise = lambda v: list(v) if isinstance(v, tuple) else v
  keys = (set(found) | set(expected)) - set(ignore)
  return sorted(k for k in keys if normalise(found.get(k)) != normalise(expected.get(k)))


def check_workdir(workdir: str, model_config, config) -> None:
  """A workdir that holds a run must hold one of the same model (read-only: nothing is written)."""
  path = os.path.join(workdir, 'model_config.json')
  if not os.path.isfile(path):
    return
  with open(path) as f:
    found = json.load(f)
  differ = config_differences(found, json.loads(model_config.to_json()))
  if differ:
    raise TrainError(f'{workdir} holds a run of another model (differs in: {", ".join(differ)}); '
                     'use a new --workdir or the same model settings')
  with open(os.path.join(workdir, 'config.json')) as f:
    found_train = json.load(f).get('train_backbone')
  if found_train != config.train_backbone:
    raise TrainError(f'{workdir} holds a run with train_backbone={found_train}; use a new --workdir')


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
      raise TrainError(f'cannot restore checkpoint step {step} of {self.manager.directory}: '
                       f'{type(e).__name__}: {first}') from e
    return restored.state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def export_model(directory: str, trainable, frozen, model_config, metadata: dict) -> None:
  """Writes a model checkpoint from host trees, replacing an older one. Collective: every process calls
  it (Orbax synchronises its writers); process 0 writes the files."""
  import shutil
  temporary = directory + '.tmp'
  if jax.process_index() == 0:
    shutil.rmtree(temporary, ignore_errors=True)
  multihost.barrier(f'export_start:{directory}')
  checkpoints.save_model(temporary, train_step_lib.merge_params(trainable, frozen), model_config,
                         metadata)
  multihost.barrier(f'export_written:{directory}')
  if jax.process_index() == 0:
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(temporary, directory)
  multihost.barrier(f'export_done:{directory}')


# -- the loop -------------------------------------------------------------------------------------------

class _Preemption:
  """Remembers a SIGTERM so the loop can save and stop between steps."""

  def __init__(self):
    self.requested = False

  @contextlib.contextmanager
  def installed(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread, where Python cannot install signal handlers
      yield self
      return
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, previous)


def _host_metrics(metrics) -> Dict[str, float]:
  """Replicated step metrics -> floats (device 0's copy; they are already averaged)."""
  return {k: float(v) for k, v in train_step_lib.unreplicate(metrics).items()}


def _mean_metrics(records) -> Dict[str, float]:
  return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


def _is_eval_step(step: int, config) -> bool:
  """Validation at the end of warm-up and of every epoch (the reference's rhythm), and at the end."""
  if step == config.num_train_steps:
    return True
  after_warmup = step - config.warmup_steps
  return after_warmup >= 0 and config.eval_every_steps > 0 and after_warmup % config.eval_every_steps == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, object]:
  """Trains (or resumes) in `workdir`; returns {'before': ..., 'after': ..., 'best': ..., 'steps': ...}.

  Raises TrainError / DataError / CheckpointError for user mistakes (bad config, data, workdir).
  """
  workdir = os.path.abspath(workdir)
  check_config(config)
  model_config = build_model_config(config)
  check_workdir(workdir, model_config, config)
  dataset_dir = prepare_dataset(config, workdir)
  check_dataset(dataset_dir, config)
  record_configs(workdir, model_config, config)

  settings = training_settings(config)
  state, frozen = train_step_lib.create_train_state(initial_model_params(config, model_config), settings)
  host_state = jax.tree.map(np.asarray, state)
  data_iterator = make_loader(dataset_dir, config)
  store = CheckpointStore(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  start_step = store.latest_step()
  if start_step is not None:
    host_state = store.restore(start_step, host_state, data_iterator)
    print(f'resuming from {workdir} at step {start_step}', flush=True)
  start_step = int(host_state.step)

  devices = jax.local_devices()
  state = train_step_lib.replicate(host_state, devices)
  frozen = train_step_lib.replicate(frozen, devices)
  del host_state
  # Over all devices of all processes: gradients and metrics are averaged globally.
  p_step = jax.pmap(train_step_lib.make_train_step(model_config, settings, axis_name='batch'),
                    axis_name='batch', donate_argnums=(0,))
  evaluator = validation.HeldOutEvaluator(dataset_dir, model_config, config.eval_batch_size,
                                          config.eval_num_pairs)
  miner = None
  if config.hard_mining.enabled:
    from segswap_jax import hard_mining
    try:
      miner = hard_mining.HardNegativeMiner(dataset_dir, model_config, config, workdir)
    except ValueError as e:
      raise TrainError(f'config.{e}') from e
  writer = train_logging.MetricWriter(workdir, enabled=jax.process_index() == 0)
  summary_path = os.path.join(workdir, 'summary.json')
  summary = _read_json(summary_path) or {}

  def validate(step: int, label: str) -> Dict[str, float]:
    result = evaluator.evaluate(state.params, frozen)
    if config.brueghel_dir:
      cache_dir = os.path.join(workdir, 'brueghel_cache')
      if config.train_backbone and jax.process_index() == 0:
        import shutil  # a trained backbone's features are stale at the next validation
        shutil.rmtree(cache_dir, ignore_errors=True)
      multihost.barrier('brueghel_cache')
      trainable = train_step_lib.unreplicate(state.params)
      value = validation.brueghel_map(
          config.brueghel_dir, train_step_lib.merge_params(trainable, train_step_lib.unreplicate(frozen)),
          model_config, config.brueghel_batch_size, cache_dir, os.path.join(workdir, 'brueghel.partial'),
          config.brueghel_db_size, config.brueghel_box_size)
      result['brueghel_map'] = multihost.from_first_process(value)
    writer.write(step, {f'val/{k}': v for k, v in result.items()})
    if jax.process_index() == 0:
      print(f'validation at step {step} ({label}): ' + format_validation(result), flush=True)
    return result

  def keep_if_best(step: int, result: Dict[str, float]) -> None:
    metric = 'brueghel_map' if 'brueghel_map' in result else 'mask_iou'
    best = summary.get('best')
    if best is not None and best['metric'] == metric and best['value'] >= result[metric]:
      return
    summary['best'] = {'step': step, 'metric': metric, 'value': result[metric], 'validation': result}
    export_model(os.path.join(workdir, 'best'), train_step_lib.unreplicate(state.params),
                 train_step_lib.unreplicate(frozen), model_config, {'step': step, metric: result[metric]})

  if start_step == 0 and 'before' not in summary:
    summary['before'] = validate(0, 'untrained')
    _write_json(summary_path, summary)

  num_devices_total = jax.device_count()
  window, window_start = [], time.time()   # the step metrics since the last log line (on device)
  step = start_step
  progress = _progress_bar(start_step, config.num_train_steps)
  preemption = _Preemption()
  with preemption.installed():
    while step < config.num_train_steps:
      batch = next(data_iterator)
      if miner is not None:
        batch.update(miner.negatives(step, state.params, frozen))
        if step % config.hard_mining.round_steps == 0:  # a new round was just scored
          writer.write(step, {f'mining/{k}': v for k, v in miner.round_summary().items()})
      state, metrics = p_step(state, batch, frozen)
      window.append(metrics)
      step += 1
      progress.update(1)
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        scalars = _mean_metrics([_host_metrics(m) for m in window])
        if not all(np.isfinite(v) for v in scalars.values()):
          raise TrainError(f'non-finite loss or gradient between steps {step - len(window) + 1} and '
                           f'{step}: {scalars}; lower config.learning_rate or set grad_clip_norm')
        scalars['steps_per_s'] = len(window) / max(time.time() - window_start, 1e-9)
        scalars['pairs_per_s'] = scalars['steps_per_s'] * config.batch_pos * num_devices_total
        writer.write(step, {f'train/{k}': v for k, v in scalars.items()})
        progress.set_postfix(loss=f'{scalars["loss"]:.3f}', corr=f'{scalars["loss_corr"]:.3f}',
                             acc_pos=f'{scalars["acc_pos"]:.2f}', acc_neg=f'{scalars["acc_neg"]:.2f}')
        window, window_start = [], time.time()
      stop = multihost.any_process(preemption.requested)
      if stop or step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
        store.save(step, train_step_lib.unreplicate(state), data_iterator)
      if stop:
        store.wait()
        progress.close()
        print(f'stopped by SIGTERM at step {step}; checkpoint saved. Run the same command to resume.',
              file=sys.stderr, flush=True)
        writer.close()
        raise SystemExit(PREEMPTED_EXIT_CODE)
      if _is_eval_step(step, config):
        paused = time.time()
        result = validate(step, f'epoch {(step - config.warmup_steps) // max(config.eval_every_steps, 1)}'
                          if step != config.num_train_steps else 'final')
        keep_if_best(step, result)
        summary.setdefault('validation', {})[str(step)] = result
        _write_json(summary_path, summary)
        window_start += time.time() - paused  # steps/s counts training only
  progress.close()
  store.wait()

  summary['after'] = summary.get('validation', {}).get(str(config.num_train_steps))
  if summary['after'] is None:
    summary['after'] = validate(step, 'final')
  summary['steps'] = step
  export_model(os.path.join(workdir, 'model'), train_step_lib.unreplicate(state.params),
               train_step_lib.unreplicate(frozen), model_config, {'step': step})
  if config.vis_num_pairs > 0:
    picture = evaluator.draw(state.params, frozen, config.vis_num_pairs, title=f'step {step}: ')
    if jax.process_index() == 0:
      summary['predictions'] = validation.visualize.save_png(os.path.join(workdir, 'predictions.png'),
                                                             picture)
  _write_json(summary_path, summary)
  store.close()
  writer.close()
  return summary


def format_validation(result: Dict[str, float]) -> str:
  text = validation.format_result(result, 'held-out pairs')
  if 'brueghel_map' in result:
    text += f', Brueghel val mAP {100 * result["brueghel_map"]:.1f}'
  return text


def _progress_bar(start: int, total: int):
  from tqdm import tqdm
  return tqdm(total=total, initial=start, unit='step', desc='train', dynamic_ncols=True,
              disable=jax.process_index() != 0, mininterval=2.0)


def _read_json(path: str):
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  if jax.process_index() != 0:
    return
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)


# -- command line ---------------------------------------------------------------------------------------

def define_flags() -> None:
  """The command line (defined only when run as a program, so importing this module defines none)."""
  config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. configs/demo.py.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exported models.')
  flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0.')
  flags.DEFINE_integer('num_processes', 1, 'Multi-host: number of processes.')
  flags.DEFINE_integer('process_id', 0, 'Multi-host: index of this process.')
  flags.DEFINE_bool('jax_distributed_auto', False,
                    'Multi-host: let jax.distributed.initialize() detect the cluster (TPU, SLURM, ...).')


def initialize_distributed() -> None:
  args = flags.FLAGS
  if args.jax_distributed_auto:
    jax.distributed.initialize()
  elif args.num_processes > 1:
    if not args.coordinator_address:
      raise TrainError('--num_processes > 1 needs --coordinator_address HOST:PORT')
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  if args.config is None or not args.workdir:
    raise app.UsageError('--config and --workdir are required, e.g. '
                         '--config=configs/demo.py --workdir workdirs/demo')
  logging.set_verbosity(logging.WARNING)
  try:
    initialize_distributed()
    summary = train_and_evaluate(args.config, args.workdir)
  except (TrainError, DataError, checkpoints.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    print_summary(summary, args.workdir)


def print_summary(summary: Dict[str, object], workdir: str) -> None:
  print()
  print(f'held-out pairs before training: {format_validation(summary["before"])}'
        if summary.get('before') else 'held-out pairs before training: (run resumed; see summary.json)')
  print(f'held-out pairs after {summary["steps"]} steps: {format_validation(summary["after"])}')
  best = summary.get('best')
  if best:
    print(f'best {best["metric"]} {best["value"]:.3f} at step {best["step"]}: {os.path.join(workdir, "best")}')
  print(f'model: {os.path.join(workdir, "model")}')
  if summary.get('predictions'):
    print(f'predictions on held-out pairs: {summary["predictions"]}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=config_cli.parse_flags)
