"""Internet dataset (Object Discovery, Rubinstein et al. 2013) co-segmentation: precision P and Jaccard J.

  python -m eval.internet --checkpoint checkpoints/segswap_official --data-dir data/Internet \
      --classes Airplane100 Car100 Horse100 --method reference --sigma reference 2.0 --out internet.json

Layout (docs/reference.md §7): `<data_dir>/<Class>100/` holds the images and `GroundTruth/` one PNG mask
per image (name with .jpg -> .png, read as bool). Per class every pair of images runs at 480 x 480 with
the flip rule (`eval.collection`), results cached under `--cache-dir` (a rerun resumes); discovery
(`eval.discovery`) gives per-image maps, GrabCut turns them into masks at the original resolution, and
P (fraction of correctly labelled pixels, every image) and J (foreground IoU, images whose ground truth
is not empty) are averaged per class and then over classes. Paper: P 0.928, J 0.70 (average of 3).

`--sigma` takes any mix of `reference` (the released per-class values, tuned on these very classes:
Airplane 0.8, Car 5.0, Horse 1.2) and numbers (one sigma for every class); each is one row of the table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import PIL.Image
from tqdm import tqdm

from eval import collection
from eval import discovery
from segswap_jax import cli
from segswap_jax import errors
from segswap_jax import images as images_lib
from segswap_jax import inference
from segswap_jax.errors import DataError

CLASSES = ('Airplane100', 'Car100', 'Horse100')
REFERENCE_SIGMA = {'Airplane': 0.8, 'Car': 5.0, 'Horse': 1.2}
# One sigma for every class (cells): chosen on planted synthetic collections (benchmarks/bench_discovery),
# never on the Internet classes.
DEFAULT_SIGMA = 2.0
PAPER = {'P': 0.928, 'J': 0.70}
IMAGE_SIZE = 480
GT_DIR = 'GroundTruth'


# ----------------------------------------------------------------------------------------------------
# Dataset.
# ----------------------------------------------------------------------------------------------------

def list_images(class_dir: str) -> List[str]:
  """Image names of a class, as the reference lists them: sorted, names containing .jpg or .png."""
  if not os.path.isdir(class_dir):
    raise DataError(f'{class_dir}: no such class directory')
  names = [n for n in sorted(os.listdir(class_dir))
           if ('.jpg' in n or '.png' in n) and os.path.isfile(os.path.join(class_dir, n))]
  if not names:
    raise DataError(f'{class_dir}: no .jpg/.png images')
  if len(names) < 3:
    raise DataError(f'{class_dir}: {len(names)} image(s); discovery needs at least 3')
  return names


def ground_truth_path(class_dir: str, name: str) -> str:
  return os.path.join(class_dir, GT_DIR, name.replace('.jpg', '.png'))


def load_ground_truth(class_dir: str, name: str) -> np.ndarray:
  """bool `(H, W)` mask: the PNG read with PIL, non-zero = foreground (colour PNGs: any channel)."""
  path = ground_truth_path(class_dir, name)
  if not os.path.isfile(path):
    raise DataError(f'{path}: ground-truth mask missing for {name}')
  try:
    with PIL.Image.open(path) as opened:
      mask = np.asarray(opened)
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f'{path}: unreadable ground-truth mask ({type(e).__name__})') from e
  return mask.astype(bool) if mask.ndim == 2 else mask.astype(bool).any(axis=-1)


def load_original_bgr(class_dir: str, name: str) -> np.ndarray:
  """The image at its original resolution, BGR (what GrabCut runs on in the reference)."""
  return np.ascontiguousarray(images_lib.read_rgb(os.path.join(class_dir, name))[..., ::-1])


def precision_jaccard(pred: np.ndarray, truth: np.ndarray):
  """(P, J) of one image: P = fraction of pixels labelled correctly; J = |pred & gt| / |pred | gt|,
  None when the ground truth is empty (such images count for P only)."""
  if pred.shape != truth.shape:
    raise DataError(f'prediction {pred.shape} and ground truth {truth.shape} differ in size')
  precision = float(np.mean(pred == truth))
  if not truth.any():
    return precision, None
  return precision, float(np.logical_and(pred, truth).sum() / np.logical_or(pred, truth).sum())


# ----------------------------------------------------------------------------------------------------
# Pairs and evaluation.
# ----------------------------------------------------------------------------------------------------

def class_pairs(model, class_dir: str, cache_dir: Optional[str], flip: str = 'reference',
                denormalize: bool = False, batch_size: int = 32, image_size: int = IMAGE_SIZE,
                checkpoint: str = '') -> discovery.PairSet:
  """Runs every pair of a class (itertools.combinations order) and returns the kept pairs."""
  names = list_images(class_dir)
  images = np.stack([images_lib.load_image(os.path.join(class_dir, n), (image_size, image_size))
                     for n in tqdm(names, desc=f'load {os.path.basename(class_dir)}', leave=False)])
  pairs = np.array(list(itertools.combinations(range(len(names)), 2)), np.int64)
  return collection.score_pairs(model, images, pairs, cache_dir=cache_dir, flip=flip, denormalize=denormalize,
                                batch_size=batch_size, cache_key=dict(images=names),
                                desc=f'pairs {os.path.basename(class_dir)}')


def class_sigma(class_name: str, sigma) -> float:
  """`sigma` as a number, or the reference's per-class value for 'reference'."""
  if sigma != 'reference':
    return float(sigma)
  for prefix, value in REFERENCE_SIGMA.items():
    if os.path.basename(class_name.rstrip('/')).startswith(prefix):
      return value
  raise DataError(f'{class_name}: no reference sigma for this class (known: {sorted(REFERENCE_SIGMA)}); '
                  'give a number with --sigma')


