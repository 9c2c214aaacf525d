"""AdaIN style transfer in JAX (Huang & Belongie 2017), as the reference stylises its pairs (docs/reference.md §3).

Encoder: the "normalised" VGG-19 up to relu4_1 (a 1x1 input conv, then 3x3 convs with reflection
padding, ReLU, 2x2 max-pools with ceil mode). Decoder: its mirror (reflection-padded 3x3 convs, ReLU,
nearest x2 upsampling), no output activation. Stylise: t = AdaIN(f(content), f(style)) with
per-channel mean and std (unbiased variance + 1e-5, as pytorch-AdaIN), out = decoder(alpha * t +
(1 - alpha) * f(content)), clipped to [0, 1]. Images RGB in [0, 1], NHWC.

Weights: convert the widely used PyTorch files (`vgg_normalised.pth`, `decoder.pth` of pytorch-AdaIN, or
the reference's `Adain_decoder_iter160K.pth.tar`) once, torch needed only for that:

  python -m data_pipeline.adain --vgg vgg_normalised.pth --decoder decoder.pth --out adain.npz

then generate with `--config.style.kind=adain --config.style.adain_weights=adain.npz`. PyTorch layouts:
`nn.Sequential` state dicts; encoder convs at indices 0 (1x1), 2, 5, 9, 12, 16, 19, 22, 25, 29
(relu4_1 is module 30; later layers of the file are not used), decoder convs at 1, 5, 8, 11, 14, 18,
21, 25, 28 (upsampling at 3, 16, 23).
"""
from __future__ import annotations

import collections
import sys
from typing import Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from segswap_jax import cli
from segswap_jax.errors import DataError

# (PyTorch module index, in channels, out channels, kernel) of each conv, and where pools/upsamplings go.
ENCODER_CONVS = ((0, 3, 3, 1), (2, 3, 64, 3), (5, 64, 64, 3), (9, 64, 128, 3), (12, 128, 128, 3),
                 (16, 128, 256, 3), (19, 256, 256, 3), (22, 256, 256, 3), (25, 256, 256, 3),
                 (29, 256, 512, 3))
ENCODER_POOL_AFTER = (5, 12, 25)          # a max-pool follows these convs (modules 7, 14, 27)
# Convs of the full vgg_normalised file past relu4_1: present in the file, unused.
ENCODER_UNUSED = (32, 35, 38, 42, 45, 48, 51)
DECODER_CONVS = ((1, 512, 256), (5, 256, 256), (8, 256, 256), (11, 256, 256), (14, 256, 128),
                 (18, 128, 128), (21, 128, 64), (25, 64, 64), (28, 64, 3))
DECODER_UPSAMPLE_BEFORE = (5, 18, 25)     # a nearest x2 upsampling precedes these convs (3, 16, 23)

Params = Dict[str, List[Tuple[jax.Array, jax.Array]]]


def _conv(x, kernel, bias):
  """Conv (HWIO kernel) with PyTorch's reflection padding for 3x3 kernels."""
  if kernel.shape[0] == 3:
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + bias


def _max_pool_ceil(x):
  """2x2 / 2 max-pool with ceil mode (odd sizes keep their last row/column)."""
  pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
  x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=-jnp.inf)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')


def encode(params: Params, images: jax.Array) -> jax.Array:
  """RGB in [0, 1] `(N, H, W, 3)` -> relu4_1 features `(N, ceil(H/8), ceil(W/8), 512)`."""
  x = images
  for (index, _, _, kernel), (weight, bias) in zip(ENCODER_CONVS, params['encoder']):
    x = _conv(x, weight, bias)
    if kernel == 3:
      x = jax.nn.relu(x)
    if index in ENCODER_POOL_AFTER:
      x = _max_pool_ceil(x)
  return x


