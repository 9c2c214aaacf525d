"""SegSwap model: frozen ResNet conv4 backbone + a matcher over the two images' features, NHWC.

The matcher is the cross-image transformer of the paper's released model (docs/reference.md §1) or
NC-Net's 4-D neighbourhood consensus (`segswap_jax.ncnet`, docs/reference.md §9), chosen by the model
config's `arch`; both give the same outputs, so losses, scoring and discovery take either.

Why Flax linen (not nnx): training is `jax.pmap`-based with pure `(state, batch) -> state` steps, the
parameters must round-trip through Orbax and map one-to-one onto the reference state dict, and the
frozen backbone is a separate constant tree. Linen keeps parameters as plain nested dicts outside the
modules, which is exactly what those three need (as in big_vision / scenic); nnx's stateful objects
would have to be split back into such trees at every one of those boundaries.

Shapes: images `(B, H, W, 3)`, features `(B, h, w, 1024)` with h, w = H/16, W/16, matcher outputs
`(B, h, w, 3)` = (x, y, mask), x and y in [0, 1] of the *other* image. Images A and B may differ in size.
Parameters: `{'backbone': {'params', 'batch_stats'}, ARCH: {'params'}}` with ARCH = 'transformer' or
'ncnet' (`matcher_key`).
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from segswap_jax import errors
from segswap_jax import ncnet

FEATURE_STRIDE = 16
FEATURE_DIM = 1024
OUTPUT_EPS = 1e-7

# Reference transformer sizes: (d_model, num_heads, num_blocks, dim_feedforward).
TRANSFORMER_SIZES = {
    'tiny': (128, 2, 3, 256),
    'small': (256, 2, 3, 256),
    'base': (512, 8, 3, 2048),
    'large': (512, 8, 6, 2048),
}
DEFAULT_BLOCK_TYPES = 'I C I C I N'
# Channels of the stages of `SmallConvNet` (the demo's jointly trained backbone).
SMALL_CONVNET_WIDTHS = (32, 64, 128, 256)


def parse_block_types(block_types: str) -> Tuple[Tuple[str, str], ...]:
  """'I C I C I N' (spaces optional) -> (('I', 'C'), ('I', 'C'), ('I', 'N'))."""
  letters = [c for c in str(block_types).upper() if not c.isspace() and c != ',']
  if not letters or len(letters) % 2 or any(c not in 'ICN' for c in letters):
    raise errors.ConfigError(f'block_types must be pairs of I/C/N letters, got {block_types!r}')
  return tuple((letters[i], letters[i + 1]) for i in range(0, len(letters), 2))


ARCHS = ('transformer', 'ncnet')


def model_config(size: str = 'small', block_types: Optional[str] = None,
                 arch: str = 'transformer') -> ml_collections.ConfigDict:
  """The model's configuration; derived transformer sizes are filled in from `size` (the reference's
  four). `arch='ncnet'` uses the `ncnet_*` keys instead of the transformer's (which stay, unused)."""
  if arch not in ARCHS:
    raise errors.ConfigError(f'unknown arch {arch!r}; expected one of {ARCHS}')
  if size not in TRANSFORMER_SIZES:
    raise errors.ConfigError(f'unknown transformer size {size!r}; expected one of {sorted(TRANSFORMER_SIZES)}')
  d_model, num_heads, num_blocks, dim_feedforward = TRANSFORMER_SIZES[size]
  if block_types is None:
    # The reference repeats the default pattern over as many blocks as the size has.
    block_types = ' '.join((['I', 'C'] * num_blocks)[:-1] + ['N'])
  blocks = parse_block_types(block_types)
  return ml_collections.ConfigDict({
      'size': size,
      'block_types': ' '.join(c for pair in blocks for c in pair),
      'd_model': d_model,
      'num_heads': num_heads,
      'dim_feedforward': dim_feedforward,
      'num_blocks': len(blocks),
      'dropout': 0.1,
      'drop_feat': 0.1,
      'pos_weight': 0.1,
      'feat_weight': 1.0,
      'backbone': 'resnet50_conv4',
      'backbone_widths': SMALL_CONVNET_WIDTHS,
      'feature_dim': FEATURE_DIM,
      'arch': arch,
      # Compute policy: matrix products in compute_dtype (parameters, softmax, norms and losses stay
      # float32); attention through jax.nn.dot_product_attention ('xla' | 'cudnn') or written out
      # ('einsum'); attention_dropout=False drops the attention-weight dropout in training (the fused
      # kernels have none; the other dropouts stay). docs/performance.md.
      'compute_dtype': 'float32',
      'attention_impl': 'xla',
      'attention_dropout': True,
      # NC-Net (arch='ncnet'): NeighConsensus layers, relocalisation (0 or 2), Conv4d form ('4d' | '3d').
      'ncnet_kernel_sizes': (3, 3, 3),
      'ncnet_channels': (16, 16, 1),
      'ncnet_relocalization': 0,
      'ncnet_conv': '4d',
  })


