"""Runs SegSwap on a query image against target images and writes the outputs (and a picture).

  python -m segswap_jax.predict --checkpoint checkpoints/segswap_official \
      --query q.jpg --targets t1.jpg t2.jpg --out result.npz --vis result.png

`result.npz` holds `features_query` (h, w, 1024, L2-normalised), `features_targets` (n, h, w, 1024),
`out_query` (n, h, w, 3: x, y, mask on the query side for each target), `out_targets` (n, h, w, 3) and
`scores` (n,): the retrieval score of SPEC §4. Images are resized to --image-size (height width).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from segswap_jax import checkpoints, inference, visualize

NPZ_KEYS = ('features_query', 'features_targets', 'out_query', 'out_targets', 'scores')


def predict(checkpoint: str, query: str, targets, image_size=(480, 640), batch_size: int = 8,
            model: inference.SegSwap | None = None) -> dict:
  """Loads the images, runs the model and returns the arrays of `result.npz` plus the images."""
  inference.check_image_size(*image_size)
  model = model or inference.SegSwap.load(checkpoint)
  query_image = inference.load_image(query, image_size)
  target_images = np.stack([inference.load_image(t, image_size) for t in targets])
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      epilog='example: python -m segswap_jax.predict --checkpoint CKPT --query q.jpg --targets t1.jpg t2.jpg '
             '--out result.npz --vis result.png',
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='segswap-jax checkpoint directory')
  parser.add_argument('--query', required=True, help='query image')
  parser.add_argument('--targets', required=True, nargs='+', help='target image(s)')
  parser.add_argument('--image-size', nargs=2, type=int, default=(480, 640), metavar=('H', 'W'),
                      help='model input size, multiples of 16 (default 480 640, the retrieval size)')
  parser.add_argument('--batch-size', type=int, default=8, help='targets per forward batch')
  parser.add_argument('--out', required=True, help='output .npz')
  parser.add_argument('--vis', default=None, help='optional PNG: pairs with masks and correspondences')
  args = parser.parse_args(argv)
  try:
    result = predict(args.checkpoint, args.query, args.targets, tuple(args.image_size), args.batch_size)
  except (inference.ImageError, checkpoints.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(args.out, **{k: result[k] for k in NPZ_KEYS})
  print(f'wrote {args.out}')
  for name, score in zip(args.targets, result['scores']):
    print(f'  {score:10.4f}  {name}')
  if args.vis:
    visualize.save_png(args.vis, draw(result, args.targets))
    print(f'wrote {args.vis}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
