"""Training-time augmentation of one stored pair (docs/reference.md §2), in numpy, for the grain loader.

Per sample, with the sample's own random generator:
  1. each image is replaced by its stylised version with probability `p_style` (0.5);
  2. with probability `p_tps` (0.5) image B gets a random thin-plate-spline warp: a 4x4 or 6x6 grid of
     control points over [-1, 1]^2, each moved uniformly by up to +-0.5/grid (clipped to the square).
     The warp is composed into both correspondence maps and B's mask:
       B'(p) = B(f(p))            (f: warped frame -> original frame, the TPS through the moved points)
       corr_b'(p) = corr_b(f(p))  mask_b'(p) = mask_b(f(p))   (bilinear, zero outside, as the reference)
       corr_a'(q) = f^-1(corr_a(q))  (exact inverse by fixed-point iteration; the reference samples an
                                      inverse TPS fitted separately on the cell grid)
     A's mask does not change: f keeps the frame's border inside the frame, so nothing of A's object
     leaves B';
  3. with probability `p_pad` (0.5) the background tokens of B (mask_b < 0.5) become key padding
     (`pad_b` True); never all of them (a query needs at least one key), so a pair whose B mask is
     everywhere < 0.5 keeps every token;
  4. images stay uint8 RGB: the train step normalises them on the device (a quarter of the bytes of
     float32 to copy).
In-batch negatives and the per-batch A/B swap are NOT formed here: they belong to the train step, which
sees the whole batch (docs/INTERFACES.md "Training batches").
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Sequence, Tuple
import zlib

import cv2
import numpy as np

from data_pipeline import builder
from segswap_jax.errors import DataError
from segswap_jax import geometry



@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities of docs/reference.md §2 (reference values)."""
  p_style: float = 0.5
  p_tps: float = 0.5
  tps_grids: Tuple[int, ...] = (4, 6)
  p_pad: float = 0.5


