"""NC-Net (Rocco et al., neighbourhood consensus networks), channels-last, and the SegSwap NC-Net matcher.

The building blocks reproduce the original PyTorch code on the same weights (docs/reference.md §9,
`tests/test_ncnet.py` against `tests/fixtures/ncnet_seed11.npz`):

  correlation_4d(fa (B, hA, wA, C), fb (B, hB, wB, C)) -> (B, hA, wA, hB, wB)
  mutual_matching(corr)                 c * (c / (maxA + 1e-5)) * (c / (maxB + 1e-5))
  Conv4d(features, kernel_size)         'same' zero padding, stride 1, bias; (B, hA, wA, hB, wB, C_in) ->
                                        (B, hA, wA, hB, wB, C_out); `impl='4d'` is one
                                        `lax.conv_general_dilated` with four spatial dimensions, `impl='3d'`
                                        sums 3-D convolutions over the first kernel axis (backends without
                                        4-D convolutions); both give the same numbers
  NeighConsensus(kernel_sizes, channels, symmetric=True)   Conv4d + ReLU stack on (B, hA, wA, hB, wB, 1);
                                        symmetric: net(x) + swapAB(net(swapAB(x)))
  maxpool4d(corr, k)                    each k^4 box's max and its in-box offsets along hA, wA, hB, wB
                                        (first maximum wins), per batch item (the original maxes across
                                        the batch when it holds more than one pair)

Kernels are stored (k1, k2, k3, k4, in, out); the original stores (k1, out, in, k2, k3, k4)
(`segswap_jax.convert.ncnet_consensus_params` maps one onto the other).

`NCNetMatcher` puts NC-Net behind the transformer's outputs (docs/training.md "NC-Net"): per image,
`(B, h, w, 3)` = (x, y) of the match in the other image and a co-segmentation mask, so the SegSwap
losses, the retrieval score and discovery run on it unchanged.
  * scores: L2-normalised features -> correlation -> mutual matching -> NeighConsensus -> mutual
    matching (the original forward); optionally relocalised: the correlation is max-pooled by 2 in all
    four axes before the consensus (16 times fewer 4-D cells), and the in-box offsets bring the
    matches back to the feature grid;
  * (x, y): a soft-argmax over the other image's cells, softmax(beta * S) with the inverse temperature
    beta = softplus(a learned scalar), initialised to 10;
  * mask: a small learned head (2 -> 16 -> 1, ReLU, sigmoid) on the cell's best filtered score and its
    best softmax probability, both telling whether the cell has a match in the other image.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from segswap_jax import errors
from segswap_jax import geometry

MUTUAL_EPS = 1e-5
CONV_IMPLS = ('4d', '3d')


def _check_rank(name: str, array, rank: int, layout: str) -> None:
  if array.ndim != rank:
    raise errors.DataError(f'{name}: expected a rank-{rank} array {layout}, got shape {tuple(array.shape)}')


def feature_l2_norm(features: jax.Array, eps: float = 1e-6) -> jax.Array:
  """The original NC-Net's channel normalisation: x / sqrt(sum_c x^2 + eps), channels last."""
  return features / jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True) + eps)


def correlation_4d(feat_a: jax.Array, feat_b: jax.Array) -> jax.Array:
  """(B, hA, wA, C), (B, hB, wB, C) -> (B, hA, wA, hB, wB): every dot product of a cell of A and one of B."""
  _check_rank('correlation_4d feat_a', feat_a, 4, '(B, hA, wA, C)')
  _check_rank('correlation_4d feat_b', feat_b, 4, '(B, hB, wB, C)')
  if feat_a.shape[0] != feat_b.shape[0] or feat_a.shape[-1] != feat_b.shape[-1]:
    raise errors.DataError(f'correlation_4d: batch and channels must agree, got {tuple(feat_a.shape)} and '
                           f'{tuple(feat_b.shape)}')
  return jnp.einsum('bijc,bklc->bijkl', feat_a, feat_b)


def _squeeze_channel(corr: jax.Array, name: str):
  """(B, hA, wA, hB, wB) or (B, hA, wA, hB, wB, 1) -> the 5-D tensor and whether a channel was there."""
  if corr.ndim == 6 and corr.shape[-1] == 1:
    return corr[..., 0], True
  _check_rank(name, corr, 5, '(B, hA, wA, hB, wB) (or with a trailing channel of 1)')
  return corr, False


