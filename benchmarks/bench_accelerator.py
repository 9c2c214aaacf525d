"""The compute at the real shapes, on whatever devices are present: `python -m benchmarks.run --only accelerator`.

For each program: XLA's FLOPs and bytes accessed (`cost_analysis`), its memory (`memory_analysis`: what
the executable allocates), the time per call after compilation (and the compile time), achieved FLOP/s
and the fraction of the device's peak (MFU; the peak of the compute dtype: the vendor's dense figure
for known accelerators, a measured matmul peak on CPUs).

  pair forward       480x640 pairs: backbone of both images + the small transformer, float32 / bfloat16;
  candidate scoring  one Tokyo query (480x640) against cached candidates, per candidate:
                     "today"     the whole transformer per pair, attention written out (the scorer before
                                 the compute policy and the split),
                     "hoisted"   the query's pair-independent part once per query (cache_format backbone),
                     "projected" the candidate's too, read from the token cache (cache_format projected);
                     in batches (32 requested -> 4 x 25) and at batch 1, float32 and bfloat16;
  train step         the coco recipe (480x480, 5 positives + 15 negatives per device, frozen ResNet-50),
                     float32 with attention-weight dropout (the reference) vs bfloat16 without it,
                     threefry vs rbg dropout bits.
Plus the Tokyo 24/7 re-rank (31.5k candidate features + 31.5k pair scores) extrapolated from the figures.
Random weights: speed does not depend on them. `--quick`: smaller shapes, fewer repeats.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import random_batches, timing
from benchmarks.bench_scoring import _random_params
from configs import coco
from segswap_jax import features as features_lib
from segswap_jax import inference
from segswap_jax import model as model_lib
from segswap_jax import scoring
from segswap_jax.training import config as config_lib
from segswap_jax.training import step as step_lib

TOKYO_PAIRS = 31_500

# Dense peak FLOP/s per chip by device kind (vendor figures, no sparsity): (float32, bfloat16).
# float32 on NVIDIA counts TF32 tensor cores, which XLA uses for float32 matmuls by default.
KNOWN_PEAKS = {
    'H100': (494.7e12, 989.4e12), 'H200': (494.7e12, 989.4e12), 'A100': (156e12, 312e12),
    'L4': (60e12, 121e12), 'TPU v4': (275e12, 275e12), 'TPU v5 lite': (197e12, 197e12),
    'TPU v5': (459e12, 459e12), 'TPU v6 lite': (918e12, 918e12),
}


def device_peak(dtype: str) -> tuple:
  """(peak FLOP/s of one device for `dtype` matmuls, where the figure comes from)."""
  device = jax.devices()[0]
  for kind, peaks in KNOWN_PEAKS.items():
    if kind.lower() in device.device_kind.lower():
      return peaks[dtype == 'bfloat16'], f'{kind} dense {dtype} (vendor)'
  n = 1024 if device.platform == 'cpu' else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  best, _ = timing.time_call(jax.jit(jnp.matmul), a, a, repeats=3)
  return 2 * n ** 3 / best, f'measured {n}^3 {dtype} matmul'


def analyse(jitted, *args) -> Dict[str, float]:
  """Compile `jitted(*args)` once: FLOPs, bytes accessed, memory of the executable, compile seconds."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  total = None
  if memory is not None:
    total = sum(getattr(memory, f, 0) or 0 for f in ('argument_size_in_bytes', 'output_size_in_bytes',
                                                     'temp_size_in_bytes', 'generated_code_size_in_bytes'))
  return {'flops': float(cost.get('flops', 0.0)), 'bytes': float(cost.get('bytes accessed', 0.0)),
          'memory': total, 'compile_s': compile_s, 'compiled': compiled}


def _gb(x: Optional[float]) -> str:
  return '' if x is None else f'{x / 1e9:.2f}'


def _row(name, figures, seconds, per, peak) -> str:
  flops = figures['flops'] / per
  achieved = figures['flops'] / seconds
  return (f'| {name} | {seconds / per * 1e3:.1f} | {per / seconds:.2f} | {flops / 1e9:.2f} | '
          f'{figures["bytes"] / per / 1e9:.2f} | {achieved / 1e12:.3f} | {100 * achieved / peak:.1f}% | '
          f'{_gb(figures["memory"])} | {figures["compile_s"]:.1f} |')


HEADER = ('| program | ms / item | items / s | GFLOP / item | GB accessed / item | TFLOP/s | MFU | '
          'executable memory GB | compile s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|')


