"""The few cross-process operations the CLIs need; each is a no-op (or the identity) with one process.

Every function is collective: all JAX processes call it, in the same order.
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np


def barrier(tag: str) -> None:
  """Blocks until every process reaches the same tag."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)


def any_process(flag: bool) -> bool:
  """True when `flag` is set in any process (the same answer everywhere)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)]))))


def from_first_process(value: Optional[float]) -> float:
  """Process 0's `value` in every process (the others may pass None)."""
  if jax.process_count() == 1:
    return float(value)
  from jax.experimental import multihost_utils
  return float(multihost_utils.broadcast_one_to_all(np.float64(value if value is not None else 0.0)))


def concat_over_processes(rows: np.ndarray) -> np.ndarray:
  """Every process's `rows` `(n_p, ...)` (lengths may differ), concatenated in process order."""
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils
  sizes = np.asarray(multihost_utils.process_allgather(np.array([len(rows)]))).reshape(-1)
  padded = np.zeros((int(sizes.max()),) + rows.shape[1:], rows.dtype)
  padded[:len(rows)] = rows
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return np.concatenate([part[:int(n)] for part, n in zip(gathered, sizes)])