def matcher_key(config: ml_collections.ConfigDict) -> str:
  """The key of the matcher's parameters in the model tree: 'transformer' or 'ncnet'."""
  arch = config.get('arch', 'transformer')
  if arch not in ARCHS:
    raise errors.ConfigError(f'unknown arch {arch!r}; expected one of {ARCHS}')
  return arch


# ----------------------------------------------------------------------------------------------------
# Backbone: torchvision ResNet-50 up to layer3, eval-mode BatchNorm, PyTorch's symmetric padding.
# ----------------------------------------------------------------------------------------------------

def _conv(features: int, kernel: int, stride: int, name: str, dtype=jnp.float32) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 use_bias=False, dtype=dtype, name=name)


def _batch_norm(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, dtype=jnp.float32, name=name)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5: the stride sits on the 3x3 convolution)."""
  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_conv, dtype=self.dtype)
    out = nn.relu(_batch_norm('bn1')(conv(self.planes, 1, 1, 'conv1')(x)))
    out = nn.relu(_batch_norm('bn2')(conv(self.planes, 3, self.stride, 'conv2')(out)))
    out = _batch_norm('bn3')(conv(self.planes * 4, 1, 1, 'conv3')(out))
    identity = x
    if self.downsample:
      identity = _batch_norm('downsample_bn')(conv(self.planes * 4, 1, self.stride, 'downsample_conv')(x))
    return nn.relu(out + identity)


# (name, planes, blocks, stride) of the stages kept from ResNet-50 and ResNet-101 (they differ in layer3).
RESNET50_CONV4_STAGES = (('layer1', 64, 3, 1), ('layer2', 128, 4, 2), ('layer3', 256, 6, 2))
RESNET101_CONV4_STAGES = (('layer1', 64, 3, 1), ('layer2', 128, 4, 2), ('layer3', 256, 23, 2))


class ResNetConv4(nn.Module):
  """A torchvision ResNet truncated after layer3: `(B, H, W, 3)` normalised -> `(B, H/16, W/16, 1024)` raw.

  ResNet-50 for SegSwap, ResNet-101 for the original NC-Net checkpoints.
  """
  stages: Tuple[Tuple[str, int, int, int], ...] = RESNET50_CONV4_STAGES
  dtype: jnp.dtype = jnp.float32  # of the convolutions; BatchNorm and the output are float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(_batch_norm('bn1')(_conv(64, 7, 2, 'conv1', self.dtype)(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    for stage, planes, blocks, stride in self.stages:
      for i in range(blocks):
        x = Bottleneck(planes, stride if i == 0 else 1, downsample=(i == 0), dtype=self.dtype,
                       name=f'{stage}_{i}')(x)
    return x.astype(jnp.float32)


class SmallConvNet(nn.Module):
  """A light stride-16 CNN for training from scratch (the demo): `(B, H, W, 3)` -> `(B, H/16, W/16, C)`.

  Four stages of (3x3 stride-2 conv, 3x3 conv), each followed by GroupNorm and ReLU; C = widths[-1].
  GroupNorm rather than BatchNorm: no batch statistics to carry, and the same function in training and
  evaluation. Not part of the reference: it exists because no pretrained ResNet-50 can reach the machines
  the demo runs on (docs/training.md).
  """
  widths: Tuple[int, ...] = SMALL_CONVNET_WIDTHS
  dtype: jnp.dtype = jnp.float32  # of the convolutions; GroupNorm and the output are float32

  @nn.compact
  def __call__(self, x):
    for stage, width in enumerate(self.widths):
      for i, stride in enumerate((2, 1)):
        x = _conv(width, 3, stride, f'stage{stage}_conv{i}', self.dtype)(x)
        x = nn.relu(nn.GroupNorm(num_groups=min(8, width), epsilon=1e-5, dtype=jnp.float32, name=f'stage{stage}_norm{i}')(x))
    return x


BACKBONES = ('resnet50_conv4', 'resnet101_conv4', 'small_convnet')


def build_backbone(config: ml_collections.ConfigDict) -> nn.Module:
  dtype = compute_dtype(config)
  if config.backbone == 'resnet50_conv4':
    return ResNetConv4(RESNET50_CONV4_STAGES, dtype)
  if config.backbone == 'resnet101_conv4':
    return ResNetConv4(RESNET101_CONV4_STAGES, dtype)
  if config.backbone == 'small_convnet':
    if config.feature_dim != config.backbone_widths[-1]:
      raise errors.ConfigError(f'small_convnet gives {config.backbone_widths[-1]} channels, feature_dim is '
                       f'{config.feature_dim}')
    return SmallConvNet(tuple(config.backbone_widths), dtype)
  raise errors.ConfigError(f'unknown backbone {config.backbone!r}; expected one of {BACKBONES}')


# ----------------------------------------------------------------------------------------------------
# Cross-image transformer.
# ----------------------------------------------------------------------------------------------------

def sine_position_encoding(h: int, w: int, d_model: int) -> np.ndarray:
  """DETR 2D sine encoding as the reference computes it: `(h, w, d_model)` = [pos_y, pos_x].

  Normalised coordinates (index 1..n over n + 1e-6, times 2 pi), d_model/2 features per axis,
  temperature 10000, sin on even and cos on odd features, interleaved. A trace-time constant.
  """
  num_feats = d_model // 2
  y_embed = np.arange(1, h + 1, dtype=np.float32) / (np.float32(h) + np.float32(1e-6)) * np.float32(2 * math.pi)
  x_embed = np.arange(1, w + 1, dtype=np.float32) / (np.float32(w) + np.float32(1e-6)) * np.float32(2 * math.pi)
  dim_t = np.arange(num_feats, dtype=np.float32)
  dim_t = np.float32(10000.0) ** (2 * (dim_t // 2) / np.float32(num_feats))

  def encode(embed):
    pos = embed[:, None] / dim_t  # (n, num_feats)
    return np.stack([np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])], axis=-1).reshape(len(embed), num_feats)

  pos_y = np.broadcast_to(encode(y_embed)[:, None, :], (h, w, num_feats))
  pos_x = np.broadcast_to(encode(x_embed)[None, :, :], (h, w, num_feats))
  return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)


COMPUTE_DTYPES = ('float32', 'bfloat16')
# 'xla' and 'cudnn' go through `jax.nn.dot_product_attention`; 'einsum' writes the score tensor out
# (the path attention-weight dropout needs, and the reference's arithmetic order).
ATTENTION_IMPLS = ('xla', 'cudnn', 'einsum')
# How the model computes, not what it computes: may differ between a run and its resume, or between a
# checkpoint and the tool that loads it.
COMPUTE_POLICY_KEYS = ('compute_dtype', 'attention_impl', 'attention_dropout')


def compute_dtype(config: ml_collections.ConfigDict):
  """The dtype of the model's matrix products under `config.compute_dtype` (parameters stay float32)."""
  name = config.get('compute_dtype', 'float32')
  if name not in COMPUTE_DTYPES:
    raise errors.ConfigError(f'compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}')
  return jnp.dtype(name)


