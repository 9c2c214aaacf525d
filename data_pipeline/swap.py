"""Segment swapping (docs/reference.md §3): the placement chain as one affine map, and its exact ground truth.

A pair is image A (the source image, resized to S x S) and image B (a background with the object of A
pasted in by Poisson blending). The object's journey from A to B (aspect change, rotation, crop to its
box, resize, translation) is ONE 3x3 affine map `R` in pixel units (the image spans [0, S]; pixel
centres at k + 0.5); the object is rendered by a single `cv2.warpAffine` with that very matrix, so the
ground truth below is exact by construction:
  * `corr_a` = R applied to A's cell centres ((i + 0.5) / h), in [0, 1] units of B;
    `corr_b` = R^-1 applied to B's cell centres, in [0, 1] units of A (outside [0, 1] = leaves the image).
  * masks at cell resolution: A's dilated object mask sampled bilinearly at the cell centres, then made
    cycle-consistent with `geometry.warp_map`: m_b = warp(m_a, corr_b) * inside_b;
    m_a = m_a * warp(m_b, corr_a) * inside_a; m_b = warp(m_a, corr_b) * inside_b.
  * pairs whose mask (A or B) sums below `min_mask_cells` (9) are dropped.

Reference quirks: the reference's negative rotation angles are converted to radians twice (rotations
end up in [0, 15] degrees); we rotate uniformly in [-max_angle, max_angle] as intended. Its two-object
pairs store x where mask > 0 but y where mask > 0.5 (and B's where > 0.5); we use mask > 0 everywhere.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from segswap_jax import geometry
from segswap_jax.model import FEATURE_STRIDE

STRIDE = FEATURE_STRIDE  # one feature cell = 16 x 16 pixels


@dataclasses.dataclass
class Pair:
  """A synthetic pair. Images RGB uint8 `(S, S, 3)`; `corr_*` float32 `(h, w, 2)` (x, y) in [0, 1] of
  the other image; `mask_*` float32 `(h, w)`; h = w = S / 16."""
  image_a: np.ndarray
  image_b: np.ndarray
  corr_a: np.ndarray
  corr_b: np.ndarray
  mask_a: np.ndarray
  mask_b: np.ndarray
  num_objects: int


@dataclasses.dataclass(frozen=True)
class SwapParams:
  """The placement chain's random ranges (reference values)."""
  image_size: int = 480
  dilation: int = 20                      # iterations of a 3x3 cross, at the source's resolution
  border_cut_prob: float = 0.2            # one-object pairs: cut the source at the nearest border
  aspect_min: float = 0.7                 # each side scaled by U[aspect_min, 1]
  max_angle: float = 15.0                 # rotation U[-max_angle, max_angle] degrees
  one_object_scale: Tuple[float, float] = (0.2, 1.0)   # fraction of the background (10 values)
  two_object_scale: Tuple[float, float] = (0.5, 1.0)   # fraction of the region (10 values)
  num_scales: int = 10
  min_mask_cells: float = 9.0

  @property
  def cells(self) -> int:
    if self.image_size % STRIDE:
      raise ValueError(f'image_size {self.image_size} is not a multiple of {STRIDE}')
    return self.image_size // STRIDE


def scale_distribution(low: float, high: float, num: int = 10) -> Tuple[np.ndarray, np.ndarray]:
  """`num` values in [low, high], with probabilities proportional to exp(-i / 10) (smaller favoured)."""
  probs = np.exp(-np.arange(num) / 10.0)
  return np.linspace(low, high, num), probs / probs.sum()


