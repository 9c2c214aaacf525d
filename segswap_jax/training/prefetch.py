"""Batches on the devices ahead of the step, without losing the data iterator's exact position.

The train step is dispatched asynchronously, so while step k runs the host can read, augment and copy
batches k+1 and k+2 to the devices; the step then never waits for a host-to-device copy. Prefetching
moves the grain iterator ahead of the batches the step has consumed, so a checkpoint must not save the
iterator's own state: `DevicePrefetch.get_state()` is the state right after the last batch handed out,
the one a resume must continue from (what `grain.checkpoint.CheckpointSave` stores).
"""
from __future__ import annotations

import collections
import json
from typing import Dict, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class DevicePrefetch:
  """Wraps a grain iterator of per-device batches `{name: (D, B, ...)}`.

  Args:
    iterator: the grain DatasetIterator (`get_state()` / `set_state()`).
    size: batches kept on the devices ahead of the one being consumed (0: plain host batches).
    devices: the local devices, in the order the pmapped step uses.
  """

  def __init__(self, iterator, size: int, devices: Sequence[jax.Device]):
    self._iterator = iterator
    self._size = int(size)
    self._sharding = NamedSharding(Mesh(np.array(list(devices)), ('devices',)), PartitionSpec('devices'))
    self._queue = collections.deque()   # (device batch, iterator state after it)
    self._state = iterator.get_state()

  def _put(self, batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    return {k: jax.device_put(v, self._sharding) for k, v in batch.items()}

  def __iter__(self) -> Iterator[Dict[str, jax.Array]]:
    return self

  def __next__(self) -> Dict[str, jax.Array]:
    if self._size == 0:
      batch = next(self._iterator)
      self._state = self._iterator.get_state()
      return batch
    while len(self._queue) <= self._size:
      batch = next(self._iterator)
      self._queue.append((self._put(batch), self._iterator.get_state()))
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self) -> bytes:
    """The iterator's state after the last batch handed out (bytes, as grain's checkpoint handler takes
    from iterators other than its own; the same JSON it writes for those)."""
    state = self._state
    return state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()
