"""The training loop (docs/reference.md §2): pmapped step, Orbax checkpoints, exact resume.

`train_and_evaluate(config, workdir)` is what `python -m segswap_jax.train` runs (see that module for
the command line). The workdir receives:
  checkpoints/STEP/   Orbax: the train state and every process's data-iterator state (the last K kept)
  model/, best/       model checkpoints (`segswap_jax.checkpoints` layout) of the last and best weights,
                      loadable by predict / eval / discover; best.json says which step and metric
  metrics.jsonl, tensorboard/   training and validation scalars (process 0)
  predictions.png     held-out pairs with predicted masks and correspondences
  config.json, model_config.json, summary.json
Running it again resumes from the last checkpoint (same batches, same parameters as an uninterrupted
run); SIGTERM saves a checkpoint and exits (status 143).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Dict

from absl import logging
import jax
import ml_collections
import numpy as np

from data_pipeline import augment
from data_pipeline import builder
from data_pipeline import loader as loader_lib
from segswap_jax import checkpoints
from segswap_jax import compilation_cache
from segswap_jax import errors
from segswap_jax import model as model_lib
from segswap_jax import multihost
from segswap_jax import visualize
from segswap_jax.training import config as config_lib
from segswap_jax.training import metrics as metrics_lib
from segswap_jax.training import prefetch
from segswap_jax.training import step as step_lib
from segswap_jax.training import store as store_lib
from segswap_jax.training import validation

PREEMPTED_EXIT_CODE = 143


# -- data -----------------------------------------------------------------------------------------------

def prepare_dataset(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The dataset directory; generates the pairs first (process 0) when a data config is named."""
  data_dir = config.data.data_dir
  if config.data.generate_config:
    data_dir = data_dir or os.path.join(workdir, 'data')
    data_config = config_lib.load_config_file(config.data.generate_config)
    if jax.process_index() == 0:
      from data_pipeline import generate
      print(f'pairs: making or finding {config.data.generate_config} pairs under {data_dir}', flush=True)
      generate.generate(data_config, data_dir)
    multihost.barrier('dataset')
  if not data_dir:
    raise errors.ConfigError('no training pairs: set --config.data.data_dir (a data_pipeline.generate output) '
                             'or --config.data.generate_config')
  return builder.resolve_dataset_dir(data_dir, config.data.source or None)


def check_dataset(dataset_dir: str, config: ml_collections.ConfigDict) -> None:
  """The stored pairs have the size the config trains at and the documented feature shapes."""
  size = builder.image_size(dataset_dir)
  if size != config.data.image_size:
    raise errors.ConfigError(f'{dataset_dir} holds {size}x{size} pairs, the config trains at '
                             f'{config.data.image_size} (set --config.data.image_size={size})')
  cells = size // model_lib.FEATURE_STRIDE
  for split in ('train', 'validation'):
    example = builder.data_source(dataset_dir, split)[0]
    expected = {'corr_a': (cells, cells, 2), 'corr_b': (cells, cells, 2), 'mask_a': (cells, cells),
                'mask_b': (cells, cells)}
    for key, shape in expected.items():
      found = np.shape(example[key])
      if found != shape:
        raise errors.DataError(f'{dataset_dir} [{split}]: feature {key} has shape {found}, expected {shape} '
                               f'for {size}x{size} images')
    image = builder.decode_jpeg(example['image_a'])
    if image.shape != (size, size, 3):
      raise errors.DataError(f'{dataset_dir} [{split}]: image_a is {image.shape}, expected ({size}, {size}, 3)')


def augment_config(config: ml_collections.ConfigDict) -> augment.AugmentConfig:
  return augment.AugmentConfig(p_style=config.data.p_style, p_tps=config.data.p_tps,
                               tps_grids=tuple(config.data.tps_grids), p_pad=config.data.p_pad)


def make_loader(dataset_dir: str, config: ml_collections.ConfigDict):
  return loader_lib.make_train_loader(
      dataset_dir, per_device_batch=config.batch_pos, num_devices=jax.local_device_count(),
      seed=config.seed, image_size=config.data.image_size, augment_config=augment_config(config),
      num_workers=config.data.num_workers, num_threads=config.data.num_threads)


# -- parameters -----------------------------------------------------------------------------------------

