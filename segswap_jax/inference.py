"""The Python API: load a model, extract features, run pairs, score candidates.

  model = SegSwap.load('checkpoints/segswap_official')
  feats = model.features(images)            # uint8 (B, H, W, 3) -> (B, H/16, W/16, 1024), L2-normalised
  out = model.pair(feats[:1], feats[1:2])   # PairOutputs(out_a, out_b), each (B, h, w, 3) = (x, y, mask)
  result = model.score(query_image, target_images)   # SPEC §4 retrieval scores and everything behind them

Features are the cacheable part (tapnet-style split): `pair` and `score` take features or images.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image

from segswap_jax import checkpoints
from segswap_jax import model as model_lib
from segswap_jax import scoring


class ImageError(ValueError):
  """An image that cannot be used; the message names the file."""


class PairOutputs(NamedTuple):
  """Transformer outputs of a batch of pairs (A, B).

  out_a: `(B, h_a, w_a, 3)`: for each cell of A, (x, y) of its match in B in [0, 1] and the co-seg mask.
  out_b: `(B, h_b, w_b, 3)`: the same for B, pointing into A.
  """
  out_a: jax.Array
  out_b: jax.Array


def check_image_size(height: int, width: int) -> None:
  if height % model_lib.FEATURE_STRIDE or width % model_lib.FEATURE_STRIDE or height <= 0 or width <= 0:
    raise ImageError(f'image size {height}x{width} (HxW) must be positive multiples of '
                     f'{model_lib.FEATURE_STRIDE}')


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """Resizes uint8 `(H, W, 3)` to `size` = (height, width); untouched when already that size.

  PIL bilinear (antialiased when shrinking): what the reference's torchvision `Resize` does on PIL images.
  """
  height, width = size
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(PIL.Image.fromarray(image).resize((width, height), PIL.Image.BILINEAR))


def load_image(path: str, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """Reads an image file as RGB uint8 `(H, W, 3)`, resized to `size` = (height, width) if given.

  Truncated or corrupt files raise `ImageError` (PIL decodes fully and fails loudly, where OpenCV would
  return a partly grey image).
  """
  if size is not None:
    check_image_size(*size)
  if not os.path.isfile(path):
    raise ImageError(f'{path}: no such image file')
  try:
    with PIL.Image.open(path) as opened:
      image = np.asarray(opened.convert('RGB'))
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise ImageError(f'{path}: unreadable or corrupt image ({type(e).__name__})') from e
  return image if size is None else resize_image(image, size)


class SegSwap:
  """A loaded SegSwap model with jitted feature and pair functions."""

  def __init__(self, params: dict, config: ml_collections.ConfigDict, checkpoint_dir: Optional[str] = None):
    self.params = params
    self.config = config
    self.checkpoint_dir = checkpoint_dir
    backbone = model_lib.build_backbone(config)
    transformer = model_lib.build_transformer(config)

    def features(backbone_vars, images):
      return model_lib.l2_normalize(backbone.apply(backbone_vars, model_lib.normalize_images(images)))

    def pair(transformer_vars, feat_a, feat_b, pad_a, pad_b):
      return PairOutputs(*transformer.apply(transformer_vars, feat_a, feat_b, pad_a, pad_b, train=False))

    self._features = jax.jit(features)
    self._pair = jax.jit(pair)
    self._retrieval_scores = jax.jit(scoring.retrieval_scores)

  @classmethod
  def load(cls, checkpoint_dir: str) -> 'SegSwap':
    params, config = checkpoints.load_model(checkpoint_dir)
    return cls(params, config, checkpoint_dir)

  def features(self, images) -> jax.Array:
    """uint8 `(B, H, W, 3)` RGB -> L2-normalised `(B, H/16, W/16, 1024)`."""
    images = jnp.asarray(images)
    check_image_size(*images.shape[1:3])
    return self._features(self.params['backbone'], images)

  def pair(self, feat_a, feat_b, pad_a=None, pad_b=None) -> PairOutputs:
    """Features `(B, h_a, w_a, C)`, `(B, h_b, w_b, C)` -> PairOutputs (eval mode)."""
    return self._pair(self.params['transformer'], feat_a, feat_b, pad_a, pad_b)

  def score(self, query_image: np.ndarray, target_images: Sequence[np.ndarray], batch_size: int = 8,
            init_mask: Optional[np.ndarray] = None) -> dict:
    """SPEC §4 retrieval score of one query image against target images (all of one size).

    Targets run in fixed-size batches (the last one padded) so everything compiles once.

    Returns numpy arrays: `features_query` (h, w, C), `features_targets` (n, h', w', C), `out_query`
    (n, h, w, 3), `out_targets` (n, h', w', 3), `scores` (n,), `query_mask` (h, w),
    `transported_masks` (n, h, w).
    """
    targets = np.asarray(target_images)
    n = len(targets)
    if n == 0:
      raise ImageError('no target images')
    batch_size = max(1, min(batch_size, n))
    feat_q = self.features(np.asarray(query_image)[None])
    self_pair = self.pair(feat_q, feat_q)
    chunks = {k: [] for k in ('features_targets', 'out_query', 'out_targets', 'scores', 'transported_masks')}
    query_mask = None
    for start in range(0, n, batch_size):
      batch = targets[start:start + batch_size]
      valid = len(batch)
      if valid < batch_size:  # pad to a static shape
        batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - valid, 0)])
      feat_d = self.features(batch)
      out = self.pair(jnp.broadcast_to(feat_q, (batch_size,) + feat_q.shape[1:]), feat_d)
      result = self._retrieval_scores(feat_q[0], feat_d, self_pair.out_a[0], self_pair.out_b[0],
                                      out.out_a, out.out_b, init_mask)
      query_mask = result['query_mask']
      for key, value in (('features_targets', feat_d), ('out_query', out.out_a), ('out_targets', out.out_b),
                         ('scores', result['scores']), ('transported_masks', result['transported_masks'])):
        chunks[key].append(np.asarray(value)[:valid])
    output = {k: np.concatenate(v) for k, v in chunks.items()}
    output['features_query'] = np.asarray(feat_q[0])
    output['query_mask'] = np.asarray(query_mask)
    return output