def two_object_regions(size: int, gap: int = STRIDE) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
  """The 16 region pairs of two-object pairs, as (x0, y0, x1, y1) boxes in pixels.

  Regions are the four quadrants and the four half-canvases; a pair is two regions that do not overlap,
  each pulled back by `gap` (one feature cell) from the line that separates them: 6 quadrant pairs,
  8 quadrant + opposite half, 2 half pairs (the reference's 16).
  """
  half = size // 2
  regions = {  # (columns, rows) as half-index ranges: 0 = first half, 1 = second half.
      'tl': ((0, 1), (0, 1)), 'tr': ((1, 2), (0, 1)), 'bl': ((0, 1), (1, 2)), 'br': ((1, 2), (1, 2)),
      'top': ((0, 2), (0, 1)), 'bottom': ((0, 2), (1, 2)), 'left': ((0, 1), (0, 2)),
      'right': ((1, 2), (0, 2))}
  order = ['tl', 'bl', 'br', 'tr', 'top', 'bottom', 'left', 'right']

  def disjoint(a, b):
    return a[1] <= b[0] or b[1] <= a[0]

  def box(spans, other):
    coords = []
    for axis in (0, 1):
      lo, hi = spans[axis][0] * half, spans[axis][1] * half
      if disjoint(spans[axis], other[axis]):
        if spans[axis][1] <= other[axis][0]:
          hi -= gap
        else:
          lo += gap
      coords.append((lo, hi))
    return (coords[0][0], coords[1][0], coords[0][1], coords[1][1])

  pairs = []
  for i, first in enumerate(order):
    for second in order[i + 1:]:
      a, b = regions[first], regions[second]
      if disjoint(a[0], b[0]) or disjoint(a[1], b[1]):
        pairs.append((box(a, b), box(b, a)))
  return pairs


