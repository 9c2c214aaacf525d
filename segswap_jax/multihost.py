"""The cross-process operations the CLIs need; each is a no-op (or the identity) with one process.

Every function but `initialize_distributed` and `query_shard` is collective: all JAX processes call it,
in the same order.
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from segswap_jax import errors


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


def initialize_distributed(coordinator_address: Optional[str], num_processes: int, process_id: int,
                           auto: bool = False) -> None:
  """Joins a multi-process run (the same command on every host, one process id each); no-op for one.

  `auto` lets `jax.distributed.initialize()` detect the cluster (TPU pods, SLURM, ...).
  """
  if auto:
    jax.distributed.initialize()
  elif num_processes > 1:
    if not coordinator_address:
      raise errors.ConfigError('--num-processes > 1 needs --coordinator-address HOST:PORT')
    if not 0 <= process_id < num_processes:
      raise errors.ConfigError(f'--process-id {process_id} is not in [0, {num_processes})')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def query_shard(num_queries: int, process_index: Optional[int] = None,
                process_count: Optional[int] = None) -> np.ndarray:
  """The queries this process scores: every process_count-th, starting at its index."""
  pid = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return np.arange(pid, num_queries, count)


def gather_rows(local: np.ndarray, num_queries: int) -> np.ndarray:
  """Reassembles per-query rows scored by `query_shard` on every process (every process gets all).

  Args:
    local: `(len(query_shard(num_queries)), ...)` this process's rows, in its query order.
  Returns:
    `(num_queries, ...)` rows in query order.
  """
  count = jax.process_count()
  if count == 1:
    return local
  gathered = concat_over_processes(local)   # process 0's rows, then process 1's, ...
  out = np.empty((num_queries,) + local.shape[1:], local.dtype)
  out[np.concatenate([query_shard(num_queries, pid, count) for pid in range(count)])] = gathered
  return out
