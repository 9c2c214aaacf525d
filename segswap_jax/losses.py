"""The training objective of docs/reference.md §2 and its accuracy metrics, as pure jnp functions.

Shapes: outputs `(B, h, w, 3)` = (x, y, mask) in (0, 1); masks `(B, h, w)`; correspondences `(B, h, w, 2)`.
Everything here is per replica: the train step averages losses and gradients over devices.

  loss = BCE(masks) + eta * L_corr
  BCE    = mean over the concatenation of: predicted masks of both images of the positives (targets: GT
           masks), optionally each image's mask warped from the other image through the predicted
           correspondences (targets: its own GT mask), and both predicted masks of every negative pair
           (targets: 0). Every map has the same h x w, so the mean is over all their cells.
  L_corr = sum |xy_pred - xy_gt| over both coordinates at the cells where a GT mask equals its maximum
           over its image, both images of every positive pooled, divided by the number of such cells
           and by 2.

Which cells L_corr (and `acc_pos`) use is `corr_cells`: 'peak' is the reference's rule above (equal up
to float rounding, so that an interior of 1.0s whose bilinear sums round to 0.99999994 counts whole);
'foreground' is every cell whose GT mask exceeds 0.5. On the reference's 30 x 30 maps of large objects
both are the object's interior; on coarse maps (8 x 8 at 128 px) the twice-warped cycle-consistent
masks rarely reach 1 and 'peak' keeps a single cell per image (docs/training.md).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from segswap_jax import geometry
from segswap_jax.model import OUTPUT_EPS


class PositiveTargets(NamedTuple):
  """Ground truth of positive pairs (A, B), in the roles the model saw them.

  mask_a, mask_b: `(B, h, w)` in [0, 1]; corr_a, corr_b: `(B, h, w, 2)` (x, y) in the other image.
  """
  mask_a: jax.Array
  mask_b: jax.Array
  corr_a: jax.Array
  corr_b: jax.Array


def binary_cross_entropy(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Elementwise BCE of probabilities already clamped to [eps, 1 - eps] (as the model's outputs are)."""
  return -(target * jnp.log(pred) + (1.0 - target) * jnp.log1p(-pred))


def warped_mask(mask_other: jax.Array, xy: jax.Array) -> jax.Array:
  """The other image's predicted mask read at this image's predicted correspondences, clamped.

  mask_other `(B, h', w')`, xy `(B, h, w, 2)` -> `(B, h, w)`.
  """
  return jnp.clip(geometry.warp_map(mask_other, xy), OUTPUT_EPS, 1.0 - OUTPUT_EPS)


CORR_CELLS = ('peak', 'foreground')
PEAK_TOLERANCE = 1e-6   # float32 rounding of bilinear sums of 1.0s


def peak_cells(mask: jax.Array) -> jax.Array:
  """Cells where a GT mask equals its maximum over its image (up to rounding): bool `(B, h, w)`."""
  return mask >= jnp.max(mask, axis=(-2, -1), keepdims=True) - PEAK_TOLERANCE


def supervised_cells(mask: jax.Array, corr_cells: str = 'peak') -> jax.Array:
  """The cells whose correspondences L_corr supervises: bool `(B, h, w)` (see the module doc)."""
  if corr_cells == 'peak':
    return peak_cells(mask)
  if corr_cells == 'foreground':
    return mask > 0.5
  raise ValueError(f'corr_cells must be one of {CORR_CELLS}, got {corr_cells!r}')


def correspondence_loss(out_a: jax.Array, out_b: jax.Array, targets: PositiveTargets,
                        corr_cells: str = 'peak') -> jax.Array:
  """L1 between predicted and GT (x, y) on the supervised cells of both images, per cell, halved."""
  diff_a = jnp.sum(jnp.abs(out_a[..., :2] - targets.corr_a), axis=-1)
  diff_b = jnp.sum(jnp.abs(out_b[..., :2] - targets.corr_b), axis=-1)
  peak_a = supervised_cells(targets.mask_a, corr_cells)
  peak_b = supervised_cells(targets.mask_b, corr_cells)
  total = jnp.sum(jnp.where(peak_a, diff_a, 0.0)) + jnp.sum(jnp.where(peak_b, diff_b, 0.0))
  count = jnp.sum(peak_a) + jnp.sum(peak_b)
  return total / jnp.maximum(count, 1) / 2.0