def _legacy_score(config):
  """The scorer as it was before the compute policy and the split: the whole transformer per pair
  (the query's projection and first I layer too), attention written out."""
  matcher = model_lib.build_matcher(dict_with(config, attention_impl='einsum'))

  def score(matcher_vars, feat_q, mask_q, cell_mask, feat_d, valid):
    feat_d = features_lib.l2_normalize(feat_d.astype(jnp.float32))
    batch = feat_d.shape[0]
    feat_qb = jnp.broadcast_to(feat_q, (batch,) + feat_q.shape)
    out_q, out_d = matcher.apply(matcher_vars, feat_qb, feat_d, train=False)
    weight = scoring.transported_mask(jnp.broadcast_to(mask_q, (batch,) + mask_q.shape), out_q, out_d)
    return jnp.where(valid, scoring.pair_score(feat_qb, feat_d, out_q, weight, cell_mask), -jnp.inf)

  return jax.jit(score)


def dict_with(config, **values):
  config = config.copy_and_resolve_references()
  for k, v in values.items():
    config[k] = v
  return config


def pair_forward(params, base, size, batch, repeats, peaks):
  rows = []
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2 * batch, *size, 3), dtype=np.uint8)
  for dtype in ('float32', 'bfloat16'):
    config = dict_with(base, compute_dtype=dtype)
    model = inference.SegSwap(params, config)
    backbone = model_lib.build_backbone(config)
    matcher = model_lib.build_matcher(config)

    def forward(variables, images):
      feats = features_lib.backbone_features(backbone, variables['backbone'], images)
      return matcher.apply(variables['matcher'], feats[:batch], feats[batch:], train=False)

    jitted = jax.jit(forward)
    figures = analyse(jitted, model.variables, images)
    seconds, _ = timing.time_call(figures['compiled'], model.variables, images, repeats=repeats)
    rows.append(_row(f'pair forward {size[0]}x{size[1]}, batch {batch}, {dtype}', figures, seconds, batch,
                     peaks[dtype][0]))
  return rows


def candidate_scoring(params, base, size, num_candidates, requested, repeats, peaks):
  """Rows per scorer and dtype; returns (rows, {name: seconds per candidate})."""
  rows, per_candidate = [], {}
  h, w = size[0] // 16, size[1] // 16
  rng = np.random.default_rng(1)
  feats = rng.standard_normal((num_candidates, h, w, base.feature_dim)).astype(np.float32)
  feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
  cached = feats.astype(np.float16)
  for dtype in ('float32', 'bfloat16'):
    config = dict_with(base, compute_dtype=dtype)
    # One device: XLA's cost analysis of a sharded program counts one device's share.
    model = inference.SegSwap(params, config, devices=jax.local_devices()[:1])
    tokens = np.asarray(model.tokens(cached)).astype(np.float16)
    for batch_request in (requested, 1):
      batch = inference.balanced_batch_size(num_candidates, batch_request, model.num_devices)
      valid = model._sharded(np.ones(batch, bool))
      query = model._query(feats[0])
      mask_q = model.functions.query_mask(model.variables['matcher'], query, jnp.ones((h, w)))
      cells = jnp.ones((h, w), bool)
      side = lambda with_tokens: ({'features': model._sharded(cached[:batch]),
                                   **({'tokens': model._sharded(tokens[:batch])} if with_tokens else {})})
      variants = [('hoisted', lambda: side(False)), ('projected', lambda: side(True))]
      legacy = _legacy_score(config)
      legacy_args = (model.variables['matcher'], jnp.asarray(feats[0]), mask_q, cells,
                     model._sharded(cached[:batch]), valid)
      figures = analyse(legacy, *legacy_args)
      seconds, _ = timing.time_call(figures['compiled'], *legacy_args, repeats=repeats)
      name = f'today, batch {batch}, {dtype}'
      per_candidate[name] = seconds / batch
      rows.append(_row(f'scoring: {name}', figures, seconds, batch, peaks[dtype][0]))
      for variant, candidates in variants:
        args = (model.variables['matcher'], query, mask_q, cells, candidates(), valid)
        figures = analyse(model.functions.score, *args, False)
        seconds, _ = timing.time_call(figures['compiled'], *args, repeats=repeats)
        name = f'{variant}, batch {batch}, {dtype}'
        per_candidate[name] = seconds / batch
        rows.append(_row(f'scoring: {name}', figures, seconds, batch, peaks[dtype][0]))
  return rows, per_candidate