def mutual_matching(corr: jax.Array) -> jax.Array:
  """Soft mutual nearest neighbours: c * (c / (maxA + 1e-5)) * (c / (maxB + 1e-5)).

  maxA is the (signed) max over B's cells for each cell of A, maxB the max over A's cells for each cell
  of B. `corr` `(B, hA, wA, hB, wB)` or with a trailing channel of 1; the same shape comes back.
  """
  values, channel = _squeeze_channel(corr, 'mutual_matching')
  max_a = jnp.max(values, axis=(3, 4), keepdims=True)
  max_b = jnp.max(values, axis=(1, 2), keepdims=True)
  out = values * ((values / (max_a + MUTUAL_EPS)) * (values / (max_b + MUTUAL_EPS)))
  return out[..., None] if channel else out


def swap_ab(corr: jax.Array) -> jax.Array:
  """(B, hA, wA, hB, wB, ...) -> (B, hB, wB, hA, wA, ...): the correlation seen from B."""
  axes = (0, 3, 4, 1, 2) + tuple(range(5, corr.ndim))
  return jnp.transpose(corr, axes)


def conv4d(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None, impl: str = '4d') -> jax.Array:
  """'Same' 4-D cross-correlation: x `(B, d1, d2, d3, d4, C_in)`, kernel `(k1, k2, k3, k4, C_in, C_out)`."""
  _check_rank('conv4d input', x, 6, '(B, d1, d2, d3, d4, C)')
  k1 = kernel.shape[0]
  pad = k1 // 2  # the original takes the padding of the first kernel axis for all four
  if impl == '4d':
    out = lax.conv_general_dilated(x, kernel, window_strides=(1, 1, 1, 1), padding=[(pad, pad)] * 4,
                                   dimension_numbers=('NWXYZC', 'WXYZIO', 'NWXYZC'))
  elif impl == '3d':
    batch, d1, d2, d3, d4, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0), (0, 0)))
    out = 0.0
    for a in range(k1):  # output slice i along d1 sums the kernel slices a over input slices i + a - pad
      slices = padded[:, a:a + d1].reshape(batch * d1, d2, d3, d4, channels)
      part = lax.conv_general_dilated(slices, kernel[a], window_strides=(1, 1, 1), padding=[(pad, pad)] * 3,
                                      dimension_numbers=('NXYZC', 'XYZIO', 'NXYZC'))
      out = out + part.reshape(batch, d1, d2, d3, d4, -1)
  else:
    raise errors.ConfigError(f'conv4d impl must be one of {CONV_IMPLS}, got {impl!r}')
  return out if bias is None else out + bias


class Conv4d(nn.Module):
  """4-D convolution layer (docs/reference.md §9): kernel `(k, k, k, k, in, out)`, bias `(out,)`."""
  features: int
  kernel_size: int
  impl: str = '4d'

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    bound = 1.0 / np.sqrt(x.shape[-1] * k ** 4)  # PyTorch's default bias init: U(-1/sqrt(fan_in), ..)
    kernel = self.param('kernel', nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal'),
                        (k, k, k, k, x.shape[-1], self.features))
    bias = self.param('bias', lambda key, shape: jax.random.uniform(key, shape, minval=-bound, maxval=bound),
                      (self.features,))
    return conv4d(x, kernel, bias, self.impl)


class NeighConsensus(nn.Module):
  """Conv4d + ReLU layers over the correlation `(B, hA, wA, hB, wB, 1)` -> the same shape.

  `symmetric`: net(x) + swapAB(net(swapAB(x))), so the result does not depend on which image is A.
  """
  kernel_sizes: Sequence[int] = (3, 3, 3)
  channels: Sequence[int] = (10, 10, 1)
  symmetric: bool = True
  impl: str = '4d'

  def setup(self):
    if len(self.kernel_sizes) != len(self.channels) or not self.kernel_sizes:
      raise errors.ConfigError(f'NeighConsensus: kernel_sizes {list(self.kernel_sizes)} and channels '
                               f'{list(self.channels)} must be non-empty and of one length')
    if any(k % 2 == 0 or k < 1 for k in self.kernel_sizes):
      raise errors.ConfigError(f'NeighConsensus: kernel sizes must be odd, got {list(self.kernel_sizes)}')
    if self.channels[-1] != 1:
      raise errors.ConfigError(f'NeighConsensus: the last layer must have 1 channel, got {list(self.channels)}')
    self.layers = [Conv4d(c, k, self.impl, name=f'conv_{i}')
                   for i, (k, c) in enumerate(zip(self.kernel_sizes, self.channels))]

  def _net(self, x):
    for layer in self.layers:
      x = nn.relu(layer(x))
    return x

  def __call__(self, x):
    _check_rank('NeighConsensus input', x, 6, '(B, hA, wA, hB, wB, 1)')
    if not self.symmetric:
      return self._net(x)
    return self._net(x) + swap_ab(self._net(swap_ab(x)))


