"""Image files for the evaluations: locating, decoding and resizing them as the reference does.

The reference resizes with PIL (torchvision `Resize` on PIL images = PIL bilinear, antialiased when
shrinking; the Brueghel query uses PIL's default filter, bicubic), so we use PIL here too: the exact
pixels the reference fed its backbone. Images come back as uint8 `(H, W, 3)` RGB.
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple

import numpy as np
from PIL import Image

from eval.retrieval import DataError

# Some copies of the datasets ship .png where the lists say .jpg (Tokyo 24/7) and vice versa.
_SWAPPABLE_EXTENSIONS = ('.jpg', '.png', '.jpeg')


def resolve(name: str, roots: Sequence[str]) -> str:
  """Finds the file for a list entry under the first root that has it.

  Tried per root, in order: `root/name`, then with the other image extension, then the bare file name
  (lists written for another folder layout) and its other extension.

  Raises DataError naming the entry and the first path tried when nothing exists.
  """
  variants = []
  for base in dict.fromkeys([name, os.path.basename(name)]):
    stem, ext = os.path.splitext(base)
    variants.append(base)
    if ext.lower() in _SWAPPABLE_EXTENSIONS:
      variants += [stem + e for e in _SWAPPABLE_EXTENSIONS if e != ext.lower()]
  for root in roots:
    for variant in variants:
      path = os.path.join(root, variant)
      if os.path.isfile(path):
        return path
  raise DataError(f'image not found: {os.path.join(roots[0], name)} (list entry {name!r})')


def open_rgb(path: str) -> Image.Image:
  """Decodes an image file as RGB PIL image; DataError naming the file if it cannot be read."""
  try:
    with Image.open(path) as image:
      return image.convert('RGB')
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f'cannot read image {path} ({type(e).__name__}: {e})') from None


def load_resized(path: str, size_wh: Tuple[int, int], resample=Image.BILINEAR) -> np.ndarray:
  """Reads `path` and resizes it to `size_wh` = (width, height) (aspect ratio not kept): uint8 (H, W, 3)."""
  image = open_rgb(path)
  if image.size != tuple(size_wh):
    image = image.resize(tuple(size_wh), resample=resample)
  return np.asarray(image, dtype=np.uint8)