def initial_model_params(config: ml_collections.ConfigDict, model_config) -> dict:
  """Random parameters, then the named checkpoints on top (whole model, or backbone only)."""
  params = model_lib.init_params(model_config, jax.random.PRNGKey(config.seed))
  params = jax.tree.map(np.asarray, params)
  for key, part in (('init_checkpoint', None), ('backbone_checkpoint', 'backbone')):
    path = config[key]
    if not path:
      continue
    loaded, loaded_config = checkpoints.load_model(path)
    differ = config_lib.config_differences(
        loaded_config.to_dict(), model_config.to_dict(),
        ignore=model_lib.COMPUTE_POLICY_KEYS + (('dropout', 'drop_feat') if part is None else
        ('size', 'block_types', 'd_model', 'num_heads', 'dim_feedforward', 'num_blocks', 'dropout',
         'drop_feat', 'pos_weight', 'feat_weight')))
    if differ:
      raise errors.ConfigError(f'config.{key}: {path} is a model with other settings ({", ".join(differ)})')
    if part is None:
      params = loaded
    else:
      params = dict(params, backbone=loaded['backbone'])
  if not config.backbone_checkpoint and not config.init_checkpoint and not config.train_backbone:
    logging.warning('the frozen backbone is random: set config.backbone_checkpoint to a converted '
                    'MoCo-v2 ResNet-50 (python -m segswap_jax.convert) for the reference recipe')
  return params


# -- the loop -------------------------------------------------------------------------------------------