class ThinPlateSpline:
  """A 2-D thin-plate spline f with f(centers[k]) = values[k], in [-1, 1] units.

  f(p) = a0 + A p + sum_k w_k U(|p - c_k|), U(r) = r^2 log r^2.
  """

  def __init__(self, centers: np.ndarray, values: np.ndarray):
    num = len(centers)
    self.centers = centers.astype(np.float64)
    system = np.zeros((num + 3, num + 3))
    system[:num, :num] = self._kernel(self.centers, self.centers)
    system[:num, num] = 1.0
    system[:num, num + 1:] = self.centers
    system[num, :num] = 1.0
    system[num + 1:, :num] = self.centers.T
    rhs = np.zeros((num + 3, 2))
    rhs[:num] = values
    solution = np.linalg.solve(system, rhs)
    self.weights, self.affine = solution[:num], solution[num:]

  @staticmethod
  def _kernel(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    squared = ((points ** 2).sum(-1)[:, None] + (centers ** 2).sum(-1)[None, :]
               - 2.0 * points @ centers.T)
    squared = np.maximum(squared, 1e-12)
    return squared * np.log(squared)

  def __call__(self, points: np.ndarray) -> np.ndarray:
    """`(..., 2)` -> `(..., 2)`."""
    flat = points.reshape(-1, 2).astype(np.float64)
    out = (self.affine[0] + flat @ self.affine[1:] + self._kernel(flat, self.centers) @ self.weights)
    return out.reshape(points.shape).astype(points.dtype)

  def inverse(self, points: np.ndarray, iterations: int = 50, tolerance: float = 1e-7) -> np.ndarray:
    """f^-1 by fixed-point iteration p <- p + (q - f(p)); converges since f is near the identity."""
    target = points.astype(np.float64)
    guess = target.copy()
    for _ in range(iterations):
      residual = target - self(guess)
      guess += residual
      if np.abs(residual).max() < tolerance:
        break
    return guess.astype(points.dtype)


def random_tps(rng: np.random.Generator, grids: Sequence[int] = (4, 6)) -> ThinPlateSpline:
  """docs/reference.md §2's random warp as f: warped frame -> original frame (f(moved point) = grid point)."""
  grid = int(grids[int(rng.integers(len(grids)))])
  axis = np.linspace(-1.0, 1.0, grid)
  xs, ys = np.meshgrid(axis, axis)
  points = np.stack([xs.ravel(), ys.ravel()], axis=-1)
  moved = np.clip(points + (rng.random(points.shape) - 0.5) / grid, -1.0, 1.0)
  return ThinPlateSpline(moved, points)


@functools.lru_cache(maxsize=4)
def _pixel_grid(height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
  cols, rows = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
  cols.flags.writeable = rows.flags.writeable = False
  return cols, rows


def warp_image(image: np.ndarray, tps: ThinPlateSpline, step: int = 8) -> np.ndarray:
  """B'(p) = B(f(p)) for an RGB image, bilinear, zero outside (grid_sample semantics).

  The displacement f(p) - p is smooth, so it is evaluated every `step` pixels and upsampled.
  """
  height, width = image.shape[:2]
  coarse_h, coarse_w = -(-height // step), -(-width // step)
  # Continuous [0, 1] positions of the coarse cells' centres, as [-1, 1] grid coordinates.
  centres = geometry.xy_to_grid(geometry.cell_centers(coarse_h, coarse_w, np.float64))
  displacement = (tps(centres) - centres).astype(np.float32)
  displacement = cv2.resize(displacement, (width, height), interpolation=cv2.INTER_LINEAR)
  # grid g -> pixel index: ((g + 1) * W - 1) / 2, so a grid displacement d moves d * W / 2 pixels.
  cols, rows = _pixel_grid(height, width)
  map_x = cols + displacement[..., 0] * (width / 2.0)
  map_y = rows + displacement[..., 1] * (height / 2.0)
  return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                   borderValue=0)


def warp_ground_truth(tps: ThinPlateSpline, corr_a: np.ndarray, corr_b: np.ndarray,
                      mask_b: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Composes the warp of B into (corr_a, corr_b, mask_b); see the module docstring."""
  h, w = mask_b.shape
  sample_at = geometry.grid_to_xy(tps(geometry.xy_to_grid(geometry.cell_centers(h, w))))
  corr_b = geometry.bilinear_sample(corr_b, sample_at)
  mask_b = geometry.warp_map(mask_b, sample_at)
  corr_a = geometry.grid_to_xy(tps.inverse(geometry.xy_to_grid(corr_a.astype(np.float64))))
  return corr_a.astype(np.float32), corr_b.astype(np.float32), mask_b.astype(np.float32)


def key_padding(mask_b: np.ndarray) -> np.ndarray:
  """Background tokens of B (mask < 0.5) as padding, unless that would remove every token."""
  pad = mask_b < 0.5
  return np.zeros_like(pad) if pad.all() else pad


def _decode(example: Dict[str, object], name: str) -> np.ndarray:
  value = example[name]
  return builder.decode_jpeg(value) if isinstance(value, bytes) else np.asarray(value)


UNKNOWN_SCENE = -1


def scene_ids(example: Dict[str, object]) -> np.ndarray:
  """int32 `(2,)`: ids of the scene of A (and its pasted objects) and of B's background.

  Stable hashes of the stored scene keys; UNKNOWN_SCENE for '' or a dataset without them (< 1.1.0).
  """
  ids = []
  for name in ('scene_a', 'scene_background'):
    key = example.get(name, b'')
    key = key.encode() if isinstance(key, str) else bytes(key)
    ids.append(zlib.crc32(key) & 0x7fffffff if key else UNKNOWN_SCENE)
  return np.asarray(ids, np.int32)


def check_size(image: np.ndarray, image_size: int) -> None:
  if image.shape[:2] != (image_size, image_size):
    raise DataError(f'stored pairs are {image.shape[1]}x{image.shape[0]}, the loader was asked for '
                    f'{image_size}x{image_size}; generate pairs at that size')


def augment_pair(example: Dict[str, object], rng: np.random.Generator, config: AugmentConfig,
                 image_size: int) -> Dict[str, np.ndarray]:
  """One stored example (JPEG bytes or arrays) -> one training sample of docs/INTERFACES.md.

  Returns: image_a, image_b uint8 RGB `(H, W, 3)` (the train step normalises them on the device);
  corr_a, corr_b float32 `(h, w, 2)`; mask_a, mask_b
  float32 `(h, w)`; pad_b bool `(h, w)`; scenes int32 `(2,)` (`scene_ids`).
  """
  image_a = _decode(example, 'image_a_styled' if rng.random() < config.p_style else 'image_a')
  image_b = _decode(example, 'image_b_styled' if rng.random() < config.p_style else 'image_b')
  check_size(image_a, image_size)
  corr_a, corr_b = np.asarray(example['corr_a']), np.asarray(example['corr_b'])
  mask_a, mask_b = np.asarray(example['mask_a']), np.asarray(example['mask_b'])
  if rng.random() < config.p_tps:
    tps = random_tps(rng, config.tps_grids)
    image_b = warp_image(image_b, tps)
    corr_a, corr_b, mask_b = warp_ground_truth(tps, corr_a, corr_b, mask_b)
  pad_b = key_padding(mask_b) if rng.random() < config.p_pad else np.zeros(mask_b.shape, bool)
  return {'image_a': image_a, 'image_b': image_b, 'corr_a': corr_a,
          'corr_b': corr_b, 'mask_a': mask_a, 'mask_b': mask_b, 'pad_b': pad_b,
          'scenes': scene_ids(example)}


def eval_pair(example: Dict[str, object], index: int, image_size: int,
              style_variants: bool = False) -> Dict[str, np.ndarray]:
  """An unaugmented sample (same fields as `augment_pair`, `pad_b` all False).

  With `style_variants`, pair `index` uses the reference validation's pattern: index % 4 picks
  (plain, plain), (styled, plain), (plain, styled), (styled, styled) for (A, B).
  """
  styled_a = style_variants and index % 4 in (1, 3)
  styled_b = style_variants and index % 4 in (2, 3)
  image_a = _decode(example, 'image_a_styled' if styled_a else 'image_a')
  image_b = _decode(example, 'image_b_styled' if styled_b else 'image_b')
  check_size(image_a, image_size)
  mask_b = np.asarray(example['mask_b'])
  return {'image_a': image_a, 'image_b': image_b,
          'corr_a': np.asarray(example['corr_a']), 'corr_b': np.asarray(example['corr_b']),
          'mask_a': np.asarray(example['mask_a']), 'mask_b': mask_b,
          'pad_b': np.zeros(mask_b.shape, bool), 'scenes': scene_ids(example)}
