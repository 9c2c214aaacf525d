"""Generates segment-swapping pairs into the TFDS ArrayRecord dataset `segswap_pairs` (docs/reference.md §3).

  python -m data_pipeline.generate --config=configs/data/demo.py --data-dir /tmp/segswap_data
  python -m data_pipeline.generate --config=configs/data/coco.py --data-dir DATA \\
      --config.source_dir=/datasets/coco --config.num_pairs=20000

Runs in parallel over CPU cores (`--config.num_workers`, 0 = all), shows a progress bar, is
deterministic for `--config.seed`, and resumes: pairs are made in shards under
DATA_DIR/segswap_pairs_work/SOURCE/, and a killed run started again with the same arguments makes only
the missing shards and ends with the same dataset. The dataset lands in
DATA_DIR/segswap_pairs/SOURCE/VERSION (printed at the end); running again when it exists does nothing.
Unreadable or too-small images are skipped with a warning and counted.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
from typing import Dict, List, Tuple

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from data_pipeline import builder
from data_pipeline import shards
from segswap_jax.errors import ConfigError, DataError
from segswap_jax.model import FEATURE_STRIDE
from segswap_jax import cli

# Settings that change how the work is done, not what is made.
_EXECUTION_KEYS = ('num_workers', 'keep_work')

_MAKER = None  # The PairMaker of a worker process, built by `_init_worker`.


def fingerprint(config) -> Dict[str, object]:
  """The config as plain data, without the execution-only settings."""
  values = json.loads(config.to_json())
  for key in _EXECUTION_KEYS:
    values.pop(key, None)
  return values


# Every value a data config holds, and what it may be (`cli.check_config_values`).
RULES = {
    'source': 'in:bundled|folder|coco', 'image_size': 'size16', 'num_pairs': 'count', 'num_validation': 'count0',
    'two_object_fraction': 'fraction', 'poisson_prob': 'fraction', 'copy_feather': 'nonneg', 'seed': 'count0',
    'shard_size': 'count', 'num_workers': 'count0', 'jpeg_quality': 'count', 'max_attempts': 'count',
    'swap.dilation': 'count0', 'swap.border_cut_prob': 'fraction', 'swap.aspect_min': 'open01',
    'swap.max_angle': 'nonneg', 'swap.num_scales': 'count', 'swap.min_mask_cells': 'nonneg',
    'swap.max_source_side': 'count', 'swap.min_source_side': 'count', 'style.kind': 'in:classical|adain',
    'style.adain_size': 'count',
}


def check_config(config) -> None:
  """Refuses values generation cannot run with, naming the key (before any pair is made)."""
  cli.check_config_values(config, RULES)
  if config.image_size < 64:
    raise ConfigError(f'config.image_size={config.image_size}: expected at least 64')
  if config.jpeg_quality > 100:
    raise ConfigError(f'config.jpeg_quality={config.jpeg_quality}: expected at most 100')


def _init_worker(config_json: str):
  global _MAKER
  import cv2
  import ml_collections
  cv2.setNumThreads(1)  # One process per core already.
  config = ml_collections.ConfigDict(json.loads(config_json))
  if config.style.kind == 'adain':  # every worker runs its own JAX: share the accelerator's memory
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  _MAKER = shards.PairMaker(config)


def _run_task(task: Tuple[str, str, int, int, int]):
  work_dir, split, shard, start, stop = task
  return stop - start, _MAKER.make_shard(work_dir, split, shard, start, stop)


def _check_work_dir(work_dir: str, expected: Dict[str, object]) -> None:
  """Creates the work dir with the config fingerprint, or checks that it holds the same config."""
  os.makedirs(work_dir, exist_ok=True)
  path = os.path.join(work_dir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      found = json.load(f)
    if found != expected:
      differ = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
      raise DataError(f'{work_dir} holds shards of another config (differs in: {", ".join(differ)}); '
                      'use another --data-dir or delete that folder')
  else:
    with open(path + '.tmp', 'w') as f:
      json.dump(expected, f, indent=1, sort_keys=True)
    os.replace(path + '.tmp', path)


def _existing_dataset(path: str, expected: Dict[str, object]) -> bool:
  if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
    return False
  metadata = builder.load_builder(path).info.metadata or {}
  if metadata.get('generation') != expected:
    raise DataError(f'{path} already holds a dataset made with another config; use another '
                    '--data-dir or delete it')
  return True


def _warn(message: str):
  from tqdm import tqdm
  tqdm.write(f'warning: {message}', file=sys.stderr)


def run_shards(config, work_dir: str, tasks: List[Tuple[str, str, int, int, int]],
               total: int, done: int) -> None:
  """Makes the shard `tasks` (in worker processes when num_workers > 1), with a progress bar."""
  from tqdm import tqdm
  num_workers = int(config.num_workers) or os.cpu_count() or 1
  num_workers = max(1, min(num_workers, len(tasks)))
  shards.PairMaker(config).source.check()  # Fails early, in this process, on a bad source.
  warned = set()
  with tqdm(total=total, initial=done, unit='pair', desc=f'segswap_pairs/{config.source}',
            dynamic_ncols=True) as progress:
    def report(result):
      count, stats = result
      for path, reason in stats['bad_images'].items():
        if path not in warned:
          warned.add(path)
          _warn(f'skipped image {path}: {reason}')
      progress.update(count)

    if num_workers == 1:
      _init_worker(config.to_json())
      for task in tasks:
        report(_run_task(task))
      return
    # Fresh worker processes (forkserver/spawn), never a fork of this one: a fork of a process whose
    # OpenCV or XLA thread pools are running deadlocks. Each worker builds its own source.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context('forkserver' if 'forkserver' in methods else 'spawn')
    with context.Pool(num_workers, initializer=_init_worker, initargs=(config.to_json(),)) as pool:
      for result in pool.imap_unordered(_run_task, tasks):
        report(result)


def _shard_examples(work_dir: str, split: str, num_shards: int):
  def examples():
    for shard in range(num_shards):
      yield from shards.read_shard(shards.shard_path(work_dir, split, shard))['examples']
  return examples


def generate(config, data_dir: str) -> str:
  """Generates (or finishes, or finds) the dataset of `config` under `data_dir`; returns its directory.

  Args:
    config: a data config (`configs/data/*.py`).
    data_dir: the TFDS data dir; the dataset goes to DATA_DIR/segswap_pairs/SOURCE/VERSION.

  Raises:
    DataError: bad config or source (missing folder/annotations, no usable image, ...).
  """
  import tensorflow_datasets as tfds
  check_config(config)
  expected = fingerprint(config)
  path = builder.dataset_path(data_dir, config.source)
  if _existing_dataset(path, expected):
    return path
  work_dir = os.path.join(data_dir, builder.NAME + '_work', config.source)
  _check_work_dir(work_dir, expected)
  plan = {split: shards.shard_ranges(n, int(config.shard_size))
          for split, n in shards.split_sizes(config).items()}
  tasks, done = [], 0
  for split, ranges in plan.items():
    for shard, (start, stop) in enumerate(ranges):
      if os.path.exists(shards.shard_path(work_dir, split, shard)):
        done += stop - start
      else:
        tasks.append((work_dir, split, shard, start, stop))
  total = sum(stop - start for ranges in plan.values() for start, stop in ranges)
  if tasks:
    run_shards(config, work_dir, tasks, total, done)

  stats = shards.empty_stats()
  for split, ranges in plan.items():
    for shard in range(len(ranges)):
      shard_stats = shards.read_shard(shards.shard_path(work_dir, split, shard))['stats']
      stats['pairs'] += shard_stats['pairs']
      stats['rejected'] += shard_stats['rejected']
      stats['bad_images'].update(shard_stats['bad_images'])
  metadata = {'image_size': int(config.image_size), 'generation': expected,
              'rejected_draws': stats['rejected'], 'skipped_images': stats['bad_images']}
  tfds.disable_progress_bar()
  try:
    path = builder.write_dataset(
        data_dir, config.source,
        {split: _shard_examples(work_dir, split, len(ranges)) for split, ranges in plan.items()},
        metadata)
  finally:
    tfds.enable_progress_bar()
  if stats['bad_images']:
    _warn(f'{len(stats["bad_images"])} unusable image(s) were skipped (listed in the dataset '
          'metadata "skipped_images")')
  if not config.keep_work:
    shutil.rmtree(work_dir, ignore_errors=True)
  return path


def define_flags() -> None:
  """The command line (defined only when run as a program, so importing this module defines none)."""
  config_flags.DEFINE_config_file('config', None, 'Data config file, e.g. configs/data/demo.py.',
                                  lock_config=True)
  flags.DEFINE_string('data-dir', None, 'TFDS data dir that receives segswap_pairs/.')


@cli.absl_main
def main(argv):
  if len(argv) > 1:
    raise ConfigError(f'unexpected arguments: {" ".join(argv[1:])}')
  args = flags.FLAGS
  data_dir = args['data-dir'].value
  if args.config is None or not data_dir:
    raise ConfigError('--config and --data-dir are required, e.g. --config=configs/data/demo.py '
                      '--data-dir /tmp/segswap_data')
  logging.set_verbosity(logging.WARNING)  # TFDS logs every file it writes at INFO.
  print(generate(args.config, data_dir))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_absl_flags)
