"""Jitted pair forward (backbone on both images + transformer) at 480x640: pairs/s and FLOP/s vs peak."""
import jax
import jax.numpy as jnp

from benchmarks import bench_matmul_peak, timing
from segswap_jax import model as model_lib


def make_pair_forward(config):
  backbone = model_lib.build_backbone(config)
  transformer = model_lib.build_transformer(config)

  def forward(params, images_a, images_b):
    both = jnp.concatenate([images_a, images_b])
    feats = model_lib.l2_normalize(backbone.apply(params['backbone'], model_lib.normalize_images(both)))
    feat_a, feat_b = jnp.split(feats, 2)
    return transformer.apply(params['transformer'], feat_a, feat_b)

  return jax.jit(forward)


def main(quick: bool = False) -> str:
  config = model_lib.model_config('small')
  params = model_lib.init_params(config, jax.random.key(0))
  forward = make_pair_forward(config)
  peak = bench_matmul_peak.measure_peak_gflops()
  height, width = (240, 320) if quick else (480, 640)
  rows = [f'machine fp32 matmul peak: {peak:.1f} GFLOP/s; input {height}x{width}, small transformer', '',
          '| batch (pairs) | s / batch | pairs/s | GFLOP / pair | achieved GFLOP/s | % of peak |',
          '|---|---|---|---|---|---|']
  for batch in ((1, 8) if quick else (1, 8, 32)):
    images = jax.random.randint(jax.random.key(batch), (batch, height, width, 3), 0, 256).astype(jnp.uint8)
    flops = timing.compiled_flops(forward, params, images, images)
    best, _ = timing.time_call(forward, params, images, images, repeats=2 if batch >= 8 else 3)
    achieved = flops / best / 1e9
    rows.append(f'| {batch} | {best:.2f} | {batch / best:.2f} | {flops / batch / 1e9:.1f} | {achieved:.1f} | '
                f'{100 * achieved / peak:.0f}% |')
  return '\n'.join(rows)
