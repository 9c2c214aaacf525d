"""What the backbone sees and what comes out of it: input normalisation and L2-normalised features.

  normalization='imagenet'      RGB in [0, 255] -> ((x / 255) - mean) / std, the standard input (default)
  normalization='denormalized'  (x / 255) * std + mean: what the released Tokyo/Pitts candidate loader and
                                Internet loader feed (the inverse of the normalisation, a bug kept as a
                                switch for parity; docs/reference.md §9)
  normalization='none'          the images are already model inputs (float, normalised by the caller)

Backbone features are L2-normalised over channels (`F.normalize(x, dim=1)`, eps 1e-12) before the
transformer and before scoring, everywhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ('imagenet', 'denormalized', 'none')


def normalize_images(images: jax.Array) -> jax.Array:
  """RGB in [0, 255] (uint8 or float) `(..., 3)` -> ImageNet-normalised float32."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def model_inputs(images: jax.Array, normalization: str = 'imagenet') -> jax.Array:
  """Images `(B, H, W, 3)` -> the backbone's float32 input under `normalization` (module doc)."""
  if normalization == 'imagenet':
    return normalize_images(images)
  if normalization == 'denormalized':
    x = jnp.asarray(images, jnp.float32) / 255.0
    return x * jnp.asarray(IMAGENET_STD, jnp.float32) + jnp.asarray(IMAGENET_MEAN, jnp.float32)
  if normalization == 'none':
    return jnp.asarray(images, jnp.float32)
  raise ValueError(f'normalization must be one of {NORMALIZATIONS}, got {normalization!r}')


def l2_normalize(features: jax.Array, eps: float = 1e-12) -> jax.Array:
  """L2-normalises over the last (channel) axis, like `F.normalize(x, dim=1)`."""
  norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
  return features / jnp.maximum(norm, eps)


def backbone_features(backbone, backbone_vars, images: jax.Array, normalization: str = 'imagenet') -> jax.Array:
  """Images `(B, H, W, 3)` -> L2-normalised features `(B, H/16, W/16, C)` (traceable, jit it)."""
  return l2_normalize(backbone.apply(backbone_vars, model_inputs(images, normalization)))
