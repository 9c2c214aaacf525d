"""Pair scores from model outputs (SPEC §4, REFERENCE_EVAL §0): masks, transported masks, the score.

All functions are pure jnp (jit/vmap/pmap friendly) and batched over candidates; the reference's Python
loop over cells becomes a segment max over target cells. Outputs are `(..., h, w, 3)` = (x, y, mask),
features `(..., h, w, C)` L2-normalised.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from segswap_jax import geometry


def consistent_mask(init_mask, self_out_a, self_out_b):
  """The query self-mask of a pair run on (Q, Q).

  m0 = init * a.mask; t = sample(m0 at b's xy) * b.mask; back = sample(t at a's xy); return m0 * back.

  Args:
    init_mask: `(B, h, w)` initial mask (all ones, or the Brueghel box).
    self_out_a, self_out_b: `(B, h, w, 3)` outputs of the self pair on its first / second side.
  Returns:
    `(B, h, w)` query mask.
  """
  m0 = init_mask * self_out_a[..., 2]
  transported = geometry.warp_map(m0, self_out_b[..., :2]) * self_out_b[..., 2]
  back = geometry.warp_map(transported, self_out_a[..., :2])
  return m0 * back


def transported_mask(query_mask, out_q, out_d):
  """Retrieval weight per query cell: mq * o1.mask * sample(o2.mask at o1's xy).

  Args:
    query_mask: `(B, h, w)` (broadcast a single query mask over the candidates first).
    out_q: `(B, h, w, 3)` outputs on the query side of (Q, D_i).
    out_d: `(B, hd, wd, 3)` outputs on the candidate side.
  Returns:
    `(B, h, w)`.
  """
  return query_mask * out_q[..., 2] * geometry.warp_map(out_d[..., 2], out_q[..., :2])


def cycle_weight(out_q, out_d):
  """Internet-discovery weight (no self-pair term): o1.mask * sample(o2.mask at o1's xy)."""
  return out_q[..., 2] * geometry.warp_map(out_d[..., 2], out_q[..., :2])


def _single_pair_score(feat_q, feat_d, xy_q, weight, cell_mask):
  """One pair: feat_q `(h, w, C)`, feat_d `(hd, wd, C)`, xy_q `(h, w, 2)`, weight/cell_mask `(h, w)`."""
  hd, wd, channels = feat_d.shape
  cells = geometry.target_cells(xy_q, hd, wd).reshape(-1, 2)
  col = jnp.clip(cells[:, 0], 0, wd - 1)
  row = jnp.clip(cells[:, 1], 0, hd - 1)
  target = row * wd + col
  matched = feat_d.reshape(hd * wd, channels)[target]
  similarity = jnp.sum(feat_q.reshape(-1, channels) * matched, axis=-1)
  contribution = weight.reshape(-1) * similarity
  # Cells outside the scored set never win a target: the clip at zero below removes them.
  contribution = jnp.where(cell_mask.reshape(-1), contribution, -jnp.inf)
  best = jax.ops.segment_max(contribution, target, num_segments=hd * wd)
  return jnp.sum(jnp.maximum(best, 0.0))


def pair_score(feat_q, feat_d, out_q, weight, cell_mask: Optional[jax.Array] = None):
  """SPEC §4 score, batched: sum over distinct target cells of max(0, max w * <f_q, f_d(target)>).

  Args:
    feat_q: `(B, h, w, C)` query features (broadcast the query first).
    feat_d: `(B, hd, wd, C)` candidate features.
    out_q: `(B, h, w, 3)` outputs on the query side; its (x, y) give each cell's target cell.
    weight: `(B, h, w)` per-cell weight (e.g. `transported_mask`).
    cell_mask: optional bool `(B, h, w)` or `(h, w)`: the source cells that are scored (Brueghel box).
  Returns:
    `(B,)` scores.
  """
  if cell_mask is None:
    cell_mask = jnp.ones(weight.shape, bool)
  cell_mask = jnp.broadcast_to(cell_mask, weight.shape)
  return jax.vmap(_single_pair_score)(feat_q, feat_d, out_q[..., :2], weight, cell_mask)


def retrieval_scores(feat_q, feat_d, self_out_a, self_out_b, out_q, out_d, init_mask=None):
  """Scores of one query against N candidates (SPEC §4 steps 1-2).

  Args:
    feat_q: `(h, w, C)`; feat_d: `(N, hd, wd, C)`.
    self_out_a, self_out_b: `(h, w, 3)` outputs of the self pair (Q, Q).
    out_q: `(N, h, w, 3)`, out_d: `(N, hd, wd, 3)` outputs of (Q, D_i).
    init_mask: optional `(h, w)` initial query mask (Brueghel box); all ones by default. When given,
      only its non-zero cells are scored.
  Returns:
    dict with `scores` `(N,)`, `query_mask` `(h, w)`, `transported_masks` `(N, h, w)`.
  """
  n = feat_d.shape[0]
  h, w = feat_q.shape[:2]
  init = jnp.ones((h, w), feat_q.dtype) if init_mask is None else jnp.asarray(init_mask, feat_q.dtype)
  query_mask = consistent_mask(init[None], self_out_a[None], self_out_b[None])[0]
  weights = transported_mask(jnp.broadcast_to(query_mask, (n, h, w)), out_q, out_d)
  cells = None if init_mask is None else init > 0
  scores = pair_score(jnp.broadcast_to(feat_q, (n,) + feat_q.shape), feat_d, out_q, weights, cells)
  return {'scores': scores, 'query_mask': query_mask, 'transported_masks': weights}
