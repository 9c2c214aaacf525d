"""Reading and resizing image files: the one image reader of predict, the evaluations and discovery.

The reference reads images with PIL and resizes them with torchvision's `Resize` on PIL images, which is
PIL bilinear (antialiased when shrinking); its Brueghel query resize uses PIL's default filter (bicubic).
So do we: the exact pixels the reference fed its backbone. Images come back as RGB uint8 `(H, W, 3)`;
sizes are always (height, width).
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


def open_rgb(path: str) -> PIL.Image.Image:
  """Decodes an image file fully as an RGB PIL image; ImageError naming the file if it cannot be used.

  PIL decodes the whole file and fails loudly on truncated or corrupt data, where OpenCV would return a
  partly grey image.
  """
  if not os.path.isfile(path):
    raise errors.ImageError(path, 'no such image file')
  try:
    with PIL.Image.open(path) as opened:
      return opened.convert('RGB')
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise errors.ImageError(path, f'unreadable or corrupt image ({type(e).__name__})') from None


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