class EncoderLayer(nn.Module):
  """PyTorch `nn.TransformerEncoderLayer` (post-norm, ReLU) applied to two token sets.

  `cross=False` (an I layer): each image's tokens attend to their own image; `cross=True` (a C layer):
  to the other image's. This equals the reference's single attention over [A; B] with a block mask,
  but never computes the masked half of the scores. An I layer can also run on one image alone
  (`one_image`), which is what lets retrieval compute it once per image.

  Precision: matrix products in `dtype`, softmax, LayerNorm and the residual stream in float32.
  """
  d_model: int
  num_heads: int
  dim_feedforward: int
  dropout: float
  cross: bool
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'xla'
  attention_dropout: bool = True

  def setup(self):
    self.in_proj = nn.Dense(3 * self.d_model, dtype=self.dtype)
    self.out_proj = nn.Dense(self.d_model, dtype=self.dtype)
    self.linear1 = nn.Dense(self.dim_feedforward, dtype=self.dtype)
    self.linear2 = nn.Dense(self.d_model, dtype=self.dtype)
    self.norm1 = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)
    self.norm2 = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)
    self.drop = nn.Dropout(self.dropout)
    self.weight_dropout = nn.Dropout(self.dropout)

  def _attend(self, query, key, value, key_pad, deterministic):
    """Multi-head scaled dot-product attention. query `(B, Nq, d)`, key/value `(B, Nk, d)`,
    key_pad bool `(B, Nk)` (True = ignored) or None."""
    b, nq, _ = query.shape
    nk = key.shape[1]
    head_dim = self.d_model // self.num_heads
    q = query.reshape(b, nq, self.num_heads, head_dim)
    k = key.reshape(b, nk, self.num_heads, head_dim)
    v = value.reshape(b, nk, self.num_heads, head_dim)
    weight_dropout = self.attention_dropout and self.dropout > 0 and not deterministic
    if weight_dropout or self.attention_impl == 'einsum':
      logits = jnp.einsum('bqhd,bkhd->bhqk', q / math.sqrt(head_dim), k).astype(jnp.float32)
      if key_pad is not None:
        # A fully padded image would give NaN in PyTorch; a large finite value keeps it finite here.
        logits = jnp.where(key_pad[:, None, None, :], jnp.finfo(logits.dtype).min, logits)
      weights = jax.nn.softmax(logits, axis=-1)
      weights = self.weight_dropout(weights, deterministic=deterministic).astype(v.dtype)
      return jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, nq, self.d_model)
    if self.attention_impl == 'cudnn':
      # cuDNN's fused kernel takes the key padding as an additive bias.
      bias = None if key_pad is None else jnp.where(key_pad, -1e9, 0.0).astype(q.dtype)[:, None, None, :]
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation='cudnn')
    else:
      mask = None if key_pad is None else ~key_pad[:, None, None, :]
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation='xla')
    return out.reshape(b, nq, self.d_model)

  def _finish(self, x, att, deterministic):
    x = self.norm1(x + self.drop(self.out_proj(att), deterministic=deterministic))
    ff = self.linear2(self.drop(nn.relu(self.linear1(x)), deterministic=deterministic))
    return self.norm2(x + self.drop(ff, deterministic=deterministic))

  def one_image(self, x, pad, deterministic: bool):
    """An I layer on one image's tokens `(B, N, d)` (pad bool `(B, N)` or None)."""
    assert not self.cross, 'a C layer needs both images'
    q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
    return self._finish(x, self._attend(q, k, v, pad, deterministic), deterministic)

  def __call__(self, x_a, x_b, pad_a, pad_b, deterministic: bool):
    q_a, k_a, v_a = jnp.split(self.in_proj(x_a), 3, axis=-1)
    q_b, k_b, v_b = jnp.split(self.in_proj(x_b), 3, axis=-1)
    if self.cross:
      att_a = self._attend(q_a, k_b, v_b, pad_b, deterministic)
      att_b = self._attend(q_b, k_a, v_a, pad_a, deterministic)
    else:
      att_a = self._attend(q_a, k_a, v_a, pad_a, deterministic)
      att_b = self._attend(q_b, k_b, v_b, pad_b, deterministic)
    return self._finish(x_a, att_a, deterministic), self._finish(x_b, att_b, deterministic)