def train_step(size, repeats, peaks, time_it=True):
  rows = []
  variants = [('float32, attention dropout, threefry (the reference)', 'float32', True, 'threefry', 'einsum'),
              ('float32, no attention dropout, threefry', 'float32', False, 'threefry', 'xla'),
              ('bfloat16, no attention dropout, threefry', 'bfloat16', False, 'threefry', 'xla'),
              ('bfloat16, no attention dropout, rbg', 'bfloat16', False, 'rbg', 'xla')]
  figures_of = {}
  for name, dtype, attention_dropout, rng_impl, impl in variants:
    config = coco.get_config()
    config.data.image_size = size
    config.model.compute_dtype = dtype
    config.model.attention_dropout = attention_dropout
    config.model.attention_impl = impl
    config.dropout_rng_impl = rng_impl
    model_config = config_lib.build_model_config(config)
    settings = config_lib.training_settings(config)
    params = _random_params(model_config)
    state, frozen = step_lib.create_train_state(params, settings)
    step = jax.jit(step_lib.make_train_step(model_config, settings, axis_name=None))
    batch = random_batches.random_batch(config.batch_pos, size)
    figures = analyse(step, state, batch, frozen)
    figures_of[name] = figures
    if time_it:
      seconds, _ = timing.time_call(figures['compiled'], state, batch, frozen, repeats=repeats)
      rows.append(_row(f'train step {size}x{size}: {name}', figures, seconds, 1, peaks[dtype][0]))
    else:
      rows.append(f'| train step {size}x{size}: {name} | | | {figures["flops"] / 1e9:.1f} | '
                  f'{figures["bytes"] / 1e9:.2f} | | | {_gb(figures["memory"])} | {figures["compile_s"]:.1f} |')
  first, last = figures_of[variants[0][0]], figures_of[variants[-1][0]]
  note = (f'train step bytes accessed: {first["bytes"] / 1e9:.1f} GB (the reference recipe) -> '
          f'{last["bytes"] / 1e9:.1f} GB (bfloat16, no attention dropout, rbg): '
          f'{100 * (1 - last["bytes"] / first["bytes"]):.0f}% less; FLOPs {first["flops"] / 1e12:.3f} -> '
          f'{last["flops"] / 1e12:.3f} TFLOP')
  return rows, note


def main(quick: bool = False) -> str:
  device = jax.devices()[0]
  peaks = {dtype: device_peak(dtype) for dtype in ('float32', 'bfloat16')}
  base = model_lib.model_config('small')
  params = _random_params(base)
  size = (240, 320) if quick else (480, 640)
  cpu = device.platform == 'cpu'
  lines = [f'device: {jax.device_count()} x {device.platform} ({device.device_kind}); peaks: '
           + '; '.join(f'{d} {p / 1e12:.3f} TFLOP/s ({how})' for d, (p, how) in peaks.items()), '', HEADER]
  lines += pair_forward(params, base, size, 1 if cpu else 8, 2 if cpu else 10, peaks)
  score_rows, per_candidate = candidate_scoring(params, base, size, 16 if quick else 100, 8 if quick else 32,
                                                3 if cpu else 10, peaks)
  lines += score_rows
  step_rows, step_note = train_step(240 if quick else 480, 1 if cpu else 5, peaks)
  lines += step_rows
  lines += ['', step_note]
  batched = inference.balanced_batch_size(16 if quick else 100, 8 if quick else 32, 1)
  for dtype in ('float32', 'bfloat16'):
    today = per_candidate[f'today, batch {batched}, {dtype}']
    today_1 = per_candidate[f'today, batch 1, {dtype}']
    best = min((v, k) for k, v in per_candidate.items() if k.endswith(dtype))
    lines.append(f'{dtype} candidates/s vs today\'s batched scorer: '
                 + ', '.join(f'{k.split(",")[0]} (batch {k.split("batch ")[1].split(",")[0]}) '
                             f'{today / v:.2f}x' for k, v in per_candidate.items()
                             if k.endswith(dtype) and not k.startswith('today'))
                 + f'; today\'s batch-1 loop {today / today_1:.2f}x; fastest: {best[1]}')
  # Tokyo: every candidate's features once (backbone alone, batched), then 31.5k projected scores.
  model = inference.SegSwap(params, dict_with(base, compute_dtype='bfloat16' if not cpu else 'float32'),
                            devices=jax.local_devices()[:1])
  images = np.random.default_rng(2).integers(0, 256, (8, *size, 3), dtype=np.uint8)
  backbone_s, _ = timing.time_call(lambda: model.features(images, batch_size=8), repeats=1)
  dtype = 'float32' if cpu else 'bfloat16'
  projected = min(v for k, v in per_candidate.items() if k.startswith('projected') and k.endswith(dtype))
  total = TOKYO_PAIRS * (backbone_s / 8 + projected)
  lines.append(f'Tokyo 24/7 re-rank extrapolated ({dtype}, {TOKYO_PAIRS} candidate features at '
               f'{backbone_s / 8 * 1e3:.0f} ms + {TOKYO_PAIRS} projected scores at {projected * 1e3:.0f} ms): '
               f'{total:.0f} s on one device{" (shapes of --quick)" if quick else ""}')
  return '\n'.join(lines)


if __name__ == '__main__':
  print(main())
