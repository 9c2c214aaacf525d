"""The grain input pipeline over `segswap_pairs` (docs/INTERFACES.md "Training batches").

  it = make_train_loader(path, per_device_batch=5, num_devices=jax.local_device_count(), seed=0)
  batch = next(it)   # numpy dict, every array with leading (D, B) axes

  make_train_loader(data_dir, *, per_device_batch, num_devices=None, seed=0, image_size=None,
                    augment_config=AugmentConfig(), num_epochs=None, num_workers=0, worker_buffer=2,
                    num_threads=8, shard_options=None, split='train') -> grain.DatasetIterator
  make_eval_loader(data_dir, *, per_device_batch, num_devices=None, image_size=None,
                   split='validation', style_variants=False, num_workers=0, shard_options=None,
                   drop_remainder=False) -> grain.DatasetIterator (one pass, in order)

`data_dir` is a dataset directory as returned by `generate.generate` (.../segswap_pairs/SOURCE/VERSION),
or the DATA_DIR given to it when it holds one dataset.
Batches: image_a, image_b float32 (D, B, H, W, 3) ImageNet-normalised; corr_a, corr_b float32
(D, B, h, w, 2); mask_a, mask_b float32 (D, B, h, w); pad_b bool (D, B, h, w) (True = background token
of B removed as a key). Positives only: the in-batch negatives and the per-batch A/B swap of docs/reference.md §2 are
formed in the jitted train step, which sees the whole batch.

Pipeline: ArrayRecord source (JPEG bytes, decoded only for the image each sample uses) -> shuffle (a
new order each epoch) -> per-sample augmentation (`augment.augment_pair`, seeded by (seed, position in
the shuffled stream), so batches do not depend on the number of workers) -> this process's share ->
batch D * B, reshape to (D, B, ...); samples are made in `num_workers` prefetching processes (0 =
threads in this process).
Sharding (`grain.sharding.ShardByJaxProcess` by default) is topology-independent for training: the
shuffled, augmented stream is cut into global batches of (processes x D x B) samples and process p
reads rows [p * D * B, (p + 1) * D * B) of each, i.e. the samples of its devices in the global device
order. So 2 processes x 2 devices see exactly the batches of 1 process x 4 devices, and every pair is
read once per epoch by exactly one process. Evaluation loaders take every N-th pair per process.
Exact resume: `it.get_state()` / `it.set_state(state)`, or with Orbax
`ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))` and `CheckpointRestore(it)`.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence

import grain
import numpy as np

from data_pipeline import augment
from data_pipeline import builder
from segswap_jax.errors import DataError


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; outside `absl.app.run` nobody parsed them."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def stack_batch(samples: Sequence[Dict[str, np.ndarray]], num_devices: int
                ) -> Dict[str, np.ndarray]:
  """D * B samples -> one dict of arrays with leading (D, B) axes."""
  per_device = len(samples) // num_devices
  return {key: np.stack([s[key] for s in samples]).reshape(num_devices, per_device,
                                                            *samples[0][key].shape)
          for key in samples[0]}


def _default_num_devices() -> int:
  import jax
  return jax.local_device_count()


def _shard(dataset: grain.MapDataset, shard_options) -> grain.MapDataset:
  """This process's share for evaluation: positions index, index + count, ... (equal shares if
  drop_remainder)."""
  shard_options = _shard_options(shard_options)
  index, count = shard_options.shard_index, shard_options.shard_count
  if count == 1:
    return dataset
  sharded = dataset.slice(slice(index, None, count))
  if shard_options.drop_remainder:
    sharded = sharded.slice(slice(0, len(dataset) // count))
  return sharded


def _shard_options(shard_options):
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if not 0 <= shard_options.shard_index < shard_options.shard_count:
    raise DataError(f'shard index {shard_options.shard_index} is not in [0, {shard_options.shard_count})')
  return shard_options


def _global_position(local: int, *, local_batch: int, process: int, num_processes: int) -> int:
  """Position in the global stream of this process's `local`-th sample (see the module doc)."""
  batch, row = divmod(local, local_batch)
  return (batch * num_processes + process) * local_batch + row


def _read_at(position: int, *, dataset: grain.MapDataset):
  return dataset[position]


def _process_share(dataset: grain.MapDataset, shard_options, local_batch: int) -> grain.MapDataset:
  """This process's rows of every global batch of `dataset` (the last partial global batch dropped)."""
  index, count = shard_options.shard_index, shard_options.shard_count
  if count == 1:
    return dataset
  num_global_batches = len(dataset) // (local_batch * count)
  position = functools.partial(_global_position, local_batch=local_batch, process=index,
                               num_processes=count)
  return (grain.MapDataset.range(num_global_batches * local_batch).map(position)
          .map(functools.partial(_read_at, dataset=dataset)))


