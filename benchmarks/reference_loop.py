"""The reference's way of scoring, kept as a test oracle and a benchmark baseline.

Mirrors the released evaluation scripts (docs/reference.md §4-5): one forward per candidate (backbone
when images are given, then the transformer at batch 1, through the inference engine), masks on the
host in float32 numpy, and the score as a Python loop over the source cells that keeps, per distinct
target cell, the maximum of 0 and the weighted similarities (the reference's `score_local_feat_match`).
Deliberately independent of `segswap_jax.scoring` (only the one bilinear sampler is shared), so that
agreement means something.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segswap_jax import features as features_lib
from segswap_jax import geometry
from segswap_jax import inference


def _warp(values: np.ndarray, xy: np.ndarray) -> np.ndarray:
  """grid_sample of a `(h, w)` map at `(h', w', 2)` [0, 1] locations, float32 numpy."""
  return geometry.warp_map(values[None].astype(np.float32), xy[None].astype(np.float32))[0]


def consistent_query_mask(init_mask: np.ndarray, out_a: np.ndarray, out_b: np.ndarray) -> np.ndarray:
  """m0 = init * a.mask; t = warp(m0 by b's xy) * b.mask; back = warp(t by a's xy); m0 * back."""
  m0 = (init_mask * out_a[..., 2]).astype(np.float32)
  target = _warp(m0, out_b[..., :2]) * out_b[..., 2]
  return m0 * _warp(target, out_a[..., :2])


def local_match_score(feat_q: np.ndarray, feat_d: np.ndarray, xy_q: np.ndarray, weight: np.ndarray,
                      cell_ys: np.ndarray, cell_xs: np.ndarray) -> float:
  """Python loop over the source cells (the reference's `score_local_feat_match`).

  Args:
    feat_q: `(h, w, C)`; feat_d: `(hd, wd, C)`; xy_q: `(h, w, 2)` predicted (x, y) in the candidate;
    weight: `(h, w)`; cell_ys, cell_xs: the scored source cells (np.where of the cell mask).
  """
  hd, wd = feat_d.shape[:2]
  xs = np.round(xy_q[cell_ys, cell_xs, 0] * (wd - 1)).astype(int)
  ys = np.round(xy_q[cell_ys, cell_xs, 1] * (hd - 1)).astype(int)
  best = {}
  for i in range(len(xs)):
    value = float(np.dot(feat_q[cell_ys[i], cell_xs[i]], feat_d[ys[i], xs[i]])) * float(weight[cell_ys[i], cell_xs[i]])
    key = (ys[i], xs[i])
    best[key] = max(best.get(key, 0.0), value)
  return float(sum(best.values()))


class ReferenceLoopScorer:
  """Per-pair scoring as the reference does it: unbatched forward per candidate, Python loop over cells."""

  def __init__(self, params: Dict, config, devices=None):
    # One device, batch 1: the reference's way.
    self.model = inference.SegSwap(params, config, devices=devices or jax.local_devices()[:1])

  def features(self, image: np.ndarray, denormalize: bool = False) -> np.ndarray:
    """One uint8 `(H, W, 3)` image -> `(h, w, C)` float32."""
    normalization = 'denormalized' if denormalize else 'imagenet'
    return np.asarray(self.model.features(np.asarray(image)[None], normalization, batch_size=1))[0]

  def pair(self, feat_a: np.ndarray, feat_b: np.ndarray):
    out = self.model.pair(jnp.asarray(feat_a)[None], jnp.asarray(feat_b)[None])
    return np.asarray(out.out_a)[0], np.asarray(out.out_b)[0]

  def score(self, feat_q: np.ndarray, candidates: Sequence[np.ndarray], init_mask: Optional[np.ndarray] = None,
            from_images: bool = False, denormalize: bool = False) -> Dict[str, np.ndarray]:
    """Scores one query against candidates one at a time.

    Args:
      feat_q: `(h, w, C)` query features.
      candidates: candidate features `(hd, wd, C)` (any float dtype; brought back to float32 unit norm as
        the batched scorer does with cached features), or uint8 images when `from_images`.
      init_mask: optional `(h, w)` initial query mask; its non-zero cells are the scored cells.
      from_images: run the backbone per candidate (the reference recomputes candidate features).
      denormalize: the released candidate-loader quirk (only with `from_images`).

    Returns:
      `score` `(n,)` float64, `query_mask` `(h, w)`, `transported_masks` `(n, h, w)`.
    """
    h, w = feat_q.shape[:2]
    init = np.ones((h, w), np.float32) if init_mask is None else np.asarray(init_mask, np.float32)
    cell_ys, cell_xs = np.where(init > 0)
    self_a, self_b = self.pair(feat_q, feat_q)
    mask_q = consistent_query_mask(init, self_a, self_b)
    scores, weights = [], []
    for candidate in candidates:
      if from_images:
        feat_d = self.features(candidate, denormalize)
      else:
        feat_d = np.asarray(features_lib.l2_normalize(jnp.asarray(candidate, jnp.float32)))
      out_q, out_d = self.pair(feat_q, feat_d)
      weight = mask_q * out_q[..., 2] * _warp(out_d[..., 2], out_q[..., :2])
      scores.append(local_match_score(feat_q, feat_d, out_q[..., :2], weight, cell_ys, cell_xs))
      weights.append(weight)
    return {'score': np.array(scores), 'query_mask': mask_q, 'transported_masks': np.stack(weights)}
