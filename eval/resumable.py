"""Per-query results of a long evaluation, saved as they come so that an interrupted run resumes.

Each process keeps its own file `<work_dir>/process_<i>.npz` holding, for its queries, fixed-shape
arrays per query plus a `done` flag, and a `key`: everything that determines the numbers (the model's
fingerprint, the data, the settings). Results written under another key are never reused: the run
starts over, saying which part of the key differs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Sequence, Tuple

import numpy as np

from segswap_jax.errors import DataError


class QueryProgress:
  """Fixed-shape result arrays for `num_queries` local queries, checkpointed to disk.

  Args:
    work_dir: folder for the partial files (created).
    process_index: this process (one file per process).
    fields: name -> (shape per query, dtype).
    num_queries: local queries.
    key: JSON-able dict of what determines the numbers; a stored file with another key is discarded.
    save_every_s: minimum seconds between saves (the last save is forced by `flush`).
  """

  def __init__(self, work_dir: str, process_index: int, fields: Dict[str, Tuple[Sequence[int], str]],
               num_queries: int, key: Dict, save_every_s: float = 30.0):
    os.makedirs(work_dir, exist_ok=True)
    self.path = os.path.join(work_dir, f'process_{process_index}.npz')
    self.key = json.dumps(key, sort_keys=True)
    self.save_every_s = save_every_s
    self._last_save = time.monotonic()
    self.arrays = {name: np.zeros((num_queries, *shape), dtype) for name, (shape, dtype) in fields.items()}
    self.done = np.zeros(num_queries, bool)
    if os.path.exists(self.path):
      self._load()

  def _load(self) -> None:
    try:
      with np.load(self.path) as stored:
        stored_key = str(stored['key'])
        arrays = {name: stored[name] for name in self.arrays}
        done = stored['done']
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f'cannot resume from {self.path} ({e}); delete it to start over') from None
    if stored_key != self.key:
      print(f'note: {self.path} holds results of another run (differs in: {_differing(stored_key, self.key)}); '
            'starting over', file=sys.stderr, flush=True)
      return
    if done.shape != self.done.shape or any(arrays[n].shape != a.shape for n, a in self.arrays.items()):
      raise DataError(f'{self.path} has results of another shape; delete it to start over')
    self.arrays, self.done = arrays, done

  def set(self, index: int, **values) -> None:
    for name, value in values.items():
      self.arrays[name][index] = value
    self.done[index] = True
    if time.monotonic() - self._last_save > self.save_every_s:
      self.flush()

  def flush(self) -> None:
    tmp = self.path + '.tmp.npz'
    np.savez(tmp, key=np.array(self.key), done=self.done, **self.arrays)
    os.replace(tmp, self.path)
    self._last_save = time.monotonic()


def _differing(stored_key: str, key: str) -> str:
  """The top-level entries in which two JSON keys differ, for messages."""
  try:
    stored, current = json.loads(stored_key), json.loads(key)
  except ValueError:
    return 'its settings'
  if not isinstance(stored, dict) or not isinstance(current, dict):
    return 'its settings'
  return ', '.join(sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))) or 'its settings'