class CrossTransformer(nn.Module):
  """The reference `TransEncoder`: feature projection, I/C/N blocks, (x, y, mask) head.

  Within one block a letter used twice refers to one layer (shared weights), as in the reference.

  Split in two for retrieval: `prepare` is what depends on one image alone (the feature projection and,
  when the first block starts with I, that I layer), `match` the rest; `__call__` = `match(prepare(a),
  prepare(b))`, so the split is exact. Prepared tokens are `(B, h, w, d_model)` float32.
  """
  d_model: int = 256
  num_heads: int = 2
  dim_feedforward: int = 256
  block_types: str = DEFAULT_BLOCK_TYPES
  dropout: float = 0.1
  drop_feat: float = 0.1
  pos_weight: float = 0.1
  feat_weight: float = 1.0
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = 'xla'
  attention_dropout: bool = True

  def setup(self):
    self.feat_proj = nn.Dense(self.d_model, dtype=self.dtype)
    # Dropout2d: whole channels of each sample.
    self.feature_dropout = nn.Dropout(self.drop_feat, broadcast_dims=(1, 2))
    for i, pair in enumerate(parse_block_types(self.block_types)):
      for letter in sorted(set(pair) - {'N'}):
        name = f'block{i}_{"inner" if letter == "I" else "cross"}'
        setattr(self, name, EncoderLayer(self.d_model, self.num_heads, self.dim_feedforward, self.dropout,
                                         cross=(letter == 'C'), dtype=self.dtype,
                                         attention_impl=self.attention_impl,
                                         attention_dropout=self.attention_dropout))
    self.final_linear = nn.Dense(3)  # float32 head (its input is LayerNorm's float32 output)

  def _layers(self):
    """The layer sequence: [(block index, letter)] without N; the first is hoisted when it is an I."""
    return [(i, letter) for i, pair in enumerate(parse_block_types(self.block_types))
            for letter in pair if letter != 'N']

  def _layer(self, index: int, letter: str) -> EncoderLayer:
    return getattr(self, f'block{index}_{"inner" if letter == "I" else "cross"}')

  @property
  def hoists_first_layer(self) -> bool:
    layers = self._layers()
    return bool(layers) and layers[0][1] == 'I'

  def _with_position(self, x, h, w):
    pos = sine_position_encoding(h, w, self.d_model).reshape(1, h * w, self.d_model)
    return self.feat_weight * x + self.pos_weight * pos

  def prepare(self, feat, pad=None, *, train: bool = False):
    """The pair-independent part: feat `(B, h, w, C)` L2-normalised (pad bool `(B, h, w)`) -> tokens
    `(B, h, w, d_model)` float32."""
    batch, h, w, _ = feat.shape
    x = self.feature_dropout(self.feat_proj(feat), deterministic=not train).astype(jnp.float32)
    x = x.reshape(batch, h * w, self.d_model)
    if self.hoists_first_layer:
      index, letter = self._layers()[0]
      flat_pad = None if pad is None else pad.reshape(batch, h * w)
      x = self._layer(index, letter).one_image(self._with_position(x, h, w), flat_pad, not train)
    return x.reshape(batch, h, w, self.d_model)

  def match(self, tokens_a, tokens_b, pad_a=None, pad_b=None, *, train: bool = False):
    """Prepared tokens `(B, h*, w*, d_model)` of both images -> (out_a, out_b) `(B, h*, w*, 3)`."""
    batch, h_a, w_a, _ = tokens_a.shape
    _, h_b, w_b, _ = tokens_b.shape
    x_a = tokens_a.reshape(batch, h_a * w_a, self.d_model)
    x_b = tokens_b.reshape(batch, h_b * w_b, self.d_model)
    pad_a = None if pad_a is None else pad_a.reshape(batch, h_a * w_a)
    pad_b = None if pad_b is None else pad_b.reshape(batch, h_b * w_b)
    layers = self._layers()
    for index, letter in layers[1:] if self.hoists_first_layer else layers:
      if letter == 'I':
        x_a, x_b = self._with_position(x_a, h_a, w_a), self._with_position(x_b, h_b, w_b)
      x_a, x_b = self._layer(index, letter)(x_a, x_b, pad_a, pad_b, not train)
    out_a = jnp.clip(jax.nn.sigmoid(self.final_linear(x_a)), OUTPUT_EPS, 1 - OUTPUT_EPS)
    out_b = jnp.clip(jax.nn.sigmoid(self.final_linear(x_b)), OUTPUT_EPS, 1 - OUTPUT_EPS)
    return out_a.reshape(batch, h_a, w_a, 3), out_b.reshape(batch, h_b, w_b, 3)

  def __call__(self, feat_a, feat_b, pad_a=None, pad_b=None, *, train: bool = False):
    """feat_* `(B, h*, w*, C)` L2-normalised; pad_* bool `(B, h*, w*)`, True = ignored key.

    Returns (out_a, out_b), `(B, h*, w*, 3)`: (x, y) in the other image and the mask, in (0, 1).
    """
    return self.match(self.prepare(feat_a, pad_a, train=train), self.prepare(feat_b, pad_b, train=train),
                      pad_a, pad_b, train=train)


