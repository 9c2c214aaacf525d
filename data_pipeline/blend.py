"""Pasting an object into a background exactly in place: Poisson blending (OpenCV `seamlessClone`,
NORMAL_CLONE; the reference) or a plain copy (the paper's copy-paste ablation)."""
import functools

import cv2
import numpy as np


def poisson_paste(background: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Blends the pixels of `source` under `mask` into `background`, at the same pixel positions.

  Args:
    background: RGB uint8 `(H, W, 3)`.
    source: RGB uint8 `(H, W, 3)`, already warped into the background's frame.
    mask: bool `(H, W)`, True where the object (with its dilated margin) is pasted.

  Returns:
    RGB uint8 `(H, W, 3)`: Poisson-blended result (NORMAL_CLONE keeps the source's gradients inside
    the mask and the background's values on its border).

  `seamlessClone` places the bounding box of the mask (whose one-pixel image border it clears) centred
  on the given point, at `centre - size // 2`; choosing the centre as below puts every pixel back where
  it came from, so the ground-truth affine holds to the pixel. (The reference passes
  `start + size // 2 - 1`, which shifts the paste by a pixel; we do not reproduce that.)
  """
  mask_u8 = mask.astype(np.uint8) * 255
  mask_u8[0, :] = mask_u8[-1, :] = 0
  mask_u8[:, 0] = mask_u8[:, -1] = 0
  x, y, w, h = cv2.boundingRect(mask_u8)
  if w < 3 or h < 3:  # Nothing (or a sliver) to blend: the solver needs an interior.
    return background.copy()
  return cv2.seamlessClone(np.ascontiguousarray(source), np.ascontiguousarray(background), mask_u8,
                           (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)


def copy_paste(background: np.ndarray, source: np.ndarray, mask: np.ndarray,
               feather: float = 0.0) -> np.ndarray:
  """Copies the pixels of `source` under `mask` into `background` (same arguments as `poisson_paste`):
  the object keeps its colours. With `feather` = 0 its outline is a hard edge; with feather = s > 0 the
  alpha is the mask eroded by 2s pixels and blurred with a Gaussian of s pixels, so it fades to 0 at
  the mask's border (no hard edge to recognise, and no pixel from outside the mask)."""
  if feather <= 0.0:
    return np.where(mask[..., None], source, background).astype(np.uint8)
  radius = int(np.ceil(2 * feather))
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
  inner = cv2.erode(mask.astype(np.uint8), kernel).astype(np.float32)
  alpha = cv2.GaussianBlur(inner, (0, 0), feather)[..., None] * mask[..., None]
  blended = alpha * source.astype(np.float32) + (1.0 - alpha) * background.astype(np.float32)
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def choose_paste(rng: np.random.Generator, poisson_prob: float, feather: float = 0.0):
  """`poisson_paste` with probability `poisson_prob`, else `copy_paste` with `feather` (no draw when
  the probability is 0 or 1, so the reference setting's random stream is unchanged)."""
  copy = functools.partial(copy_paste, feather=feather)
  if poisson_prob >= 1.0:
    return poisson_paste
  if poisson_prob <= 0.0:
    return copy
  return poisson_paste if rng.random() < poisson_prob else copy