def evaluate_class(pair_set: discovery.PairSet, class_dir: str, method: str = 'reference',
                   sigma: float = DEFAULT_SIGMA, grabcut: bool = True, two_cycle: bool = False,
                   grabcut_rng: str = 'per-call') -> dict:
  """Discovery on one class's pairs, masks, and P / J against the ground truth.

  `grabcut_rng='released'` draws GrabCut's k-means from one OpenCV RNG stream through the class, started
  where a fresh process starts it (the released code runs one class per process); 'per-call' reseeds
  it for every image. The result's `undetermined_nodes` is the fraction of graph nodes whose eigenvector
  value is float noise (the reference method's masks there depend on the solver, not on the data).
  """
  names = list_images(class_dir)
  if pair_set.num_images != len(names):
    raise DataError(f'{class_dir}: {len(names)} images but pair results for {pair_set.num_images}')
  result = discovery.discover(pair_set, method, sigma, two_cycle=two_cycle)
  if result.undetermined > 0.5:
    print(f'note: {os.path.basename(class_dir)}, {method} method, sigma {sigma:g}: the graph falls apart into '
          f'components and {100 * result.undetermined:.0f}% of the eigenvector is float noise; those masks are '
          'not determined by the method (the patterns method is not affected)', file=sys.stderr, flush=True)
  if grabcut_rng == 'released':
    discovery.reset_grabcut_rng()
  precisions, jaccards, per_image = [], [], []
  for index, name in enumerate(tqdm(names, desc=f'masks {os.path.basename(class_dir)}', leave=False)):
    truth = load_ground_truth(class_dir, name)
    image = load_original_bgr(class_dir, name)
    if image.shape[:2] != truth.shape:
      raise DataError(f'{ground_truth_path(class_dir, name)}: mask {truth.shape} but image {image.shape[:2]}')
    pred = discovery.soft_to_binary(result.maps[index], image, grabcut=grabcut, grabcut_rng=grabcut_rng)
    precision, jaccard = precision_jaccard(pred, truth)
    precisions.append(precision)
    if jaccard is not None:
      jaccards.append(jaccard)
    per_image.append({'image': name, 'P': precision, 'J': jaccard})
  return {'P': float(np.mean(precisions)), 'J': float(np.mean(jaccards)) if jaccards else None,
          'sigma': sigma, 'num_images': len(names), 'num_empty_gt': len(names) - len(jaccards),
          'num_kept_pairs': int(len(pair_set.pairs)), 'num_nodes': int(len(result.nodes)),
          'num_edges': int(result.matrix.nnz), 'undetermined_nodes': result.undetermined, 'per_image': per_image}


