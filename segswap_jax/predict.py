"""Runs SegSwap on a query image against target images and writes the outputs (and a picture).

  python -m segswap_jax.predict --checkpoint checkpoints/segswap_official \\
      --query q.jpg --targets t1.jpg t2.jpg --out result.npz --vis result.png

`result.npz` holds `features_query` (h, w, C, L2-normalised), `features_targets` (n, h, w, C),
`out_query` (n, h, w, 3: x, y, mask on the query side for each target), `out_targets` (n, h, w, 3) and
`scores` (n,): the retrieval score of docs/reference.md §4. Images are resized to --image-size (height
width, PIL bilinear as the reference does).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from segswap_jax import cli
from segswap_jax import images as images_lib
from segswap_jax import inference
from segswap_jax import visualize

NPZ_KEYS = ('features_query', 'features_targets', 'out_query', 'out_targets', 'scores')
EXAMPLE = ('python -m segswap_jax.predict --checkpoint CKPT --query q.jpg --targets t1.jpg t2.jpg '
           '--out result.npz --vis result.png')


def predict(checkpoint: str, query: str, targets, image_size=(480, 640), batch_size: int = 8,
            model: inference.SegSwap | None = None) -> dict:
  """Loads the images, runs the model and returns the arrays of `result.npz` plus the images."""
  images_lib.check_image_size(*image_size)
  model = model or inference.SegSwap.load(checkpoint)
  query_image = images_lib.load_image(query, image_size)
  target_images = np.stack([images_lib.load_image(t, image_size) for t in targets])
  result = model.score(query_image, target_images, batch_size=batch_size)
  result['query_image'] = query_image
  result['target_images'] = target_images
  return result


def draw(result: dict, names) -> np.ndarray:
  rows = []
  for i, name in enumerate(names):
    rows.append(visualize.draw_pair(visualize.enlarge(result['query_image'], 256),
                                    visualize.enlarge(result['target_images'][i], 256), result['out_query'][i],
                                    result['out_targets'][i],
                                    title=f'query vs {os.path.basename(name)}: score {result["scores"][i]:.3f}'))
  return visualize.stack_rows(rows)


@cli.command
def main(argv=None) -> int:
  parser = cli.parser('python -m segswap_jax.predict', __doc__, EXAMPLE)
  cli.add_checkpoint(parser)
  parser.add_argument('--query', required=True, help='query image')
  parser.add_argument('--targets', required=True, nargs='+', help='target image(s)')
  cli.add_image_size(parser, (480, 640), 'model input size (480 640 is the retrieval size)')
  cli.add_batch_size(parser, 8, 'targets per forward call')
  cli.add_out(parser, 'output .npz', required=True)
  parser.add_argument('--vis', default=None, type=cli.output_file,
                      help='optional PNG: pairs with masks and correspondences')
  args = parser.parse_args(argv)
  result = predict(args.checkpoint, args.query, args.targets, tuple(args.image_size), args.batch_size)
  out = args.out if args.out.endswith('.npz') else args.out + '.npz'  # what np.savez writes
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, **{k: result[k] for k in NPZ_KEYS})
  print(f'wrote {out}')
  for name, score in zip(args.targets, result['scores']):
    print(f'  {score:10.4f}  {name}')
  if args.vis:
    visualize.save_png(args.vis, draw(result, args.targets))
    print(f'wrote {args.vis}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
