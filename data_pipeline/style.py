"""Stylised versions of the pair images (docs/reference.md §3: `image_a_styled`, `image_b_styled`).

Two stylisers, picked by `config.style.kind`:
  * 'adain': AdaIN style transfer (VGG-19 to relu4_1 + trained decoder, `data_pipeline/adain.py`), as
    the reference: a random style image, content/style weight alpha ~ U[0, 1]. Needs converted weights
    (`config.style.adain_weights`).
  * 'classical' (the default; no weights needed): a painterly variation of the image without a network:
    (1) colour statistics transfer (mean and std per Lab channel, Reinhard et al. 2001) from a random
    style image, mixed with the original by alpha ~ U[0, 1]; then (2) an OpenCV non-photorealistic
    filter, at random either `cv2.stylization` (watercolour-like flattening with edge emphasis) or
    `cv2.edgePreservingFilter` followed by a mild colour quantisation (flat painted patches).
Both keep the geometry: a styled image is pixel-aligned with its original, so the ground truth holds.

Style images come from `config.style.style_dir` (the reference uses the Brueghel paintings); without one,
the segment source's own images serve as colour references.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Dict, Sequence, Tuple

import cv2
import numpy as np

from data_pipeline import segments
from segswap_jax.errors import DataError

Stylizer = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def style_image_paths(style_dir: str, fallback: Sequence[str]) -> list:
  """Image files of `style_dir` (sorted), or `fallback` when no folder is given."""
  if not style_dir:
    return list(fallback)
  if not os.path.isdir(style_dir):
    raise DataError(f'style folder not found: {style_dir}')
  paths = sorted(p for p in glob.glob(os.path.join(style_dir, '**', '*'), recursive=True)
                 if p.lower().endswith(segments.IMAGE_EXTENSIONS))
  if not paths:
    raise DataError(f'no images in style folder {style_dir}')
  return paths


def lab_statistics(image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std `(3,)` of an RGB uint8 image in OpenCV's float Lab space."""
  lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB).reshape(-1, 3)
  return lab.mean(axis=0), lab.std(axis=0) + 1e-3


def transfer_colour(image: np.ndarray, style_mean: np.ndarray, style_std: np.ndarray,
                    alpha: float) -> np.ndarray:
  """Moves the Lab statistics of `image` towards the style's by `alpha` in [0, 1]; RGB uint8 out."""
  lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
  mean, std = lab.reshape(-1, 3).mean(axis=0), lab.reshape(-1, 3).std(axis=0) + 1e-3
  moved = (lab - mean) / std * style_std + style_mean
  lab = alpha * moved + (1.0 - alpha) * lab
  lab[..., 0] = np.clip(lab[..., 0], 0.0, 100.0)
  rgb = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
  return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def painterly_filter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One of two OpenCV non-photorealistic filters with random strength; RGB uint8 in and out."""
  sigma_s = rng.uniform(30.0, 90.0)
  if rng.random() < 0.5:
    return cv2.stylization(image, sigma_s=sigma_s, sigma_r=rng.uniform(0.25, 0.6))
  smooth = cv2.edgePreservingFilter(image, flags=cv2.RECURS_FILTER, sigma_s=sigma_s,
                                    sigma_r=rng.uniform(0.2, 0.5))
  levels = int(rng.integers(6, 16))
  step = 256.0 / levels
  return np.clip((np.floor(smooth / step) + 0.5) * step, 0, 255).astype(np.uint8)


class ClassicalStylizer:
  """Colour transfer from a random style image + a painterly OpenCV filter (see module docstring)."""

  def __init__(self, style_paths: Sequence[str], stats_side: int = 128):
    if not style_paths:
      raise DataError('classical stylisation needs at least one style image')
    self.style_paths = list(style_paths)
    self.stats_side = stats_side
    self._stats: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

  def _style_stats(self, index: int):
    if index not in self._stats:
      self._stats[index] = lab_statistics(segments.read_image(self.style_paths[index],
                                                              self.stats_side))
    return self._stats[index]

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 `(H, W, 3)` -> stylised RGB uint8 `(H, W, 3)`; raises ImageError for a bad style."""
    index = int(rng.integers(len(self.style_paths)))
    mean, std = self._style_stats(index)
    return painterly_filter(transfer_colour(image, mean, std, rng.uniform(0.0, 1.0)), rng)


def make_stylizer(style_config, fallback_paths: Sequence[str]) -> Stylizer:
  """The styliser named by `style_config.kind`: 'classical' or 'adain'."""
  paths = style_image_paths(style_config.style_dir, fallback_paths)
  if style_config.kind == 'classical':
    return ClassicalStylizer(paths)
  if style_config.kind == 'adain':
    from data_pipeline import adain
    return adain.AdaINStylizer(style_config.adain_weights, paths, content_size=style_config.adain_size)
  raise DataError(f'unknown style kind {style_config.kind!r}; use classical or adain')

