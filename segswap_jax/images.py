"""Reading and resizing image files: the one image reader of predict, the evaluations, discovery and
data generation.

The reference reads images with PIL (`Image.open(path).convert('RGB')`) and resizes them with
torchvision's `Resize` on PIL images, which is PIL bilinear (antialiased when shrinking); its Brueghel
query resize uses PIL's default filter (bicubic). So do we: the exact pixels the reference fed its
backbone. Every file PIL decodes becomes RGB uint8 `(H, W, 3)` the same way:
  * 8-bit RGB, grey, palette, CMYK, and JPEG/PNG/TIFF/WebP alike: PIL's own conversion (the reference's);
  * 16-bit (and 32-bit integer) grey: the high byte (what PIL keeps of 16-bit colour PNGs), so a 16-bit
    file and its 8-bit version read the same;
  * an alpha channel: dropped (`alpha='drop'`, the reference's conversion) or composited onto white
    (`alpha='white'`, what data generation does with transparent segment sources);
  * truncated or corrupt files: `ImageError` naming the file (PIL decodes fully and fails loudly).
Sizes are always (height, width).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import PIL.Image

from segswap_jax import errors
from segswap_jax.model import FEATURE_STRIDE

BILINEAR = PIL.Image.BILINEAR
BICUBIC = PIL.Image.BICUBIC


def check_image_size(height: int, width: int, what: str = 'image size') -> None:
  """Raises ConfigError unless both sides are positive multiples of the feature stride (16)."""
  if height <= 0 or width <= 0 or height % FEATURE_STRIDE or width % FEATURE_STRIDE:
    raise errors.ConfigError(f'{what} {height}x{width} (HxW): both sides must be positive multiples of '
                             f'{FEATURE_STRIDE}')


ALPHA_MODES = ('drop', 'white')
_WIDE_GREY = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def _to_rgb(image: PIL.Image.Image, alpha: str) -> PIL.Image.Image:
  """Any decoded PIL image -> 8-bit RGB, as the module doc says."""
  if image.mode in _WIDE_GREY:
    values = np.asarray(image).astype(np.int64)
    shift = 8 if image.mode != 'I' or values.max(initial=0) <= 65535 else 24
    return PIL.Image.fromarray(np.clip(values >> shift, 0, 255).astype(np.uint8), 'L').convert('RGB')
  if image.mode == 'F':
    values = np.asarray(image, np.float64)
    scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
    return PIL.Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), 'L').convert('RGB')
  has_alpha = image.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or (image.mode == 'P' and 'transparency' in image.info)
  if alpha == 'white' and has_alpha:
    rgba = np.asarray(image.convert('RGBA'))
    weight = rgba[..., 3:].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * weight + 255.0 * (1.0 - weight)
    return PIL.Image.fromarray(np.round(rgb).astype(np.uint8), 'RGB')
  return image.convert('RGB')


def open_rgb(path: str, alpha: str = 'drop') -> PIL.Image.Image:
  """Decodes an image file fully as an 8-bit RGB PIL image; ImageError naming the file if it cannot be
  used. `alpha`: 'drop' (the reference's conversion) or 'white' (composite onto white)."""
  if alpha not in ALPHA_MODES:
    raise errors.ConfigError(f'alpha must be one of {ALPHA_MODES}, got {alpha!r}')
  if not os.path.isfile(path):
    raise errors.ImageError(path, 'no such image file')
  try:
    with PIL.Image.open(path) as opened:
      opened.load()
      return _to_rgb(opened, alpha)
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise errors.ImageError(path, f'unreadable or corrupt image ({type(e).__name__})') from None


def read_rgb(path: str, alpha: str = 'drop') -> np.ndarray:
  """The file as RGB uint8 `(H, W, 3)` at its own size (`open_rgb`)."""
  return np.asarray(open_rgb(path, alpha), dtype=np.uint8)


def resize_image(image: np.ndarray, size: Tuple[int, int], resample=BILINEAR) -> np.ndarray:
  """Resizes uint8 `(H, W, 3)` to `size` = (height, width) (aspect not kept); untouched at that size."""
  height, width = size
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(PIL.Image.fromarray(image).resize((width, height), resample))


def load_image(path: str, size: Optional[Tuple[int, int]] = None, resample=BILINEAR) -> np.ndarray:
  """Reads an image file as RGB uint8 `(H, W, 3)`, resized to `size` = (height, width) if given."""
  if size is not None:
    check_image_size(*size)
  image = open_rgb(path)
  if size is not None and image.size != (size[1], size[0]):
    image = image.resize((size[1], size[0]), resample=resample)
  return np.asarray(image, dtype=np.uint8)


def image_size(path: str) -> Tuple[int, int]:
  """(height, width) from the file header, without decoding the pixels."""
  try:
    with PIL.Image.open(path) as image:
      return image.size[1], image.size[0]
  except (OSError, ValueError) as e:
    raise errors.ImageError(path, f'unreadable image ({type(e).__name__})') from None
