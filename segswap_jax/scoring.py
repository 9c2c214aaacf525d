"""Pair scores from model outputs (docs/reference.md §4, §7): masks, transported masks, the score.

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
  """The docs/reference.md §4 score, batched: sum over distinct target cells of max(0, max w * <f_q, f_d(target)>).

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


FLIP_MODES = ('reference', 'corrected', 'none')


def choose_flip(outputs, mirrored_outputs, mode: str):
  """Per pair, the plain run (i, j) or the run on (i, mirror of j), whichever has the larger mask sum on i.

  The mirrored run's outputs are mapped back as `mode` says (docs/reference.md §7, §10):
    * 'reference': out_a unchanged; out_b with x -> 1 - x and its mask flipped up-down, maps not
      mirrored back (the released code, geometrically inconsistent; for parity);
    * 'corrected': out_a with x -> 1 - x (its targets expressed in the unmirrored j); out_b mirrored
      left-right as a map (it lives on the mirrored grid), its x (pointing into i) unchanged.

  Args:
    outputs, mirrored_outputs: (out_a `(B, h, w, 3)`, out_b `(B, h', w', 3)`) of the two runs.
  Returns:
    the chosen (out_a, out_b).
  """
  out_a, out_b = outputs
  mirror_a, mirror_b = mirrored_outputs
  if mode == 'reference':
    mirror_b = jnp.concatenate([1.0 - mirror_b[..., :1], mirror_b[..., 1:2], mirror_b[..., ::-1, :, 2:]], axis=-1)
  elif mode == 'corrected':
    mirror_a = jnp.concatenate([1.0 - mirror_a[..., :1], mirror_a[..., 1:]], axis=-1)
    mirror_b = mirror_b[:, :, ::-1, :]
  else:
    raise ValueError(f'flip mode must be reference or corrected here, got {mode!r}')
  use = (jnp.sum(mirrored_outputs[0][..., 2], axis=(1, 2)) > jnp.sum(out_a[..., 2], axis=(1, 2)))[:, None, None, None]
  return jnp.where(use, mirror_a, out_a), jnp.where(use, mirror_b, out_b)


def correspondence_stats(out_q, weight, cell_mask):
  """Summaries of where the scored query cells land in each candidate (for Brueghel boxes).

  Args:
    out_q: `(B, h, w, 3)` query-side outputs; weight: `(B, h, w)`; cell_mask: bool `(h, w)`.

  Returns:
    `(B, 11)` float32 columns: [coarse x, coarse y (unweighted mean of the predicted x, y over the
    scored cells, the reference's coarse location), weight sum, weighted means of source x, y and of
    target x, y, weighted covariances cov(src x, tgt x), cov(src y, tgt y), variances var(src x),
    var(src y)]; source = the cell centres in [0, 1] of the query image.
  """
  h, w = cell_mask.shape
  cells = cell_mask.astype(jnp.float32)
  src = jnp.asarray(geometry.cell_centers(h, w))  # (h, w, 2)
  tgt = out_q[..., :2]
  coarse = jnp.sum(tgt * cells[..., None], axis=(1, 2)) / jnp.maximum(jnp.sum(cells), 1.0)
  wgt = weight * cells
  total = jnp.sum(wgt, axis=(1, 2))
  norm = jnp.maximum(total, 1e-12)[:, None]
  mean_src = jnp.einsum('bhw,hwc->bc', wgt, src) / norm
  mean_tgt = jnp.einsum('bhw,bhwc->bc', wgt, tgt) / norm
  dsrc = src[None] - mean_src[:, None, None]
  dtgt = tgt - mean_tgt[:, None, None]
  cov = jnp.einsum('bhw,bhwc->bc', wgt, dsrc * dtgt) / norm
  var = jnp.einsum('bhw,bhwc->bc', wgt, dsrc * dsrc) / norm
  return jnp.concatenate([coarse, total[:, None], mean_src, mean_tgt, cov, var], axis=1)


def retrieval_scores(feat_q, feat_d, self_out_a, self_out_b, out_q, out_d, init_mask=None):
  """Scores of one query against N candidates (docs/reference.md §4 steps 1-4).

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