def maxpool4d(corr: jax.Array, k: int) -> Tuple[jax.Array, Tuple[jax.Array, ...]]:
  """Max over each k^4 box of `corr` `(B, hA, wA, hB, wB)` (or with a trailing channel of 1).

  Returns the pooled `(B, hA/k, wA/k, hB/k, wB/k)` and the int32 offsets (i, j, kk, l) in [0, k) of the
  maximum inside its box along hA, wA, hB, wB (the first maximum in the order n = i k^3 + j k^2 + kk k + l
  wins, as in the original). Every axis must divide by k.
  """
  values, channel = _squeeze_channel(corr, 'maxpool4d')
  batch, *dims = values.shape
  if k < 1 or any(d % k for d in dims):
    raise errors.DataError(f'maxpool4d: every axis of {tuple(values.shape[1:])} must divide by k={k}')
  coarse = [d // k for d in dims]
  boxes = values.reshape(batch, coarse[0], k, coarse[1], k, coarse[2], k, coarse[3], k)
  boxes = boxes.transpose(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(batch, *coarse, k ** 4)
  index = jnp.argmax(boxes, axis=-1)
  pooled = jnp.max(boxes, axis=-1)
  offsets = (index // k ** 3, (index // k ** 2) % k, (index // k) % k, index % k)
  offsets = tuple(o.astype(jnp.int32) for o in offsets)
  if channel:
    return pooled[..., None], tuple(o[..., None] for o in offsets)
  return pooled, offsets


# ----------------------------------------------------------------------------------------------------
# The SegSwap matcher with NC-Net scores.
# ----------------------------------------------------------------------------------------------------

NEG_INF = -1e9


class NCNetMatcher(nn.Module):
  """NC-Net behind the transformer's interface: `(feat_a, feat_b, pad_a, pad_b) -> (out_a, out_b)`.

  feat_* `(B, h*, w*, C)` L2-normalised; pad_* bool `(B, h*, w*)`, True = a cell that is not matched
  (its correlations are zeroed and it is left out of the other image's soft-argmax). Returns
  `(B, h*, w*, 3)` per image: (x, y) in [0, 1] of the match in the other image and the mask, in (0, 1).
  """
  kernel_sizes: Sequence[int] = (3, 3, 3)
  channels: Sequence[int] = (16, 16, 1)
  relocalization: int = 0        # 0: none; 2: consensus on the correlation max-pooled by 2
  impl: str = '4d'
  mask_hidden: int = 16

  @nn.compact
  def __call__(self, feat_a, feat_b, pad_a=None, pad_b=None, *, train: bool = False):
    del train  # no dropout in NC-Net
    batch, h_a, w_a, _ = feat_a.shape
    _, h_b, w_b, _ = feat_b.shape
    valid_a = jnp.ones((batch, h_a, w_a), feat_a.dtype) if pad_a is None else 1.0 - pad_a.astype(feat_a.dtype)
    valid_b = jnp.ones((batch, h_b, w_b), feat_b.dtype) if pad_b is None else 1.0 - pad_b.astype(feat_b.dtype)
    corr = correlation_4d(feat_a, feat_b) * _pair_mask(valid_a, valid_b)
    k = self.relocalization
    if k > 1:
      corr, offsets = maxpool4d(_pad_to_multiple(corr, k), k)
      coarse_valid_a, coarse_valid_b = _pool_valid(valid_a, k), _pool_valid(valid_b, k)
    else:
      coarse_valid_a, coarse_valid_b = valid_a, valid_b
    consensus = NeighConsensus(self.kernel_sizes, self.channels, True, self.impl, name='consensus')
    matched = _masked_mutual_matching(corr, coarse_valid_a, coarse_valid_b)
    scores = _masked_mutual_matching(consensus(matched[..., None])[..., 0], coarse_valid_a, coarse_valid_b)
    inverse_temperature = nn.softplus(self.param('inverse_temperature',
                                                 lambda _: jnp.asarray(_softplus_inverse(10.0), jnp.float32)))
    mask_head = _MaskHead(self.mask_hidden, name='mask_head')

    if k > 1:
      fine_b = _fine_positions(offsets[2], offsets[3], k, (h_b, w_b))              # positions of B's matches
      fine_a = _fine_positions(swap_ab(offsets[0]), swap_ab(offsets[1]), k, (h_a, w_a))
    else:
      fine_b = jnp.broadcast_to(jnp.asarray(geometry.cell_centers(h_b, w_b)), scores.shape[3:] + (2,))
      fine_a = jnp.broadcast_to(jnp.asarray(geometry.cell_centers(h_a, w_a)), scores.shape[1:3] + (2,))
    out_a = _side_outputs(scores, coarse_valid_b, fine_b, inverse_temperature, mask_head)
    out_b = _side_outputs(swap_ab(scores), coarse_valid_a, fine_a, inverse_temperature, mask_head)
    if k > 1:  # back to the feature grid: each cell takes its box's outputs
      out_a = _unpool(out_a, k, (h_a, w_a))
      out_b = _unpool(out_b, k, (h_b, w_b))
    return out_a, out_b


class _MaskHead(nn.Module):
  """Co-segmentation mask of a cell from its best filtered score and its best softmax probability."""
  hidden: int

  @nn.compact
  def __call__(self, best_score, best_probability):
    x = jnp.stack([jnp.log(best_score + 1e-6), best_probability], axis=-1)
    x = nn.relu(nn.Dense(self.hidden, name='hidden')(x))
    return nn.Dense(1, name='out')(x)[..., 0]


def _pair_mask(valid_a, valid_b):
  """`(B, hA, wA)`, `(B, hB, wB)` -> `(B, hA, wA, hB, wB)`: 1 where both cells take part."""
  return valid_a[:, :, :, None, None] * valid_b[:, None, None]


def _masked_mutual_matching(corr, valid_a, valid_b):
  """`mutual_matching` whose maxima run over the cells that take part only (equal to it without padding);
  the entries of cells that do not take part are 0."""
  pair = _pair_mask(valid_a, valid_b) > 0
  max_a = jnp.max(jnp.where(pair, corr, NEG_INF), axis=(3, 4), keepdims=True)
  max_b = jnp.max(jnp.where(pair, corr, NEG_INF), axis=(1, 2), keepdims=True)
  out = corr * ((corr / (max_a + MUTUAL_EPS)) * (corr / (max_b + MUTUAL_EPS)))
  return jnp.where(pair, out, 0.0)


def _softplus_inverse(y: float) -> float:
  return float(np.log(np.expm1(y)))


def _side_outputs(scores, valid_other, positions_other, inverse_temperature, mask_head):
  """(x, y, mask) of the cells of the first image pair of axes of `scores` `(B, h, w, h', w')`.

  positions_other: `(..., h', w', 2)` (x, y) in [0, 1] of each cell of the other image (broadcastable to
  the scores with a trailing 2; with relocalisation they differ per (cell, other cell)).
  """
  batch, h, w, h2, w2 = scores.shape
  logits = inverse_temperature * scores
  logits = jnp.where(valid_other[:, None, None] > 0, logits, NEG_INF)
  probabilities = jax.nn.softmax(logits.reshape(batch, h, w, h2 * w2), axis=-1).reshape(scores.shape)
  xy = jnp.sum(probabilities[..., None] * positions_other, axis=(3, 4))
  best_score = jnp.max(jnp.where(valid_other[:, None, None] > 0, scores, 0.0), axis=(3, 4))
  mask = jax.nn.sigmoid(mask_head(best_score, jnp.max(probabilities, axis=(3, 4))))
  out = jnp.concatenate([xy, mask[..., None]], axis=-1)
  return jnp.clip(out, 1e-7, 1.0 - 1e-7)


def _pad_to_multiple(corr, k):
  """Zero-pads every 4-D axis of `corr` `(B, hA, wA, hB, wB)` up to a multiple of k."""
  pads = [(0, 0)] + [(0, -d % k) for d in corr.shape[1:]]
  return jnp.pad(corr, pads) if any(p for _, p in pads) else corr


def _pool_valid(valid, k):
  """`(B, h, w)` cell validity -> `(B, ceil(h/k), ceil(w/k))`: a box is valid when any of its cells is."""
  batch, h, w = valid.shape
  padded = jnp.pad(valid, ((0, 0), (0, -h % k), (0, -w % k)))
  return padded.reshape(batch, padded.shape[1] // k, k, padded.shape[2] // k, k).max(axis=(2, 4))


def _fine_positions(row_offset, col_offset, k, grid):
  """(x, y) in [0, 1] of the fine cell each coarse (box, other box) match lands on.

  row_offset, col_offset: int `(B, H, W, H', W')` offsets along the other image's axes inside its box;
  grid: (h, w) of the other image's feature grid. Returns `(B, H, W, H', W', 2)`.
  """
  h, w = grid
  rows = jnp.arange(row_offset.shape[3])[None, None, None, :, None] * k + row_offset
  cols = jnp.arange(col_offset.shape[4])[None, None, None, None, :] * k + col_offset
  rows = jnp.minimum(rows, h - 1)   # a padded row or column never wins a max over a real one (zeros)
  cols = jnp.minimum(cols, w - 1)
  return jnp.stack([(cols + 0.5) / w, (rows + 0.5) / h], axis=-1)


def _unpool(out, k, grid):
  """`(B, H, W, 3)` box outputs -> `(B, h, w, 3)`: each cell takes the outputs of its box."""
  h, w = grid
  return jnp.repeat(jnp.repeat(out, k, axis=1), k, axis=2)[:, :h, :w]