def format_table(rows: Sequence[dict], classes: Sequence[str]) -> str:
  """The paper's table: one row per (method, sigma), P and J per class and averaged."""
  names = [os.path.basename(c.rstrip('/')) for c in classes]
  header = f'{"method":<10} {"sigma":<10}' + ''.join(f' {n:>15}' for n in names) + f' {"average":>15}'
  sub = ' ' * 21 + ''.join(f' {"P":>7} {"J":>7}' for _ in range(len(names) + 1))
  lines = [header, sub]

  def cell(value):
    return f'{value:7.3f}' if value is not None else f'{"-":>7}'

  for row in rows:
    label = 'per-class' if row['sigma'] == 'reference' else f'{float(row["sigma"]):g}'
    text = f'{row["method"]:<10} {label:<10}'
    for name in names:
      res = row['classes'][name]
      text += f' {cell(res["P"])} {cell(res["J"])}'
    text += f' {cell(row["average"]["P"])} {cell(row["average"]["J"])}'
    lines.append(text)
  lines.append(f'{"paper":<21}' + ' ' * 16 * len(names) + f' {PAPER["P"]:7.3f} {PAPER["J"]:7.2f}')
  return '\n'.join(lines)


def check_classes(data_dir: str, classes: Sequence[str], methods: Sequence[str], sigmas: Sequence) -> dict:
  """Validates the request before any model work; returns class name -> class directory."""
  if not os.path.isdir(data_dir):
    raise DataError(f'{data_dir}: no such data directory')
  for method in methods:
    if method not in discovery.METHODS:
      raise errors.ConfigError(f'unknown method {method!r}; expected one of {sorted(discovery.METHODS)}')
  class_dirs = {os.path.basename(c.rstrip('/')): os.path.join(data_dir, c) for c in classes}
  for name, path in class_dirs.items():
    for image_name in list_images(path):
      if not os.path.isfile(ground_truth_path(path, image_name)):
        raise DataError(f'{ground_truth_path(path, image_name)}: ground-truth mask missing for {image_name}')
    for sigma in sigmas:
      class_sigma(name, sigma)
  return class_dirs


def evaluate(model, data_dir: str, classes: Sequence[str] = CLASSES, methods: Sequence[str] = ('reference',),
             sigmas: Sequence = ('reference', DEFAULT_SIGMA), flip: str = 'reference', denormalize: bool = False,
             cache_dir: Optional[str] = None, batch_size: int = 32, grabcut: bool = True,
             two_cycle: bool = False, checkpoint: str = '', pair_sets: Optional[Dict[str, object]] = None,
             image_size: int = IMAGE_SIZE, grabcut_rng: str = 'per-call') -> dict:
  """Pairs per class (cached), then every (method, sigma) row; returns the JSON-ready results.

  `pair_sets` (class name -> PairSet) skips the model entirely (used by tests and re-analyses).
  """
  class_dirs = check_classes(data_dir, classes, methods, sigmas)
  timings = {}
  pair_sets = dict(pair_sets or {})
  for name, path in class_dirs.items():
    if name not in pair_sets:
      start = time.perf_counter()
      pair_sets[name] = class_pairs(model, path, os.path.join(cache_dir, name) if cache_dir else None, flip,
                                    denormalize, batch_size, image_size, checkpoint=checkpoint)
      timings[name] = time.perf_counter() - start
  rows = []
  for method in methods:
    for sigma in sigmas:
      per_class = {}
      for name, path in class_dirs.items():
        per_class[name] = evaluate_class(pair_sets[name], path, method, class_sigma(name, sigma), grabcut,
                                         two_cycle, grabcut_rng)
      js = [r['J'] for r in per_class.values() if r['J'] is not None]
      rows.append({'method': method, 'sigma': sigma, 'classes': per_class,
                   'average': {'P': float(np.mean([r['P'] for r in per_class.values()])),
                               'J': float(np.mean(js)) if js else None}})
  return {'settings': {'checkpoint': checkpoint, 'data_dir': data_dir, 'classes': list(class_dirs),
                       'flip': flip, 'denormalize': denormalize, 'image_size': image_size, 'grabcut': grabcut,
                       'two_cycle': two_cycle, 'grabcut_rng': grabcut_rng},
          'pair_seconds': timings, 'rows': rows, 'paper': PAPER,
          'table': format_table(rows, list(class_dirs))}


