"""Data pipeline: generation pairs/s per core, loader batches/s at 480 x 480 with full augmentation, bytes
per stored pair.

  python -m benchmarks.run --only data [--quick]
"""
import glob
import os
import tempfile
import time

from configs.data import demo


def _config(image_size: int, num_pairs: int, **overrides):
  config = demo.get_config()
  config.image_size = image_size
  config.num_pairs = num_pairs
  config.num_validation = 0
  config.shard_size = num_pairs
  config.num_workers = 1
  if image_size >= 480:  # the reference setting (9 cells, 12% pair gap)
    config.swap.min_mask_cells = 9.0
    config.unsupervised.min_pair_gap = 0.12
  for key, value in overrides.items():
    config[key] = value
  return config


def generation_rate(image_size: int, num_pairs: int):
  """(pairs per CPU-second, pairs per wall-second, rejected draws per pair) of one process, after the
  per-process segmentation warm-up. CPU seconds do not depend on other jobs sharing the cores."""
  import cv2
  from data_pipeline import shards
  cv2.setNumThreads(1)  # as in the generation workers: one core
  maker = shards.PairMaker(_config(image_size, num_pairs))
  stats = shards.empty_stats()
  for index in range(len(maker.source)):  # warm-up: segment every bundled image once
    maker.source.segments(index)
  start, cpu = time.perf_counter(), time.process_time()
  for index in range(num_pairs):
    maker.example('train', index, stats)
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  return num_pairs / cpu, num_pairs / seconds, stats['rejected'] / max(1, stats['pairs'])


def stored_bytes(path: str) -> int:
  return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, '*.array_record*')))


def loader_rate(path: str, batch: int, num_batches: int, num_workers: int):
  """(batches per wall-second, CPU-seconds of this process per batch) of (1, batch) training batches
  with full augmentation, after the first batch."""
  from data_pipeline import loader
  it = loader.make_train_loader(path, per_device_batch=batch, num_devices=1, seed=0,
                                num_workers=num_workers)
  next(it)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(it)
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  if num_workers:
    it.close()
  return num_batches / seconds, cpu / num_batches


def main(quick: bool) -> str:
  from data_pipeline import generate
  lines = ['| measure | value |', '|---|---|']
  num_gen = 8 if quick else 40
  for size in (256, 480):
    per_cpu, per_wall, rejected = generation_rate(size, num_gen)
    lines.append(f'| generation, {size} px, bundled source, classical style, 1 process | '
                 f'{per_cpu:.2f} pairs per CPU-second ({per_wall:.2f} pairs/s wall; '
                 f'{rejected:.2f} rejected draws per pair) |')
  with tempfile.TemporaryDirectory() as data_dir:
    num_stored = 16 if quick else 60
    start = time.perf_counter()
    path = generate.generate(_config(480, num_stored, num_workers=0), data_dir)  # all cores
    wall = time.perf_counter() - start
    workers = os.cpu_count()
    lines.append(f'| generate() wall clock, {num_stored} pairs at 480 px, {workers} worker processes '
                 f'(incl. start-up, TFDS write) | {num_stored / wall:.2f} pairs/s |')
    lines.append(f'| bytes per stored pair at 480 px (4 JPEGs q90 + maps) | '
                 f'{stored_bytes(path) / num_stored / 1024:.0f} KiB |')
    num_batches = 4 if quick else 20
    for num_workers in (0, 2):
      rate, cpu = loader_rate(path, 5, num_batches, num_workers)
      where = ('threads in the calling process' if num_workers == 0 else
               f'{num_workers} worker processes')
      cost = f'; {cpu / 5 * 1000:.0f} ms CPU per pair' if num_workers == 0 else ''
      lines.append(f'| loader, 480 px, batches of 5 (the reference positives), full augmentation, '
                   f'{where} | {rate:.2f} batches/s = {5 * rate:.1f} pairs/s wall{cost} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  print(main(quick=False))
