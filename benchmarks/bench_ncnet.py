"""The NC-Net matcher against the transformer, per pair at the Tokyo 24/7 shapes (480 x 640 -> 30 x 40).

For each matcher: XLA's FLOPs and temporary bytes of the compiled pair function of the inference engine
(`cost_analysis`, `memory_analysis`), the time per pair at batch 1 on one device, and the size of one
4-D tensor (one channel of the correlation, hA wA hB wB float32 values) and of the widest consensus
activation. NC-Net dense (NeighConsensus 3, 3, 3 / 16, 16, 1, the ncnet_coco.py layers) and relocalised
(the correlation max-pooled by 2 before the consensus), in its 4-D and 3-D convolution forms, and the
lighter 3, 3 / 16, 1 (the demo's).
"""
import time

import jax
import numpy as np

from segswap_jax import features as features_lib
from segswap_jax import inference
from segswap_jax import model as model_lib

TOKYO_CELLS = (30, 40)


def _matchers(quick: bool):
  small = model_lib.model_config('small')
  yield 'transformer small [I C I C I N]', small
  for kernels, channels in (((3, 3, 3), (16, 16, 1)), ((3, 3), (16, 1))):
    for relocalization in (0, 2):
      for conv in ('4d', '3d'):
        if quick and conv == '3d' and (relocalization or len(kernels) == 2):
          continue
        config = model_lib.model_config('small', arch='ncnet')
        config.ncnet_kernel_sizes, config.ncnet_channels = kernels, channels
        config.ncnet_relocalization, config.ncnet_conv = relocalization, conv
        label = (f'NC-Net {"/".join(map(str, kernels))} : {"/".join(map(str, channels))}, '
                 f'{"relocalised (k=2)" if relocalization else "dense"}, Conv4d {conv}')
        yield label, config


def _analysis(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  temp = getattr(memory, 'temp_size_in_bytes', None) if memory is not None else None
  return float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0)), temp


def measure(config, cells, repeats: int = 2):
  params = jax.tree.map(np.asarray, model_lib.init_params(config, jax.random.key(0)))
  model = inference.SegSwap(params, config, devices=jax.local_devices()[:1])
  h, w = cells
  feats = features_lib.l2_normalize(jax.random.normal(jax.random.key(1), (1, h, w, config.feature_dim)))
  compiled = model.functions.pair.lower(model.variables['matcher'], feats, feats, None, None).compile()
  flops, bytes_accessed, temp = _analysis(compiled)
  jax.block_until_ready(model.pair(feats, feats))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(model.pair(feats, feats))
    times.append(time.perf_counter() - start)
  return min(times), flops, bytes_accessed, temp


def main(quick: bool = False) -> str:
  cells = (15, 20) if quick else TOKYO_CELLS
  h, w = cells
  corr_mb = h * w * h * w * 4 / 2 ** 20
  lines = [f'pair at {h * 16} x {w * 16} ({h} x {w} cells, {h * w} cells per image), batch 1, one '
           f'{jax.devices()[0].platform} device; one 4-D tensor (one channel of the correlation): '
           f'{corr_mb:.1f} MiB, relocalised {corr_mb / 16:.2f} MiB', '',
           '| matcher | s / pair | GFLOP / pair | GB accessed | XLA temp memory | widest 4-D activation |',
           '|---|---:|---:|---:|---:|---:|']
  for label, config in _matchers(quick):
    seconds, flops, bytes_accessed, temp = measure(config, cells, repeats=1 if not quick else 2)
    widest = ''
    if config.arch == 'ncnet':
      cells_4d = h * w * h * w / (16 if config.ncnet_relocalization else 1)
      widest = f'{cells_4d * max(config.ncnet_channels) * 4 / 2 ** 20:.0f} MiB'
    lines.append(f'| {label} | {seconds:.3f} | {flops / 1e9:.1f} | {bytes_accessed / 1e9:.2f} | '
                 f'{"" if temp is None else f"{temp / 2 ** 20:.0f} MiB"} | {widest} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  print(main())