def _sigma_value(text: str):
  if text == 'reference':
    return text
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'sigma must be "reference" or a positive number, got {text!r}')
  if value <= 0:
    raise argparse.ArgumentTypeError(f'sigma must be positive, got {text}')
  return value


@cli.command
def main(argv=None) -> int:
  parser = cli.parser('python -m eval.internet', __doc__,
                      'python -m eval.internet --checkpoint checkpoints/segswap_official '
                      '--data-dir data/Internet --sigma reference 2.0 --out internet.json')
  cli.add_checkpoint(parser)
  cli.add_data_dir(parser, 'folder holding Airplane100/, Car100/, Horse100/')
  parser.add_argument('--classes', nargs='+', default=list(CLASSES), help='class folders (default: all 3)')
  parser.add_argument('--method', nargs='+', default=['reference'], choices=sorted(discovery.METHODS),
                      help='discovery method(s) (default reference)')
  parser.add_argument('--sigma', nargs='+', type=_sigma_value, default=['reference', DEFAULT_SIGMA],
                      help='"reference" (per-class 0.8/5/1.2) and/or numbers in cells, one row each '
                           f'(default: reference {DEFAULT_SIGMA})')
  parser.add_argument('--flip', default='reference', choices=list(collection.FLIP_MODES),
                      help='mirrored second image: released handling (default), corrected, or off')
  parser.add_argument('--denormalize', action='store_true',
                      help='feed x*std+mean like the released loader (default: standard normalisation)')
  parser.add_argument('--two-cycle', action='store_true', help='add 2-cycle edges (off in the official runs)')
  parser.add_argument('--no-grabcut', action='store_true', help='threshold the maps without GrabCut')
  parser.add_argument('--grabcut-rng', choices=discovery.GRABCUT_RNG, default='per-call',
                      help="GrabCut's random stream: reseeded per image (default), or one stream through a "
                           'class as the released code draws it (released)')
  cli.add_batch_size(parser, 32, 'pairs per forward call')
  cli.add_image_size(parser, (IMAGE_SIZE, IMAGE_SIZE), "square model input size (the paper's)", square=True)
  parser.add_argument('--cache-dir', default=None,
                      help='pair-output cache (default: <out>.pairs/ next to --out); reruns resume')
  cli.add_out(parser, 'results JSON', default='internet_results.json')
  args = parser.parse_args(argv)
  height, width = args.image_size
  if height != width:
    raise errors.ConfigError(f'--image-size {height} {width}: the Internet evaluation runs square images')
  cache_dir = args.cache_dir or os.path.splitext(os.path.abspath(args.out))[0] + '.pairs'
  check_classes(args.data_dir, args.classes, args.method, args.sigma)
  model = inference.SegSwap.load(args.checkpoint)
  results = evaluate(model, args.data_dir, args.classes, args.method, args.sigma, args.flip,
                     args.denormalize, cache_dir, args.batch_size, not args.no_grabcut, args.two_cycle,
                     checkpoint=os.path.abspath(args.checkpoint), image_size=height, grabcut_rng=args.grabcut_rng)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=1)
  print(results['table'])
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
