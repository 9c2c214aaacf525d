"""Contact sheet of stored pairs: masks overlaid and a sample of ground-truth correspondence lines.

  python -m data_pipeline.visualize --data-dir /tmp/segswap_data --n 16 --out pairs.png

Each pair is a 2 x 2 block: top A | B with their cell masks tinted (red in A, green in B; opacity =
mask value) and lines from a few object cells of A to where `corr_a` sends them in B; bottom the
stylised A | B. The label gives the pair index and its number of objects.
"""
from __future__ import annotations

import math
import sys

import cv2
import numpy as np

from data_pipeline import builder
from segswap_jax import cli
from segswap_jax.errors import DataError

_RED, _GREEN = np.array([255, 40, 40], np.float32), np.array([40, 255, 80], np.float32)


def tint(image: np.ndarray, mask: np.ndarray, colour: np.ndarray, strength: float = 0.5) -> np.ndarray:
  """Blends `colour` into an RGB uint8 image where the cell mask `(h, w)` is high."""
  size = image.shape[:2][::-1]
  alpha = cv2.resize(np.clip(mask, 0, 1).astype(np.float32), size,
                     interpolation=cv2.INTER_NEAREST)[..., None] * strength
  return np.round(image * (1 - alpha) + colour * alpha).astype(np.uint8)


def pair_block(example, tile: int, num_lines: int, rng: np.random.Generator, label: str) -> np.ndarray:
  """RGB uint8 `(2 * tile, 2 * tile, 3)` block of one stored example (raw JPEG fields)."""
  images = {k: cv2.resize(builder.decode_jpeg(example[k]), (tile, tile), interpolation=cv2.INTER_AREA)
            for k in builder.IMAGE_FEATURES}
  mask_a, mask_b, corr_a = example['mask_a'], example['mask_b'], example['corr_a']
  top = np.concatenate([tint(images['image_a'], mask_a, _RED),
                        tint(images['image_b'], mask_b, _GREEN)], axis=1)
  rows, cols = np.nonzero(mask_a > 0.5)
  chosen = rng.permutation(len(rows))[:num_lines]
  h, w = mask_a.shape
  for row, col in zip(rows[chosen], cols[chosen]):
    start = (int((col + 0.5) / w * tile), int((row + 0.5) / h * tile))
    x, y = corr_a[row, col]
    end = (int(tile + x * tile), int(y * tile))
    colour = tuple(int(c) for c in rng.integers(80, 256, 3))
    cv2.line(top, start, end, colour, 1, cv2.LINE_AA)
    cv2.circle(top, start, 2, colour, -1, cv2.LINE_AA)
    cv2.circle(top, end, 2, colour, -1, cv2.LINE_AA)
  bottom = np.concatenate([images['image_a_styled'], images['image_b_styled']], axis=1)
  block = np.concatenate([top, bottom], axis=0)
  cv2.putText(block, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
  cv2.putText(block, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
  return block


def contact_sheet(data_dir: str, n: int = 16, split: str = 'train', tile: int = 160,
                  num_lines: int = 8, columns: int = 4, seed: int = 0) -> np.ndarray:
  """RGB uint8 sheet of the first `n` pairs of `split`."""
  source = builder.data_source(builder.resolve_dataset_dir(data_dir), split)
  n = min(n, len(source))
  if n < 1:
    raise DataError(f'{data_dir} [{split}] holds no pairs')
  rng = np.random.default_rng(seed)
  blocks = []
  for index in range(n):
    example = source[index]
    blocks.append(pair_block(example, tile, num_lines, rng,
                             f'#{index} {example["num_objects"]} obj'))
  columns = min(columns, n)
  rows = math.ceil(n / columns)
  gap = 6
  sheet = np.full((rows * (2 * tile + gap) - gap, columns * (2 * tile + gap) - gap, 3), 255, np.uint8)
  for index, block in enumerate(blocks):
    top, left = (index // columns) * (2 * tile + gap), (index % columns) * (2 * tile + gap)
    sheet[top:top + 2 * tile, left:left + 2 * tile] = block
  return sheet


@cli.command
def main(argv=None) -> int:
  parser = cli.parser('python -m data_pipeline.visualize', __doc__,
                      'python -m data_pipeline.visualize --data-dir /tmp/segswap_data --n 16 --out pairs.png')
  cli.add_data_dir(parser, 'the data dir given to generate, or a dataset dir')
  parser.add_argument('--n', type=cli.positive_int, default=16, help='number of pairs')
  cli.add_out(parser, 'output PNG', default='pairs.png')
  parser.add_argument('--split', default='train', help='train or validation')
  parser.add_argument('--tile', type=cli.positive_int, default=160, help='side of each image in the sheet (px)')
  parser.add_argument('--lines', type=cli.nonnegative_int, default=8, help='correspondence lines per pair')
  args = parser.parse_args(argv)
  sheet = contact_sheet(args.data_dir, args.n, args.split, args.tile, args.lines)
  if not cv2.imwrite(args.out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
    raise DataError(f'{args.out}: cannot write the picture')
  print(args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