def build_matcher(config: ml_collections.ConfigDict) -> nn.Module:
  """The pair model over backbone features: `apply(vars, feat_a, feat_b, pad_a, pad_b, train=...)` ->
  (out_a, out_b). A CrossTransformer or an `ncnet.NCNetMatcher`, as `config.arch` says."""
  if matcher_key(config) == 'ncnet':
    return ncnet.NCNetMatcher(kernel_sizes=tuple(config.ncnet_kernel_sizes), channels=tuple(config.ncnet_channels),
                              relocalization=int(config.ncnet_relocalization), impl=config.ncnet_conv)
  impl = config.get('attention_impl', 'xla')
  if impl not in ATTENTION_IMPLS:
    raise errors.ConfigError(f'attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}')
  if impl == 'cudnn' and jax.default_backend() != 'gpu':
    raise errors.ConfigError(f"attention_impl='cudnn' needs a CUDA GPU; this backend is "
                             f"{jax.default_backend()} (use 'xla')")
  return CrossTransformer(
      d_model=config.d_model, num_heads=config.num_heads, dim_feedforward=config.dim_feedforward,
      block_types=config.block_types, dropout=config.dropout, drop_feat=config.drop_feat,
      pos_weight=config.pos_weight, feat_weight=config.feat_weight, dtype=compute_dtype(config),
      attention_impl=impl, attention_dropout=bool(config.get('attention_dropout', True)))


def init_params(config: ml_collections.ConfigDict, rng: jax.Array,
                feature_shape: Sequence[int] = (4, 4)) -> dict:
  """Random parameters `{'backbone': {'params', 'batch_stats'}, matcher_key(config): {'params'}}`."""
  rng_backbone, rng_matcher = jax.random.split(rng)
  h, w = feature_shape
  images = jnp.zeros((1, h * FEATURE_STRIDE, w * FEATURE_STRIDE, 3), jnp.float32)
  features = jnp.zeros((1, h, w, config.feature_dim), jnp.float32)
  backbone_vars = build_backbone(config).init(rng_backbone, images)
  matcher_vars = build_matcher(config).init(rng_matcher, features, features)
  return {'backbone': dict(backbone_vars), matcher_key(config): dict(matcher_vars)}