def resize_to(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes to size x size (area averaging when shrinking, bilinear otherwise), like PIL's bilinear."""
  height, width = image.shape[:2]
  shrink = size <= height and size <= width
  return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
  """Binary dilation by a 3x3 cross, `iterations` times (scipy's default structure)."""
  if iterations <= 0:
    return mask.astype(bool)
  cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
  return cv2.dilate(mask.astype(np.uint8), cross, iterations=iterations).astype(bool)


def cut_at_border(image: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Crops the image at the object's box side nearest to the image border (the object then touches it)."""
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  height, width = mask.shape
  top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  side = int(np.argmin([left, width - right, top, height - bottom]))
  crop = [(slice(None), slice(left, None)), (slice(None), slice(None, right)),
          (slice(top, None), slice(None)), (slice(None, bottom), slice(None))][side]
  return image[crop], mask[crop]


def prepare_source(image: np.ndarray, masks: Sequence[np.ndarray], params: SwapParams,
                   rng: np.random.Generator, border_cut: bool
                   ) -> Optional[Tuple[np.ndarray, List[np.ndarray]]]:
  """Image A and its soft object masks: dilate, maybe cut at the border, resize to S x S.

  Returns (RGB uint8 `(S, S, 3)`, [float32 `(S, S)` in [0, 1]] per object), or None when the dilated
  masks of two objects overlap (the reference rejects those two-object draws).
  """
  dilated = [dilate(m, params.dilation) for m in masks]
  if len(dilated) == 2 and np.logical_and(*dilated).any():
    return None
  if border_cut and rng.random() < params.border_cut_prob:
    image, cut = cut_at_border(image, dilated[0])
    dilated = [cut]
  size = params.image_size
  soft = [resize_to(m.astype(np.float32), size) for m in dilated]
  return resize_to(image, size), [np.clip(m, 0.0, 1.0) for m in soft]


def _object_box(mask: np.ndarray, linear: np.ndarray) -> Optional[Tuple[float, float, float, float]]:
  """Bounding box (x0, y0, x1, y1) of the pixel squares of `mask` mapped by a 2x2 linear map."""
  points = cv2.findNonZero(mask.astype(np.uint8))
  if points is None:
    return None
  hull = cv2.convexHull(points).reshape(-1, 2).astype(np.float64)
  corners = (hull[:, None, :] + np.array([[0, 0], [1, 0], [0, 1], [1, 1]])[None]).reshape(-1, 2)
  mapped = corners @ linear.T
  return (*mapped.min(axis=0), *mapped.max(axis=0))


def sample_placement(rng: np.random.Generator, mask: np.ndarray, region: Sequence[float],
                     scale: Tuple[float, float], params: SwapParams) -> Optional[np.ndarray]:
  """The placement chain as one 3x3 affine map in pixel units (A's frame -> B's frame).

  aspect change (U[aspect_min, 1] per side) -> rotation (U[-max_angle, max_angle] deg) -> crop to the
  object's box -> resize so the box takes a fraction (from `scale_distribution(*scale)`) of `region`
  (x0, y0, x1, y1) in its limiting direction -> uniform position inside `region`.
  (The reference's rotation canvas expansion is a translation that the crop cancels.)
  """
  aspect = np.diag([rng.uniform(params.aspect_min, 1.0), rng.uniform(params.aspect_min, 1.0)])
  angle = np.deg2rad(rng.uniform(-params.max_angle, params.max_angle))
  cos, sin = np.cos(angle), np.sin(angle)
  linear = np.array([[cos, sin], [-sin, cos]]) @ aspect
  box = _object_box(mask, linear)
  if box is None:
    return None
  x0, y0, x1, y1 = box
  values, probs = scale_distribution(*scale, params.num_scales)
  region_w, region_h = region[2] - region[0], region[3] - region[1]
  ratio = min(region_w / (x1 - x0), region_h / (y1 - y0)) * rng.choice(values, p=probs)
  patch_w, patch_h = (x1 - x0) * ratio, (y1 - y0) * ratio
  left = region[0] + rng.uniform(0.0, max(0.0, region_w - patch_w))
  top = region[1] + rng.uniform(0.0, max(0.0, region_h - patch_h))
  affine = np.eye(3)
  affine[:2, :2] = ratio * linear
  affine[:2, 2] = [left - ratio * x0, top - ratio * y0]
  return affine


def warp_object(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, size: int
                ) -> Tuple[np.ndarray, np.ndarray]:
  """Renders image and soft mask of A in B's frame with the pixel-unit affine (one resampling).

  When the map shrinks, A is first area-averaged to about the target scale (no aliasing) and the
  matrix adjusted, so the geometry stays exactly `affine`.
  """
  scale = np.sqrt(abs(np.linalg.det(affine[:2, :2])))
  height, width = image.shape[:2]
  if scale < 0.75:
    new_w, new_h = max(8, round(width * scale)), max(8, round(height * scale))
    image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_AREA)
    affine = affine @ np.diag([width / new_w, height / new_h, 1.0])
  # OpenCV indexes pixel centres at integers; our continuous frame has them at k + 0.5.
  shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
  matrix = (np.linalg.inv(shift) @ affine @ shift)[:2]
  warped = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  warped_mask = cv2.warpAffine(mask, matrix, (size, size), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  return warped, warped_mask


def apply_affine(affine: np.ndarray, xy: np.ndarray) -> np.ndarray:
  """Applies a 3x3 affine to points `(..., 2)`."""
  return xy @ affine[:2, :2].T + affine[:2, 2]


def correspondences(affine: np.ndarray, size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Ground-truth maps of a pixel-unit affine A -> B: (corr_a, corr_b), float32 `(h, w, 2)` in [0, 1]."""
  cells = size // STRIDE
  unit = np.diag([1.0 / size, 1.0 / size, 1.0]) @ affine @ np.diag([size, size, 1.0])
  centres = geometry.cell_centers(cells, cells, np.float64)
  corr_a = apply_affine(unit, centres)
  corr_b = apply_affine(np.linalg.inv(unit), centres)
  return corr_a.astype(np.float32), corr_b.astype(np.float32)


def inside(xy: np.ndarray) -> np.ndarray:
  """1.0 where a correspondence lands strictly inside the other image, else 0.0: `(h, w)`."""
  return np.all((xy > 0.0) & (xy < 1.0), axis=-1).astype(np.float32)


def cycle_consistent_masks(mask_a: np.ndarray, corr_a: np.ndarray, corr_b: np.ndarray
                           ) -> Tuple[np.ndarray, np.ndarray]:
  """docs/reference.md §3's cycle-consistent masks from A's cell mask `(h, w)`: returns (mask_a, mask_b)."""
  inside_a, inside_b = inside(corr_a), inside(corr_b)
  mask_b = geometry.warp_map(mask_a, corr_b) * inside_b
  mask_a = mask_a * geometry.warp_map(mask_b, corr_a) * inside_a
  mask_b = geometry.warp_map(mask_a, corr_b) * inside_b
  return mask_a.astype(np.float32), mask_b.astype(np.float32)


def cell_mask(mask: np.ndarray, cells: int) -> np.ndarray:
  """Pixel mask `(S, S)` sampled bilinearly at the cell centres (= F.interpolate, bilinear)."""
  return geometry.warp_map(mask.astype(np.float32), geometry.cell_centers(cells, cells))


def _place(rng, image_a, soft_mask, region, scale, params):
  """Affine, rendered object, and cycle-consistent ground truth of one object."""
  affine = sample_placement(rng, soft_mask > 0.5, region, scale, params)
  if affine is None:
    return None
  warped, warped_mask = warp_object(image_a, soft_mask, affine, params.image_size)
  corr_a, corr_b = correspondences(affine, params.image_size)
  mask_a, mask_b = cycle_consistent_masks(cell_mask(soft_mask, params.cells), corr_a, corr_b)
  return warped, warped_mask > 0.5, corr_a, corr_b, mask_a, mask_b


def one_object_pair(rng: np.random.Generator, source: np.ndarray, mask: np.ndarray,
                    background: np.ndarray, params: SwapParams,
                    paste=None) -> Optional[Pair]:
  """One-object pair: the object `mask` (bool, at `source`'s size) of `source` pasted into `background`.

  Returns None when the draw is rejected (mask under `min_mask_cells` cells). `paste(background,
  warped, mask)` defaults to Poisson blending.
  """
  from data_pipeline import blend
  paste = paste or blend.poisson_paste
  prepared = prepare_source(source, [mask], params, rng, border_cut=True)
  image_a, (soft,) = prepared
  size = params.image_size
  placed = _place(rng, image_a, soft, (0, 0, size, size), params.one_object_scale, params)
  if placed is None:
    return None
  warped, pasted, corr_a, corr_b, mask_a, mask_b = placed
  if mask_a.sum() < params.min_mask_cells or mask_b.sum() < params.min_mask_cells:
    return None
  image_b = paste(resize_to(background, size), warped, pasted)
  return Pair(image_a, image_b, corr_a, corr_b, mask_a, mask_b, 1)


def two_object_pair(rng: np.random.Generator, source: np.ndarray, masks: Sequence[np.ndarray],
                    background: np.ndarray, params: SwapParams, paste=None) -> Optional[Pair]:
  """Two-object pair: two objects of one source image, each placed in one region of a random region pair.

  Rejected (None) when the dilated masks overlap, the cell masks of the two objects touch in A or B, or
  any object mask sums below `min_mask_cells`. Ground truth is combined per object: a cell takes the
  correspondence of the object whose mask covers it (0 elsewhere); masks add up.
  """
  from data_pipeline import blend
  paste = paste or blend.poisson_paste
  prepared = prepare_source(source, masks, params, rng, border_cut=False)
  if prepared is None:
    return None
  image_a, softs = prepared
  regions = two_object_regions(params.image_size)
  placed = []
  for soft, region in zip(softs, regions[int(rng.integers(len(regions)))]):
    result = _place(rng, image_a, soft, region, params.two_object_scale, params)
    if result is None:
      return None
    placed.append(result)
  (warp1, paste1, ca1, cb1, ma1, mb1), (warp2, paste2, ca2, cb2, ma2, mb2) = placed
  if (ma1 * ma2).sum() > 0 or (mb1 * mb2).sum() > 0:
    return None
  if min(ma1.sum(), ma2.sum(), mb1.sum(), mb2.sum()) < params.min_mask_cells:
    return None
  image_b = resize_to(background, params.image_size)
  image_b = paste(paste(image_b, warp1, paste1), warp2, paste2)

  def combine(first, second, m1, m2):
    return np.where((m1 > 0)[..., None], first, np.where((m2 > 0)[..., None], second, 0.0))

  return Pair(image_a, image_b, combine(ca1, ca2, ma1, ma2).astype(np.float32),
              combine(cb1, cb2, mb1, mb2).astype(np.float32), ma1 + ma2, mb1 + mb2, 2)