def decode(params: Params, features: jax.Array) -> jax.Array:
  """relu4_1-sized features `(N, h, w, 512)` -> image `(N, 8h, 8w, 3)` (unclipped)."""
  x = features
  last = len(DECODER_CONVS) - 1
  for i, ((index, _, _), (weight, bias)) in enumerate(zip(DECODER_CONVS, params['decoder'])):
    if index in DECODER_UPSAMPLE_BEFORE:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    x = _conv(x, weight, bias)
    if i != last:
      x = jax.nn.relu(x)
  return x


def mean_std(features: jax.Array, eps: float = 1e-5) -> Tuple[jax.Array, jax.Array]:
  """Per-sample, per-channel mean and std `(N, 1, 1, C)` (unbiased variance + eps, as pytorch-AdaIN)."""
  n = features.shape[1] * features.shape[2]
  mean = features.mean(axis=(1, 2), keepdims=True)
  var = ((features - mean) ** 2).sum(axis=(1, 2), keepdims=True) / (n - 1)
  return mean, jnp.sqrt(var + eps)


def stylize(params: Params, content: jax.Array, style_mean: jax.Array, style_std: jax.Array,
            alpha: jax.Array) -> jax.Array:
  """Content `(N, H, W, 3)` in [0, 1], style statistics `(N, 1, 1, 512)`, alpha `(N,)` -> `(N, H', W', 3)`.

  H', W' = 8 * ceil(H / 8), ...; clipped to [0, 1].
  """
  features = encode(params, content)
  mean, std = mean_std(features)
  target = (features - mean) / std * style_std + style_mean
  alpha = alpha[:, None, None, None]
  return jnp.clip(decode(params, alpha * target + (1.0 - alpha) * features), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# Conversion of the PyTorch files and the .npz we store.
# ----------------------------------------------------------------------------------------------------

def _unwrap(state, name: str) -> Dict[str, np.ndarray]:
  if isinstance(state, dict) and 'state_dict' in state:
    state = state['state_dict']
  if not isinstance(state, dict):
    raise DataError(f'{name}: expected a state dict, got {type(state).__name__}')
  return {k[len('module.'):] if k.startswith('module.') else k: np.asarray(v)  # torch tensors too
          for k, v in state.items()}


def _take_convs(state: Dict[str, np.ndarray], convs, unused: Sequence[int], name: str):
  expected = {f'{c[0]}.{p}' for c in convs for p in ('weight', 'bias')}
  allowed = expected | {f'{i}.{p}' for i in unused for p in ('weight', 'bias')}
  missing = sorted(expected - set(state))
  unknown = sorted(set(state) - allowed)
  if missing or unknown:
    raise DataError(f'{name}: not the expected layout (missing {missing[:4]}, unknown {unknown[:4]})')
  layers = []
  for conv in convs:
    index, c_in, c_out = conv[:3]
    kernel = conv[3] if len(conv) > 3 else 3
    weight, bias = state[f'{index}.weight'], state[f'{index}.bias']
    if weight.shape != (c_out, c_in, kernel, kernel) or bias.shape != (c_out,):
      raise DataError(f'{name}: layer {index} has shape {weight.shape}, expected '
                      f'{(c_out, c_in, kernel, kernel)}')
    layers.append((np.ascontiguousarray(weight.transpose(2, 3, 1, 0)).astype(np.float32),
                   bias.astype(np.float32)))
  return layers


def convert_state_dicts(vgg_state, decoder_state) -> Dict[str, List[Tuple[np.ndarray, np.ndarray]]]:
  """PyTorch state dicts (OIHW) -> our params (HWIO); DataError on any missing or unknown key."""
  return {'encoder': _take_convs(_unwrap(vgg_state, 'vgg'), ENCODER_CONVS, ENCODER_UNUSED, 'vgg'),
          'decoder': _take_convs(_unwrap(decoder_state, 'decoder'), DECODER_CONVS, (), 'decoder')}


def save_params(path: str, params) -> None:
  arrays = {f'{part}/{i}/{kind}': array for part in ('encoder', 'decoder')
            for i, layer in enumerate(params[part]) for kind, array in zip(('kernel', 'bias'), layer)}
  np.savez(path, **arrays)


def load_params(path: str) -> Params:
  """Converted weights (.npz from `convert`) as jax arrays; DataError if unreadable or incomplete."""
  try:
    with np.load(path) as data:
      arrays = dict(data)
  except (OSError, ValueError) as e:
    raise DataError(f'AdaIN weights {path}: unreadable ({e}); convert them with python -m '
                    'data_pipeline.adain') from e
  params = collections.defaultdict(list)
  for part, convs in (('encoder', ENCODER_CONVS), ('decoder', DECODER_CONVS)):
    for i in range(len(convs)):
      try:
        params[part].append((jnp.asarray(arrays[f'{part}/{i}/kernel']),
                             jnp.asarray(arrays[f'{part}/{i}/bias'])))
      except KeyError as e:
        raise DataError(f'AdaIN weights {path}: missing {e}') from e
  return dict(params)


def convert(vgg_path: str, decoder_path: str, out_path: str) -> None:
  """Reads the two .pth files with torch and writes our .npz."""
  try:
    import torch
  except ImportError as e:
    raise DataError('converting .pth files needs torch (pip install -r requirements-torch.txt)') from e
  states = []
  for path in (vgg_path, decoder_path):
    try:
      states.append(torch.load(path, map_location='cpu', weights_only=True))
    except (OSError, RuntimeError, ValueError) as e:
      raise DataError(f'{path}: cannot be read as a PyTorch state dict ({e})') from e
  save_params(out_path, convert_state_dicts(*states))


# ----------------------------------------------------------------------------------------------------
# The styliser used by generation.
# ----------------------------------------------------------------------------------------------------

class AdaINStylizer:
  """`style.Stylizer` with AdaIN: random style image, alpha ~ U[0, 1], content/style at `content_size`
  short side (the reference: 512), result resized back to the input size."""

  def __init__(self, weights_path: str, style_paths: Sequence[str], content_size: int = 512):
    if not weights_path:
      raise DataError('style kind "adain" needs --config.style.adain_weights=FILE.npz')
    self.params = load_params(weights_path)
    self.style_paths = list(style_paths)
    self.content_size = content_size
    self._style_stats: Dict[int, Tuple[jax.Array, jax.Array]] = {}
    self._stylize = jax.jit(stylize)
    self._stats = jax.jit(lambda p, x: mean_std(encode(p, x)))

  def _resize_short_side(self, image: np.ndarray) -> np.ndarray:
    import cv2
    height, width = image.shape[:2]
    scale = self.content_size / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)

  def style_statistics(self, index: int):
    if index not in self._style_stats:
      from data_pipeline import segments
      style = segments.read_image(self.style_paths[index], max_side=4 * self.content_size)
      style = self._resize_short_side(style).astype(np.float32)[None] / 255.0
      self._style_stats[index] = self._stats(self.params, jnp.asarray(style))
    return self._style_stats[index]

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import cv2
    mean, std = self.style_statistics(int(rng.integers(len(self.style_paths))))
    alpha = np.asarray([rng.uniform(0.0, 1.0)], np.float32)
    content = self._resize_short_side(image).astype(np.float32)[None] / 255.0
    out = np.asarray(self._stylize(self.params, jnp.asarray(content), mean, std, alpha))[0]
    out = cv2.resize(out, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


@cli.command
def main(argv=None) -> int:
  parser = cli.parser('python -m data_pipeline.adain', __doc__,
                      'python -m data_pipeline.adain --vgg vgg_normalised.pth --decoder decoder.pth --out adain.npz')
  parser.add_argument('--vgg', required=True, help='vgg_normalised.pth (PyTorch state dict)')
  parser.add_argument('--decoder', required=True, help='decoder.pth (PyTorch state dict)')
  cli.add_out(parser, 'output .npz for --config.style.adain_weights', required=True)
  args = parser.parse_args(argv)
  convert(args.vgg, args.decoder, args.out)
  print(args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