class Profiler:
  """A `jax.profiler` trace of the steps `first..last` (config.profile_steps) in `directory`
  (TensorBoard's profile plugin or Perfetto read it)."""

  def __init__(self, steps, directory: str):
    self.first, self.last = (int(steps[0]), int(steps[-1])) if len(steps) else (-1, -1)
    self.directory = directory
    self.active = False

  def before(self, step: int) -> None:
    if step == self.first and not self.active and jax.process_index() == 0:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, state) -> None:
    """`step` steps are done."""
    if self.active and step > self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      print(f'profile of steps {self.first}..{self.last}: {self.directory}', file=sys.stderr, flush=True)


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
  return {k: float(v) for k, v in step_lib.unreplicate(metrics).items()}


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

  Raises `errors.UserError` subclasses for user mistakes (bad config, data, workdir, checkpoint).
  """
  workdir = os.path.abspath(workdir)
  config_lib.check_config(config)
  compilation_cache.enable(config.get('compilation_cache_dir', ''))
  model_config = config_lib.build_model_config(config)
  store_lib.check_workdir(workdir, model_config, config)
  dataset_dir = prepare_dataset(config, workdir)
  check_dataset(dataset_dir, config)

  settings = config_lib.training_settings(config)
  state, frozen = step_lib.create_train_state(initial_model_params(config, model_config), settings)
  host_state = jax.tree.map(np.asarray, state)
  host_frozen = jax.tree.map(np.asarray, frozen)
  data_iterator = make_loader(dataset_dir, config)
  store = store_lib.CheckpointStore(os.path.join(workdir, 'checkpoints'), config.keep_checkpoints)
  start_step = store.latest_step()
  if start_step is not None:
    host_state = store.restore(start_step, host_state, data_iterator)
    print(f'resuming from {workdir} at step {start_step}', flush=True)
  start_step = int(host_state.step)
  store_lib.record_configs(workdir, model_config, config, start_step)

  devices = jax.local_devices()
  batches = prefetch.DevicePrefetch(data_iterator, config.prefetch_batches, devices)
  state = step_lib.replicate(host_state, devices)
  frozen = step_lib.replicate(host_frozen, devices)
  del host_state
  # Over all devices of all processes: gradients and metrics are averaged globally.
  p_step = jax.pmap(step_lib.make_train_step(model_config, settings, axis_name='batch'),
                    axis_name='batch', donate_argnums=(0,))
  evaluator = validation.HeldOutEvaluator(dataset_dir, model_config, config.eval_batch_size,
                                          config.eval_num_pairs)
  miner = None
  if config.hard_mining.enabled:
    from segswap_jax.training import hard_mining
    miner = hard_mining.HardNegativeMiner(dataset_dir, model_config, config, workdir)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  summary_path = os.path.join(workdir, 'summary.json')
  summary = store_lib.read_json(summary_path) or {}

  def model_params() -> dict:
    """The current weights as one host model tree (what every inference tool loads)."""
    return step_lib.merge_params(step_lib.unreplicate(state.params), host_frozen)

  def validate(step: int, label: str) -> Dict[str, float]:
    params = model_params()
    result = evaluator.evaluate(params)
    if config.brueghel_dir:
      cache_dir = os.path.join(workdir, 'brueghel_cache')
      if config.train_backbone and jax.process_index() == 0:
        import shutil  # a trained backbone's features are stale at the next validation
        shutil.rmtree(cache_dir, ignore_errors=True)
      multihost.barrier('brueghel_cache')
      value = validation.brueghel_map(
          config.brueghel_dir, params, model_config, config.brueghel_batch_size, cache_dir,
          os.path.join(workdir, 'brueghel.partial'), config.brueghel_db_size, config.brueghel_box_size)
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
    store_lib.export_model(os.path.join(workdir, 'best'), step_lib.unreplicate(state.params), host_frozen,
                           model_config, {'step': step, metric: result[metric]})

  if start_step == 0 and 'before' not in summary:
    summary['before'] = validate(0, 'untrained')
    store_lib.write_json(summary_path, summary)

  num_devices_total = jax.device_count()
  window, window_start = [], time.time()   # the step metrics since the last log line (on device)
  step = start_step
  progress = _progress_bar(start_step, config.num_train_steps)
  preemption = _Preemption()
  profiler = Profiler(config.profile_steps, os.path.join(workdir, 'profile'))
  with preemption.installed():
    while step < config.num_train_steps:
      profiler.before(step)
      batch = next(batches)
      if miner is not None:
        batch.update(miner.negatives(step, model_params))
        if step % config.hard_mining.round_steps == 0:  # a new round was just scored
          writer.write(step, {f'mining/{k}': v for k, v in miner.round_summary().items()})
      state, metrics = p_step(state, batch, frozen if miner is None else dict(frozen, hard_pool=miner.pool))
      window.append(metrics)
      step += 1
      progress.update(1)
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        scalars = _mean_metrics([_host_metrics(m) for m in window])
        if not all(np.isfinite(v) for v in scalars.values()):
          raise errors.ConfigError(f'non-finite loss or gradient between steps {step - len(window) + 1} and '
                                   f'{step}: {scalars}; lower config.learning_rate or set grad_clip_norm')
        scalars['steps_per_s'] = len(window) / max(time.time() - window_start, 1e-9)
        scalars['pairs_per_s'] = scalars['steps_per_s'] * config.batch_pos * num_devices_total
        writer.write(step, {f'train/{k}': v for k, v in scalars.items()})
        progress.set_postfix(loss=f'{scalars["loss"]:.3f}', corr=f'{scalars["loss_corr"]:.3f}',
                             acc_pos=f'{scalars["acc_pos"]:.2f}', acc_neg=f'{scalars["acc_neg"]:.2f}')
        window, window_start = [], time.time()
      profiler.after(step, state)
      checkpoint_step = step % config.checkpoint_every_steps == 0 or step == config.num_train_steps
      # Several processes must agree on the step they stop at, and asking the others costs a collective
      # that blocks the host from running ahead: only at log and checkpoint steps (one process: free).
      stop = False
      if jax.process_count() == 1 or checkpoint_step or step % config.log_every_steps == 0:
        stop = multihost.any_process(preemption.requested)
      if stop or checkpoint_step:
        store.save(step, step_lib.unreplicate(state), batches)
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
        store_lib.write_json(summary_path, summary)
        window_start += time.time() - paused  # steps/s counts training only
  progress.close()
  store.wait()

  summary['after'] = summary.get('validation', {}).get(str(config.num_train_steps))
  if summary['after'] is None:
    summary['after'] = validate(step, 'final')
  summary['steps'] = step
  store_lib.export_model(os.path.join(workdir, 'model'), step_lib.unreplicate(state.params), host_frozen,
                         model_config, {'step': step})
  if config.vis_num_pairs > 0:
    picture = evaluator.draw(model_params(), config.vis_num_pairs, title=f'step {step}: ')
    if jax.process_index() == 0:
      summary['predictions'] = visualize.save_png(os.path.join(workdir, 'predictions.png'), picture)
  store_lib.write_json(summary_path, summary)
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
