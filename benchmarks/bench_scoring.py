"""Retrieval scoring throughput: batched + cached vs the reference-style per-pair loop.

Setting of the Tokyo 24/7 / Pitts30k re-ranking: 640x480 images (40x30 cells), the small transformer
(the released model's size), random weights (speed does not depend on them), candidates' features read
from float16 memory as from the feature cache.

  * batched: `SegSwap.score_candidates` of the inference engine (one jitted call per batch:
    transformer + weights + segment-max score, candidate axis sharded over the local devices);
  * reference loop: per candidate, the backbone at batch 1 (the reference recomputes candidate features
    for every query), the transformer at batch 1, masks on the host and the Python loop over cells;
  * reference loop without the backbone: the same with cached features (isolates the batching gain).

The Tokyo extrapolation: 315 queries x 100 candidates; with the cache each distinct candidate's
backbone runs once (at most 31,500, fewer since queries share candidates), the reference runs 31,500.
"""
import time

import jax
import numpy as np

from benchmarks.reference_loop import ReferenceLoopScorer
from segswap_jax import checkpoints
from segswap_jax import inference
from segswap_jax import model as model_lib

WIDTH, HEIGHT = 640, 480
TOKYO_QUERIES, TOKYO_TOPK = 315, 100


def _random_params(config, seed=0):
  """He/Glorot-normal random weights from the abstract tree (no slow Flax init)."""
  rng = np.random.default_rng(seed)

  def leaf(path, spec):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      return (rng.standard_normal(spec.shape) * np.sqrt(2.0 / np.prod(spec.shape[:-1]))).astype(np.float32)
    if name.endswith("['scale']") or name.endswith("['var']"):
      return np.ones(spec.shape, np.float32)
    return np.zeros(spec.shape, np.float32)

  return jax.tree_util.tree_map_with_path(leaf, checkpoints.abstract_params(config))


def _timed(fn, repeats):
  fn()  # compile / warm up
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def main(quick: bool = False) -> str:
  config = model_lib.model_config('small')
  params = _random_params(config)
  # One Tokyo query: its 100 candidates in balanced batches (32 requested -> 4 calls of 25 on one device).
  num_candidates = 16 if quick else TOKYO_TOPK
  batch = inference.balanced_batch_size(num_candidates, 8 if quick else 32, jax.local_device_count())
  loop_candidates = 2 if quick else 4
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, HEIGHT, WIDTH, 3), dtype=np.uint8)

  model = inference.SegSwap(params, config)
  feats = np.asarray(model.features(images, batch_size=batch))
  cached = feats.astype(np.float16)
  read = lambda rows: cached[rows % len(cached)]
  backbone_s = _timed(lambda: np.asarray(model.features(images, batch_size=batch)), 1) / batch
  batched_s = _timed(lambda: model.score_candidates(feats[0], num_candidates, read, batch_size=batch),
                     1) / num_candidates
  query_s = _timed(lambda: (np.asarray(model.features(images[:1])), model.query_mask(feats[0])), 1)
  # Small batches too: on a CPU the (pairs, heads, 1200, 1200) attention logits of large batches
  # overflow the caches, so fewer pairs per call can be faster (on accelerators the opposite holds).
  small = inference.balanced_batch_size(num_candidates, 4, jax.local_device_count())
  small_s = _timed(lambda: model.score_candidates(feats[0], num_candidates, read, batch_size=small),
                   1) / num_candidates

  loop = ReferenceLoopScorer(params, config)
  loop_full_s = _timed(lambda: loop.score(feats[0], list(images[:loop_candidates]), from_images=True),
                       1) / loop_candidates
  loop_cached_s = _timed(lambda: loop.score(feats[0], list(cached[:loop_candidates])), 1) / loop_candidates

  pairs = TOKYO_QUERIES * TOKYO_TOPK
  best_s = min(batched_s, small_s)
  ours_h = (pairs * best_s + TOKYO_QUERIES * query_s + pairs * backbone_s) / 3600  # cache upper bound
  ours_warm_h = (pairs * best_s + TOKYO_QUERIES * query_s) / 3600
  ref_h = pairs * loop_full_s / 3600
  device = jax.devices()[0]
  lines = [
      f'devices: {jax.local_device_count()} x {device.platform} ({device.device_kind}); '
      f'{num_candidates} candidates in batches of {batch}, {loop_candidates} loop candidates; small transformer; '
      f'{WIDTH}x{HEIGHT} ({WIDTH // model_lib.FEATURE_STRIDE}x{HEIGHT // model_lib.FEATURE_STRIDE} cells)',
      '',
      '| path | s / candidate | candidates / s | speed-up vs reference loop |',
      '|---|---:|---:|---:|',
      f'| batched ({batch} per call), cached float16 features | {batched_s:.3f} | {1 / batched_s:.2f} | '
      f'{loop_full_s / batched_s:.1f}x |',
      f'| batched ({small} per call), cached float16 features | {small_s:.3f} | {1 / small_s:.2f} | '
      f'{loop_full_s / small_s:.1f}x |',
      f'| reference loop (backbone + transformer at batch 1, Python cells) | {loop_full_s:.3f} | '
      f'{1 / loop_full_s:.2f} | 1.0x |',
      f'| reference loop, cached features (no backbone) | {loop_cached_s:.3f} | {1 / loop_cached_s:.2f} | '
      f'{loop_full_s / loop_cached_s:.1f}x |',
      f'| backbone alone, batched (cache fill, per image) | {backbone_s:.3f} | {1 / backbone_s:.2f} | |',
      '',
      f'Tokyo 24/7 extrapolation ({TOKYO_QUERIES} queries x {TOKYO_TOPK} candidates, the faster batch): batched '
      f'{ours_warm_h:.2f} h with a warm cache, at most {ours_h:.2f} h including filling the cache '
      f'(every candidate distinct); reference-style loop {ref_h:.2f} h.',
  ]
  return '\n'.join(lines)


if __name__ == '__main__':
  print(main())
