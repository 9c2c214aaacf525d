"""Discovery: graph building and clustering time vs collection size; methods on planted repeats.

  python -m benchmarks.run --only discovery [--quick]
  python -m benchmarks.bench_discovery --checkpoint DIR   # a trained model on the planted collection

1. Scaling: virtual collections (`eval.planted.virtual_pair_set`: groups of 20 images showing one object,
   every within-group pair kept, one false cross-group pair per image, 30 x 30 outputs with realistic
   confident-node counts) of 50, 200 and 1000 images; times of the reference steps (top-5 partners and
   nodes, the sparse 3-cycle affinity, the leading eigenvector, per-image maps) and of the `patterns`
   method's clustering (Fiedler splits + merges + per-pattern eigenvectors).
2. Methods: planted collections (bundled photographs with pasted repeats, two groups sharing two
   images) with oracle correspondences, exact and degraded; GrabCut pixel IoU of each planted group's
   best pattern, per method and sigma.
3. `--checkpoint`: the same planted collection through a trained model (pairs at 480 x 480), against
   the IoU of randomly placed boxes of the planted size (chance).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks import planted
from eval import discovery


def _timed(fn, *args, **kwargs):
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  return result, time.perf_counter() - start


def scaling(sizes=(50, 200, 1000), sigmas=(1.2,)) -> str:
  """Markdown table: time of each discovery step vs collection size."""
  lines = ['| images | sigma | kept pairs | used pairs | nodes | edges (nnz) | nodes s | affinity s | '
           'eigenvector s | maps s | reference total s | patterns clustering s | us / node (reference) | '
           'patterns found (groups) |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for size in sizes:
    pair_set = planted.virtual_pair_set(size)
    for sigma in sigmas:
      used, t_used = _timed(discovery.used_pairs, pair_set)
      nodes, t_nodes = _timed(discovery.extract_nodes, pair_set, used)
      matrix, t_affinity = _timed(discovery.affinity, nodes, pair_set, sigma)
      vector, t_eig = _timed(discovery.leading_eigenvector, matrix)
      _, t_maps = _timed(discovery.image_maps, nodes, vector, size)
      reference_total = t_used + t_nodes + t_affinity + t_eig + t_maps
      result, t_patterns = _timed(discovery.discover_patterns, pair_set, sigma, max_patterns=1000)
      clustering = t_patterns - (t_used + t_nodes + t_affinity)  # the graph is rebuilt inside
      lines.append(f'| {size} | {sigma:g} | {len(pair_set.pairs)} | {int(used.sum())} | {len(nodes)} | '
                   f'{matrix.nnz:,} | {t_used + t_nodes:.2f} | {t_affinity:.2f} | {t_eig:.2f} | {t_maps:.2f} | '
                   f'{reference_total:.2f} | {clustering:.2f} | {1e6 * reference_total / len(nodes):.1f} | '
                   f'{len(result.patterns)} ({-(-size // 20)}) |')
      del matrix, result
  return '\n'.join(lines)


NOISE_LEVELS = (('exact', {}),
                ('jitter 0.3, drop 0.2, false 0.5', dict(jitter=0.3, drop=0.2, false_matches=0.5, seed=1)),
                ('jitter 0.5, drop 0.4, false 1.0', dict(jitter=0.5, drop=0.4, false_matches=1.0, seed=2)))


def methods_on_planted(sigmas=(0.8, 1.2, 2.0, 5.0)) -> str:
  """Markdown table: GrabCut pixel IoU per planted group (best pattern), reference vs patterns."""
  collection = planted.make_planted_collection(groups=((0, 1, 2, 3, 4), (3, 4, 5, 6, 7)), seed=0)
  binarize = planted.grabcut_masks(collection)
  lines = ['| correspondences | sigma | reference: IoU group 1 / group 2 | patterns: IoU group 1 / group 2 | '
           'patterns found |', '|---|---|---|---|---|']
  for label, noise in NOISE_LEVELS:
    pair_set = planted.oracle_pair_set(collection, **noise)
    for sigma in sigmas:
      reference = planted.group_recovery(collection, discovery.discover(pair_set, 'reference', sigma).patterns,
                                         binarize)
      found = discovery.discover(pair_set, 'patterns', sigma)
      patterns = planted.group_recovery(collection, found.patterns, binarize)
      lines.append(f'| {label} | {sigma:g} | {reference[0]:.3f} / {reference[1]:.3f} | '
                   f'{patterns[0]:.3f} / {patterns[1]:.3f} | {len(found.patterns)} |')
  chance = planted.chance_iou(collection, groups=[0])
  lines.append(f'\nChance (a patch-sized box at a random place, per image of group 1): IoU {chance:.3f}.')
  return '\n'.join(lines)


def measure_model(checkpoint: str, image_size: int = 480, sigma: float = 2.0, flip: str = 'none',
                  node_threshold: float = discovery.CONF_THRESHOLD) -> str:
  """A trained model on the planted collection: group IoU per method vs chance (markdown)."""
  from eval import collection as collection_lib
  from segswap_jax import inference
  patch_cells = image_size // 16 // 3
  planted_set = planted.make_planted_collection(groups=((0, 1, 2, 3, 4), (3, 4, 5, 6, 7)),
                                                image_size=image_size, patch_cells=patch_cells, seed=0)
  model = inference.SegSwap.load(checkpoint)
  n = len(planted_set.images)
  pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
  pair_set, seconds = _timed(collection_lib.score_pairs, model, planted_set.images, pairs, flip=flip)
  binarize = planted.grabcut_masks(planted_set)
  lines = [f'checkpoint `{checkpoint}`: {n} images at {image_size} px, {len(pairs)} pairs in {seconds:.1f} s, '
           f'{len(pair_set.pairs)} kept; sigma {sigma:g}, flip {flip}, node threshold {node_threshold:g}', '',
           '| method | IoU group 1 | IoU group 2 | mean | chance | patterns |', '|---|---|---|---|---|---|']
  chance = np.mean([planted.chance_iou(planted_set, groups=[g]) for g in range(2)])
  for method in ('reference', 'patterns'):
    result = discovery.discover(pair_set, method, sigma, conf_threshold=node_threshold)
    iou = planted.group_recovery(planted_set, result.patterns, binarize) if result.patterns else [0.0, 0.0]
    lines.append(f'| {method} | {iou[0]:.3f} | {iou[1]:.3f} | {np.mean(iou):.3f} | {chance:.3f} | '
                 f'{len(result.patterns)} |')
  return '\n'.join(lines)


def main(quick: bool = False) -> str:
  sizes = (50, 200) if quick else (50, 200, 1000)
  blocks = ['### Time vs collection size (virtual collections, 30 x 30 outputs)', '',
            scaling(sizes, sigmas=(1.2, 2.0) if quick else (1.2,)), '',
            '### Methods on planted repeats (oracle correspondences, GrabCut pixel IoU)', '',
            methods_on_planted((1.2, 2.0) if quick else (0.8, 1.2, 2.0, 5.0))]
  checkpoint = os.environ.get('SEGSWAP_DEMO_CHECKPOINT')
  if checkpoint:
    blocks += ['', '### Trained model on the planted collection', '', measure_model(checkpoint)]
  return '\n'.join(blocks)


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   epilog='example: python -m benchmarks.bench_discovery --checkpoint ckpt/demo',
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', default=None, help='measure this model on the planted collection only')
  parser.add_argument('--image-size', type=int, default=480, help='square model input size for --checkpoint')
  parser.add_argument('--sigma', type=float, default=2.0, help='sigma for --checkpoint')
  parser.add_argument('--node-threshold', type=float, default=discovery.CONF_THRESHOLD,
                      help='mask above which a cell is a graph node, for --checkpoint')
  parser.add_argument('--quick', action='store_true', help='smaller sizes')
  args = parser.parse_args()
  if args.checkpoint:
    print(measure_model(args.checkpoint, args.image_size, args.sigma, node_threshold=args.node_threshold))
  else:
    print(main(args.quick))
  sys.exit(0)
