"""Coordinates, bilinear sampling and mask warping: the one implementation used everywhere.

Conventions (shared by the model outputs, ground truth, losses, scoring and discovery):
  * A correspondence map `xy` has shape `(..., h, w, 2)`: channel 0 is x (along width), channel 1 is y
    (along height) of the corresponding location in the *other* image, in [0, 1] units of that image.
    Values outside [0, 1] mean "leaves the image".
  * Cell (row i, column j) of an h x w map has its centre at x = (j + 0.5) / w, y = (i + 0.5) / h.
  * Sampling follows PyTorch `grid_sample(..., mode='bilinear', padding_mode='zeros',
    align_corners=False)` with grid g = (xy - 0.5) * 2, which is what the reference does.

Every function works on numpy arrays (host side: data generation, discovery) and on jax arrays or
tracers (inside jit): the array module is picked from the inputs, so the logic exists once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def array_module(*arrays):
  """Returns `jax.numpy` if any input is a jax array (or tracer), else `numpy`."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def xy_to_grid(xy):
  """[0, 1] coordinates -> grid_sample's [-1, 1] grid (align_corners=False)."""
  return (xy - 0.5) * 2.0


def grid_to_xy(grid):
  """grid_sample's [-1, 1] grid -> [0, 1] coordinates."""
  return grid * 0.5 + 0.5


def cell_centers(h: int, w: int, dtype=np.float32) -> np.ndarray:
  """Centres of the cells of an h x w map in [0, 1] units, `(h, w, 2)` as (x, y)."""
  ys = (np.arange(h, dtype=np.float64) + 0.5) / h
  xs = (np.arange(w, dtype=np.float64) + 0.5) / w
  grid_x, grid_y = np.meshgrid(xs, ys)
  return np.stack([grid_x, grid_y], axis=-1).astype(dtype)


def target_cells(xy, h_other: int, w_other: int):
  """Integer cell hit by each correspondence, as the reference rounds it.

  Args:
    xy: `(..., 2)` (x, y) in [0, 1] of the other image.
    h_other, w_other: feature-map size of the other image.

  Returns:
    `(..., 2)` int32 (column, row) = (round(x * (w - 1)), round(y * (h - 1))), rounding half to even
    (numpy's and jnp's `round`). Not clipped: callers clip or mask as their protocol says.
  """
  xp = array_module(xy)
  col = xp.round(xy[..., 0] * (w_other - 1))
  row = xp.round(xy[..., 1] * (h_other - 1))
  return xp.stack([col, row], axis=-1).astype(xp.int32)


def bilinear_sample(values, xy):
  """Samples `values` at [0, 1] locations, exactly like grid_sample (bilinear, zeros, align_corners=False).

  Args:
    values: `(..., H, W, C)` map to sample from.
    xy: `(..., h, w, 2)` locations (x, y) in [0, 1] units of `values`; leading dims equal to those of
      `values`.

  Returns:
    `(..., h, w, C)` sampled values; taps outside the map contribute zero.
  """
  xp = array_module(values, xy)
  *batch, height, width, channels = values.shape
  *batch_xy, h, w, _ = xy.shape
  if tuple(batch) != tuple(batch_xy):
    raise ValueError(f'bilinear_sample: batch dims differ: values {values.shape} vs xy {xy.shape}')
  num = int(np.prod(batch, dtype=np.int64))
  flat_values = values.reshape(num, height * width, channels)
  # Pixel coordinates of the sample points: ((g + 1) * W - 1) / 2 with g = (x - 0.5) * 2.
  ix = xy_to_grid(xy[..., 0]).reshape(num, h * w)
  iy = xy_to_grid(xy[..., 1]).reshape(num, h * w)
  ix = ((ix + 1.0) * width - 1.0) / 2.0
  iy = ((iy + 1.0) * height - 1.0) / 2.0
  x0 = xp.floor(ix)
  y0 = xp.floor(iy)
  out = 0.0
  for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
    xi = x0 + dx
    yi = y0 + dy
    weight = (1.0 - xp.abs(ix - xi)) * (1.0 - xp.abs(iy - yi))
    inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
    index = (xp.clip(yi, 0, height - 1) * width + xp.clip(xi, 0, width - 1)).astype(xp.int32)
    tap = xp.take_along_axis(flat_values, index[..., None], axis=1)
    out = out + tap * (weight * inside).astype(values.dtype)[..., None]
  return out.reshape(*batch, h, w, channels)


def warp_map(values, xy):
  """Samples a single-channel map `(..., H, W)` at `xy` `(..., h, w, 2)` -> `(..., h, w)`."""
  return bilinear_sample(values[..., None], xy)[..., 0]