def segswap_loss(pos_a: jax.Array, pos_b: jax.Array, targets: PositiveTargets, neg_a: jax.Array,
                 neg_b: jax.Array, *, warp_mask: bool = True, eta_corr: float = 8.0,
                 corr_cells: str = 'peak', neg_weights: Optional[jax.Array] = None
                 ) -> Dict[str, jax.Array]:
  """docs/reference.md §2 loss of one replica's batch, and the reference's accuracies.

  Args:
    pos_a, pos_b: `(P, h, w, 3)` outputs of the positive pairs.
    targets: their ground truth.
    neg_a, neg_b: `(N, h, w, 3)` outputs of the negative pairs (in-batch and mined ones).
    warp_mask: add the warped-mask terms (on in the released model).
    eta_corr: weight of L_corr.
    corr_cells: 'peak' (the reference) or 'foreground': the cells of L_corr and `acc_pos`.
    neg_weights: `(N,)` 1 = a true negative, 0 = left out (its images share a scene); default all 1.

  Returns:
    `loss` (what is minimised), `loss_mask`, `loss_corr`, and the reference's accuracies at 0.5:
    `acc_pos` over the supervised cells of positives, `acc_neg` over the other cells of positives and
    every cell of the negatives kept, `acc` their mean; `neg_kept`, the fraction of negatives kept.
  """
  mask_a, mask_b = pos_a[..., 2], pos_b[..., 2]
  bce_sum = (jnp.sum(binary_cross_entropy(mask_a, targets.mask_a))
             + jnp.sum(binary_cross_entropy(mask_b, targets.mask_b)))
  count = mask_a.size + mask_b.size
  if warp_mask:
    bce_sum += jnp.sum(binary_cross_entropy(warped_mask(mask_b, pos_a[..., :2]), targets.mask_a))
    bce_sum += jnp.sum(binary_cross_entropy(warped_mask(mask_a, pos_b[..., :2]), targets.mask_b))
    count += mask_a.size + mask_b.size
  if neg_weights is None:
    neg_weights = jnp.ones(neg_a.shape[:1], jnp.float32)
  negative_masks = jnp.concatenate([neg_a[..., 2], neg_b[..., 2]])      # (2N, h, w)
  cell_weights = jnp.broadcast_to(jnp.tile(neg_weights, 2)[:, None, None], negative_masks.shape)
  bce_sum += jnp.sum(cell_weights * binary_cross_entropy(negative_masks, 0.0))
  count += jnp.sum(cell_weights)
  loss_mask = bce_sum / count
  loss_corr = correspondence_loss(pos_a, pos_b, targets, corr_cells)

  peak_a = supervised_cells(targets.mask_a, corr_cells)
  peak_b = supervised_cells(targets.mask_b, corr_cells)
  hits_pos = jnp.sum(peak_a & (mask_a > 0.5)) + jnp.sum(peak_b & (mask_b > 0.5))
  num_pos = jnp.sum(peak_a) + jnp.sum(peak_b)
  hits_neg = (jnp.sum(~peak_a & (mask_a < 0.5)) + jnp.sum(~peak_b & (mask_b < 0.5))
              + jnp.sum(cell_weights * (negative_masks < 0.5)))
  num_neg = jnp.sum(~peak_a) + jnp.sum(~peak_b) + jnp.sum(cell_weights)
  acc_pos = hits_pos / jnp.maximum(num_pos, 1)
  acc_neg = hits_neg / jnp.maximum(num_neg, 1)
  return {
      'loss': loss_mask + eta_corr * loss_corr,
      'loss_mask': loss_mask,
      'loss_corr': loss_corr,
      'acc_pos': acc_pos,
      'acc_neg': acc_neg,
      'acc': 0.5 * (acc_pos + acc_neg),
      'neg_kept': jnp.mean(neg_weights) if neg_weights.size else jnp.ones(()),
  }


def in_batch_negatives(batch_pos: int, batch_neg: int):
  """Index pairs (i, j), i != j, of the reference's in-batch negatives: A of pair i with B of pair j.

  Shift s = 1, 2, ... pairs i with (i + s) mod P; the first `batch_neg` of that list are kept (5
  positives and 15 negatives: shifts 1, 2, 3). Returns two int arrays `(batch_neg,)`.
  """
  if batch_neg > batch_pos * (batch_pos - 1):
    raise ValueError(f'{batch_pos} positives give at most {batch_pos * (batch_pos - 1)} in-batch '
                     f'negatives, {batch_neg} were asked for')
  index_a = np.concatenate([np.arange(batch_pos)] * max(batch_pos - 1, 1))[:batch_neg]
  index_b = np.concatenate([np.roll(np.arange(batch_pos), -s) for s in range(1, max(batch_pos, 2))])
  return index_a.astype(np.int32), index_b[:batch_neg].astype(np.int32)


def distinct_scene_weights(scenes: jax.Array, index_a: np.ndarray, index_b: np.ndarray) -> jax.Array:
  """1.0 for the negatives (A of pair i, B of pair j) that share no scene, else 0.0: `(N,)`.

  `scenes` `(P, 2)` int: per positive pair the scene of A (and of the objects pasted into B) and of B's
  background; negative ids are unknown and never match. A_i shows scene a_i; B_j shows a_j and its
  background g_j; the pair is a true negative unless a_i is one of them.
  """
  scene_a, background = scenes[:, 0], scenes[:, 1]
  first = scene_a[index_a]
  shared = (first >= 0) & ((first == scene_a[index_b]) | (first == background[index_b]))
  return 1.0 - shared.astype(jnp.float32)


def mask_iou(pred_mask: jax.Array, gt_mask: jax.Array, threshold: float = 0.5) -> jax.Array:
  """IoU of `pred > threshold` and `gt > threshold` per map `(..., h, w)` -> `(...)` (1 when both empty)."""
  pred = pred_mask > threshold
  gt = gt_mask > threshold
  inter = jnp.sum(pred & gt, axis=(-2, -1))
  union = jnp.sum(pred | gt, axis=(-2, -1))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def correspondence_error_cells(xy_pred: jax.Array, xy_gt: jax.Array,
                               grid_hw: Optional[tuple] = None) -> jax.Array:
  """Euclidean distance between predicted and GT locations in cells of the other image `(..., h, w)`.

  `grid_hw` = (h, w) of the other image's feature map (default: the same as this one).
  """
  h, w = grid_hw if grid_hw is not None else xy_pred.shape[-3:-1]
  scale = jnp.asarray([w, h], xy_pred.dtype)
  return jnp.sqrt(jnp.sum(jnp.square((xy_pred - xy_gt) * scale), axis=-1))
