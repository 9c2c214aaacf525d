"""Pair forward (backbone on both images + transformer) at 480x640 through the inference engine:
pairs/s and achieved FLOP/s vs the machine's matmul peak."""
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_matmul_peak, timing
from segswap_jax import inference
from segswap_jax import model as model_lib


def pair_forward(model: inference.SegSwap, images_a, images_b):
  """Backbone features of both sides in one call, then the pair: what predict runs per target."""
  batch = images_a.shape[0]
  feats = model.features(jnp.concatenate([images_a, images_b]), batch_size=2 * batch)
  return model.pair(feats[:batch], feats[batch:])


def forward_flops(model: inference.SegSwap, images_a, images_b) -> float:
  """XLA's FLOP count of the two compiled engine calls of `pair_forward`."""
  both = jnp.concatenate([images_a, images_b])
  feats = model.features(both, batch_size=len(both))
  batch = images_a.shape[0]
  fn = model.functions
  return (timing.compiled_flops(fn.features, model.variables['backbone'], both, 'imagenet')
          + timing.compiled_flops(fn.pair, model.variables['matcher'], feats[:batch], feats[batch:], None, None))


def main(quick: bool = False) -> str:
  config = model_lib.model_config('small')
  params = model_lib.init_params(config, jax.random.key(0))
  model = inference.SegSwap(params, config, devices=jax.local_devices()[:1])
  peak = bench_matmul_peak.measure_peak_gflops()
  height, width = (240, 320) if quick else (480, 640)
  rows = [f'machine fp32 matmul peak: {peak:.1f} GFLOP/s; input {height}x{width}, small transformer', '',
          '| batch (pairs) | s / batch | pairs/s | GFLOP / pair | achieved GFLOP/s | % of peak |',
          '|---|---|---|---|---|---|']
  for batch in ((1, 8) if quick else (1, 8, 32)):
    images = jax.random.randint(jax.random.key(batch), (batch, height, width, 3), 0, 256).astype(jnp.uint8)
    flops = forward_flops(model, images, images)
    run = lambda: jax.block_until_ready(pair_forward(model, images, images))
    best, _ = timing.time_call(run, repeats=2 if batch >= 8 else 3)
    achieved = flops / best / 1e9
    rows.append(f'| {batch} | {best:.2f} | {batch / best:.2f} | {flops / batch / 1e9:.1f} | {achieved:.1f} | '
                f'{100 * achieved / peak:.0f}% |')
  return '\n'.join(rows)
