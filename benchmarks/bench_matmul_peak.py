"""The machine's measured fp32 matmul peak (GFLOP/s): the yardstick for every achieved-FLOP/s figure."""
import jax
import jax.numpy as jnp

from benchmarks import timing


def measure_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  best, _ = timing.time_call(matmul, a, b, repeats=repeats)
  return 2 * n ** 3 / best / 1e9


def main(quick: bool = False) -> str:
  sizes = (1024, 2048) if quick else (1024, 2048, 4096)
  rows = [f'| {n} x {n} x {n} | {measure_peak_gflops(n, 3 if n == 4096 else 5):.1f} |' for n in sizes]
  return '\n'.join(['| fp32 matmul | GFLOP/s (best of repeats) |', '|---|---|'] + rows)