def _image_size(path: str, image_size: Optional[int]) -> int:
  stored = builder.image_size(path)
  if image_size is None:
    if stored is None:
      raise DataError(f'{path}: no image_size in the dataset metadata; pass image_size=')
    return stored
  if stored is not None and stored != image_size:
    raise DataError(f'{path} holds {stored}x{stored} pairs, the loader was asked for '
                    f'{image_size}x{image_size}')
  return image_size


def _finish(dataset: grain.MapDataset, batch_size: int, num_devices: int, drop_remainder: bool,
            num_workers: int, worker_buffer: int, num_threads: int):
  """Reads, prefetches samples in worker processes, and batches in this process.

  Batching after the workers keeps the batches independent of `num_workers` (grain hands worker w the
  samples w, w + N, ... and interleaves them back in order).
  """
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(num_threads, 2 * batch_size)))
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=worker_buffer * batch_size))
  iter_dataset = iter_dataset.batch(batch_size, drop_remainder=drop_remainder,
                                    batch_fn=functools.partial(stack_batch, num_devices=num_devices))
  return iter(iter_dataset)


def make_train_loader(data_dir: str, *, per_device_batch: int, num_devices: Optional[int] = None,
                      seed: int = 0, image_size: Optional[int] = None,
                      augment_config: augment.AugmentConfig = augment.AugmentConfig(),
                      num_epochs: Optional[int] = None, num_workers: int = 0, worker_buffer: int = 2,
                      num_threads: int = 8, shard_options=None, split: str = 'train'):
  """Endless (or `num_epochs`) shuffled, augmented training batches `(D, B, ...)`; see module doc.

  Args:
    data_dir: dataset directory (.../segswap_pairs/SOURCE/VERSION).
    per_device_batch: B, positive pairs per device.
    num_devices: D; default `jax.local_device_count()`.
    seed: shuffling and augmentation seed; the same seed gives the same batches.
    image_size: expected side of the stored pairs (checked); default: the stored size.
    augment_config: docs/reference.md §2 probabilities.
    num_epochs: None = repeat forever.
    num_workers: prefetching worker processes (0: threads of this process).
    worker_buffer: batches' worth of samples buffered per worker.
    num_threads: reading threads (per worker).
    shard_options: `grain.sharding.ShardOptions`; default `ShardByJaxProcess(drop_remainder=True)`.
    split: which split to read.

  Returns:
    A grain `DatasetIterator` (with `get_state` / `set_state`) of numpy dicts.
  """
  num_devices = num_devices or _default_num_devices()
  data_dir = builder.resolve_dataset_dir(data_dir)
  size = _image_size(data_dir, image_size)
  shard_options = _shard_options(shard_options)
  local_batch = per_device_batch * num_devices
  dataset = grain.MapDataset.source(builder.data_source(data_dir, split))
  if len(dataset) < local_batch * shard_options.shard_count:
    raise DataError(f'{data_dir} [{split}] has {len(dataset)} pairs, fewer than one global batch of '
                    f'{shard_options.shard_count} process(es) x {num_devices} x {per_device_batch}')
  dataset = dataset.shuffle(seed=seed).repeat(num_epochs)
  dataset = dataset.random_map(
      functools.partial(_augment, config=augment_config, image_size=size), seed=seed)
  dataset = _process_share(dataset, shard_options, local_batch)
  return _finish(dataset, per_device_batch * num_devices, num_devices, True, num_workers,
                 worker_buffer, num_threads)


def _augment(example, rng, *, config, image_size):
  return augment.augment_pair(example, rng, config, image_size)


def _eval(index, example, *, image_size, style_variants):
  return augment.eval_pair(example, index, image_size, style_variants)


def make_eval_loader(data_dir: str, *, per_device_batch: int, num_devices: Optional[int] = None,
                     image_size: Optional[int] = None, split: str = 'validation',
                     style_variants: bool = False, num_workers: int = 0, num_threads: int = 8,
                     shard_options=None, drop_remainder: bool = False):
  """One in-order pass of unaugmented batches `(D, B, ...)` (`pad_b` all False).

  `style_variants` cycles the styled images as the reference's validation does (pair i: index % 4).
  The last batch is smaller unless `drop_remainder` (its leading axes are still (D, B') when the
  remainder divides by D; otherwise it is dropped: pad it yourself for static shapes).
  """
  num_devices = num_devices or _default_num_devices()
  data_dir = builder.resolve_dataset_dir(data_dir)
  size = _image_size(data_dir, image_size)
  dataset = _shard(grain.MapDataset.source(builder.data_source(data_dir, split)), shard_options)
  dataset = dataset.map_with_index(
      functools.partial(_eval, image_size=size, style_variants=style_variants))
  batch_size = per_device_batch * num_devices
  if not drop_remainder and len(dataset) % batch_size % num_devices:
    drop_remainder = True  # a ragged last batch cannot take the (D, B) shape
  return _finish(dataset, batch_size, num_devices, drop_remainder, num_workers, 2, num_threads)
