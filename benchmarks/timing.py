"""Shared timing helpers for the benchmarks: compile once, then time steady-state calls."""
import time
from typing import Callable, Tuple

import jax


def compiled_flops(jitted: Callable, *args) -> float:
  """FLOPs XLA counts for one call of `jitted(*args)` (from the compiled cost analysis)."""
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get('flops', 0.0))


def time_call(fn: Callable, *args, repeats: int = 3, warmup: int = 1) -> Tuple[float, float]:
  """(best, mean) seconds per call after `warmup` calls, blocking on the results."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times), sum(times) / len(times)
