"""Drawing: masks overlaid on images, correspondence lines between pairs, grids of panels (OpenCV, RGB).

Every function takes and returns RGB uint8 images `(H, W, 3)`; `save_png` writes one to disk.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

MASK_COLOR = (255, 40, 40)


def upsample_map(values: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """A `(h, w)` map -> `(H, W)` by bilinear interpolation (pixel-centre aligned, as align_corners=False)."""
  height, width = size
  return cv2.resize(np.asarray(values, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def overlay_mask(image: np.ndarray, mask: np.ndarray, color=MASK_COLOR, alpha: float = 0.55,
                 contour: bool = True) -> np.ndarray:
  """Tints `image` by a soft `(h, w)` mask in [0, 1] (upsampled to the image) and outlines mask > 0.5."""
  soft = np.clip(upsample_map(mask, image.shape[:2]), 0.0, 1.0)[..., None]
  tint = np.asarray(color, np.float32)[None, None]
  out = image.astype(np.float32) * (1 - alpha * soft) + tint * alpha * soft
  out = np.clip(out, 0, 255).astype(np.uint8)
  return outline_mask(out, mask) if contour else out


def outline_mask(image: np.ndarray, mask: np.ndarray, color=(255, 255, 0), thickness: int = 2,
                 threshold: float = 0.5) -> np.ndarray:
  """Draws the outline of `mask > threshold` (a `(h, w)` map, upsampled to the image) on a copy."""
  binary = (upsample_map(mask, image.shape[:2]) > threshold).astype(np.uint8)
  contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  out = image.copy()
  cv2.drawContours(out, contours, -1, color, thickness)
  return out


def enlarge(image: np.ndarray, min_side: int) -> np.ndarray:
  """Upscales (bilinear) so the shorter side is at least `min_side`, for pictures of small inputs."""
  factor = int(np.ceil(min_side / min(image.shape[:2])))
  if factor <= 1:
    return image
  return cv2.resize(image, (image.shape[1] * factor, image.shape[0] * factor),
                    interpolation=cv2.INTER_LINEAR)


def _pad_to_height(image: np.ndarray, height: int) -> np.ndarray:
  if image.shape[0] == height:
    return image
  pad = np.full((height - image.shape[0],) + image.shape[1:], 255, np.uint8)
  return np.concatenate([image, pad], axis=0)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
  height = max(left.shape[0], right.shape[0])
  spacer = np.full((height, gap, 3), 255, np.uint8)
  return np.concatenate([_pad_to_height(left, height), spacer, _pad_to_height(right, height)], axis=1)


def correspondence_lines(canvas: np.ndarray, width_left: int, size_left: Tuple[int, int],
                         size_right: Tuple[int, int], xy: np.ndarray, weight: np.ndarray,
                         num_lines: int = 20, gap: int = 8, threshold: float = 0.5,
                         seed: int = 0) -> np.ndarray:
  """Draws lines from cells of the left image to their predicted location in the right image.

  Args:
    canvas: a `side_by_side` image (drawn on a copy).
    width_left: width of the left panel in pixels.
    size_left, size_right: (height, width) of the two images in pixels.
    xy: `(h, w, 2)` predicted (x, y) in [0, 1] of the right image for each left cell.
    weight: `(h, w)` cell confidences; lines are sampled among cells above `threshold`, likeliest first.
  """
  out = canvas.copy()
  h, w = weight.shape
  candidates = np.flatnonzero(weight.reshape(-1) > threshold)
  if candidates.size == 0:
    return out
  rng = np.random.default_rng(seed)
  chosen = rng.choice(candidates, size=min(num_lines, candidates.size), replace=False,
                      p=weight.reshape(-1)[candidates] / weight.reshape(-1)[candidates].sum())
  colors = cv2.applyColorMap(np.linspace(0, 255, len(chosen)).astype(np.uint8)[:, None], cv2.COLORMAP_HSV)
  for color, index in zip(colors[:, 0, ::-1], chosen):
    row, col = divmod(int(index), w)
    start = (int((col + 0.5) / w * size_left[1]), int((row + 0.5) / h * size_left[0]))
    x, y = np.clip(xy[row, col], 0.0, 1.0)
    end = (int(width_left + gap + x * size_right[1]), int(y * size_right[0]))
    color = tuple(int(c) for c in color)
    cv2.line(out, start, end, color, 1, cv2.LINE_AA)
    cv2.circle(out, start, 3, color, -1, cv2.LINE_AA)
    cv2.circle(out, end, 3, color, -1, cv2.LINE_AA)
  return out


def put_title(image: np.ndarray, text: str) -> np.ndarray:
  """Adds a white strip with `text` above the image."""
  strip = np.full((24, image.shape[1], 3), 255, np.uint8)
  cv2.putText(strip, text, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
  return np.concatenate([strip, image], axis=0)


GT_COLOR = (0, 200, 255)


def draw_pair(image_a: np.ndarray, image_b: np.ndarray, out_a: np.ndarray, out_b: np.ndarray,
              title: Optional[str] = None, num_lines: int = 20, gt_mask_a: Optional[np.ndarray] = None,
              gt_mask_b: Optional[np.ndarray] = None) -> np.ndarray:
  """One pair: both images with their predicted masks (tint, yellow outline at 0.5), lines from A's
  confident cells into B, and the ground-truth masks outlined in light blue when given."""
  left = overlay_mask(image_a, out_a[..., 2])
  right = overlay_mask(image_b, out_b[..., 2])
  if gt_mask_a is not None:
    left = outline_mask(left, gt_mask_a, GT_COLOR, 1)
  if gt_mask_b is not None:
    right = outline_mask(right, gt_mask_b, GT_COLOR, 1)
  canvas = side_by_side(left, right)
  canvas = correspondence_lines(canvas, left.shape[1], image_a.shape[:2], image_b.shape[:2], out_a[..., :2],
                                out_a[..., 2], num_lines=num_lines)
  return put_title(canvas, title) if title else canvas


def stack_rows(rows: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
  """Stacks panels vertically, padding narrower ones with white."""
  width = max(r.shape[1] for r in rows)
  padded = []
  for i, row in enumerate(rows):
    if row.shape[1] < width:
      row = np.concatenate([row, np.full((row.shape[0], width - row.shape[1], 3), 255, np.uint8)], axis=1)
    padded.append(row)
    if i < len(rows) - 1:
      padded.append(np.full((gap, width, 3), 255, np.uint8))
  return np.concatenate(padded, axis=0)


def save_png(path: str, image: np.ndarray) -> str:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
    raise OSError(f'{path}: could not write the image')
  return path
