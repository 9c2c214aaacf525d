r"""Brueghel one-shot detail retrieval and detection (docs/reference.md §6).

  python -m eval.brueghel --checkpoint checkpoints/segswap_official --data-dir data/Brueghel \
      --split test --out results/brueghel_test.json

Expected under --data-dir: Image/ (the database, indexed by sorted file name) and brueghelVal.json /
brueghelTest.json ({category: [{"query": [image, [x1, y1, x2, y2]], "gt": [[image, box], ...]}]}).
Every database image is resized to 640x640 and its backbone features cached; each query is resized so
that its box's longer side is 64 px (sides multiples of 16), cropped to 640 around the box, and scored
against every other database image over the box cells (dilated by one cell), with the box as the
initial query mask. Retrieval: AP per query over the full ranking, mean per category, then over
categories. Detection: one box per retrieved image from the predicted correspondences of the query
cells (docs/retrieval.md), scored as ArtMiner does (IoU > 0.3, first 1,000 predictions).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from tqdm import tqdm

from eval import feature_cache, resumable, retrieval
from segswap_jax import checkpoints
from segswap_jax import cli
from segswap_jax import compilation_cache
from segswap_jax import images
from segswap_jax import inference
from segswap_jax import multihost
from segswap_jax.errors import DataError
from segswap_jax.model import FEATURE_STRIDE as STRIDE

DB_SIZE = 640  # database images and query crops are 640 x 640 -> 40 x 40 cells
QUERY_BOX_SIZE = 64  # longer side of the query box after resizing
NUM_STATS = 11
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
SPLIT_FILES = {'val': 'brueghelVal.json', 'test': 'brueghelTest.json'}
REFERENCE_DB_COUNT = 1587


# -- annotations and database -------------------------------------------------------------------------

def load_annotations(path: str) -> Dict[str, List[Dict]]:
  """Reads a Brueghel json and checks its structure; categories come back sorted (reference order)."""
  if not os.path.isfile(path):
    raise DataError(f'annotations: file not found: {path}')
  try:
    with open(path) as f:
      label = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f'cannot read {path} as JSON ({e})') from None
  if not isinstance(label, dict) or not label:
    raise DataError(f'{path}: expected a non-empty {{category: [queries]}} object')

  def check_entry(entry, where):
    if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
        or not isinstance(entry[1], list) or len(entry[1]) != 4
        or not all(isinstance(v, (int, float)) for v in entry[1])):
      raise DataError(f'{path}: {where} must be [image_name, [x1, y1, x2, y2]], got {entry!r}')
    x1, y1, x2, y2 = entry[1]
    if x2 <= x1 or y2 <= y1:
      raise DataError(f'{path}: {where} has an empty box {entry[1]}')

  for category, queries in label.items():
    if not isinstance(queries, list):
      raise DataError(f'{path}: category {category!r} must hold a list of queries')
    for i, item in enumerate(queries):
      if not isinstance(item, dict) or 'query' not in item or 'gt' not in item:
        raise DataError(f'{path}: {category}[{i}] needs "query" and "gt"')
      check_entry(item['query'], f'{category}[{i}].query')
      for j, gt in enumerate(item['gt']):
        check_entry(gt, f'{category}[{i}].gt[{j}]')
  return {c: label[c] for c in sorted(label)}


def list_database(image_dir: str) -> List[str]:
  """Database image names, sorted (index = position, as the reference's `sorted(os.listdir)`).

  Only image files count (the reference counts every entry, so a stray file shifts its indices).
  """
  if not os.path.isdir(image_dir):
    raise DataError(f'database folder not found: {image_dir}')
  names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise DataError(f'no images in {image_dir}')
  return names


# -- query preprocessing (reference `preprocess_qry.py`, `get_qry_bb`; Python round = half to even) ----

def query_resize(size_wh: Tuple[int, int], box: Sequence[float], box_size: int = QUERY_BOX_SIZE,
                 min_side: int = DB_SIZE, stride: int = STRIDE):
  """New image size and box: the box's longer side -> `box_size`, box sides multiples of `stride`.

  The image is scaled anisotropically so the box gets those sides, then each image side is raised to
  at least `min_side`; the box is mapped with round.

  Returns:
    ((new_w, new_h), [x1, y1, x2, y2] ints in the resized image).
  """
  box_w, box_h = box[2] - box[0], box[3] - box[1]
  ratio = max(box_w / box_size, box_h / box_size)
  new_box_w = max(int(round(box_w / ratio / stride)), 1) * stride
  new_box_h = max(int(round(box_h / ratio / stride)), 1) * stride
  ratio_w, ratio_h = box_w / new_box_w, box_h / new_box_h
  width, height = size_wh
  new_w = max(int(round(width / ratio_w)), min_side)
  new_h = max(int(round(height / ratio_h)), min_side)
  ratio_w, ratio_h = width / new_w, height / new_h
  new_box = [int(round(box[0] / ratio_w)), int(round(box[1] / ratio_h)),
             int(round(box[2] / ratio_w)), int(round(box[3] / ratio_h))]
  return (new_w, new_h), new_box


def query_crop(size_wh: Tuple[int, int], box: Sequence[int], crop_size: int = DB_SIZE):
  """Crop window centred on the box, shifted back inside the image.

  The window is box + 2 * ((crop_size - side) // 2) per axis: 639 px when the box side is odd.

  Returns:
    ([left, top, right, bottom] of the crop in the image, box in crop coordinates).
  """
  width, height = size_wh
  margin_w = (crop_size - (box[2] - box[0])) // 2
  margin_h = (crop_size - (box[3] - box[1])) // 2
  window = [box[0] - margin_w, box[1] - margin_h, box[2] + margin_w, box[3] + margin_h]
  shift_w = width - window[2] if window[2] > width else (-window[0] if window[0] < 0 else 0)
  shift_h = height - window[3] if window[3] > height else (-window[1] if window[1] < 0 else 0)
  window = [window[0] + shift_w, window[1] + shift_h, window[2] + shift_w, window[3] + shift_h]
  return window, [box[0] - window[0], box[1] - window[1], box[2] - window[0], box[3] - window[1]]


def query_cell_mask(box: Sequence[float], num_cells: int = DB_SIZE // STRIDE, stride: int = STRIDE) -> np.ndarray:
  """`(num_cells, num_cells)` float32 mask of the box's cells dilated by one cell (half-open ranges)."""
  x1, y1, x2, y2 = (v / stride for v in box)
  cols = (max(int(round(x1 - 1)), 0), min(int(round(x2 + 1)), num_cells))
  rows = (max(int(round(y1 - 1)), 0), min(int(round(y2 + 1)), num_cells))
  mask = np.zeros((num_cells, num_cells), np.float32)
  mask[rows[0]:rows[1], cols[0]:cols[1]] = 1.0
  return mask


def prepare_query(path: str, box: Sequence[float], crop_size: int = DB_SIZE, box_size: int = QUERY_BOX_SIZE):
  """Query image -> (uint8 crop `(H, W, 3)` (H, W in {639, 640} at the defaults), box in crop pixels,
  cell mask `(40, 40)`). The reference resizes with PIL's default filter (bicubic).
  """
  image = images.open_rgb(path)
  new_size, new_box = query_resize(image.size, box, box_size, crop_size)
  window, crop_box = query_crop(new_size, new_box, crop_size)
  crop = image.resize(new_size, resample=images.BICUBIC).crop(tuple(window))
  return np.asarray(crop, np.uint8), crop_box, query_cell_mask(crop_box, -(-crop_size // STRIDE))


# -- metrics ------------------------------------------------------------------------------------------

def average_precision(ranked_is_gt: Sequence[bool], num_gt: int) -> float:
  """Sum over the ranks r of true positives of precision@r, divided by the number of ground truths."""
  hits = np.asarray(ranked_is_gt, bool)
  if num_gt == 0:
    return 0.0
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float(np.sum(precision[hits]) / num_gt)


def box_iou(box: Sequence[float], other: Sequence[float]) -> float:
  """Intersection over union with widths x2 - x1 (ArtMiner's `IoU`, no +1)."""
  inter_w = min(box[2], other[2]) - max(box[0], other[0])
  inter_h = min(box[3], other[3]) - max(box[1], other[1])
  inter = max(inter_w, 0.0) * max(inter_h, 0.0)
  union = (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1]) - inter
  return float(inter / union) if union > 0 else 0.0


def localization_ap(predictions: Sequence[Tuple[str, Sequence[float]]], gt: Sequence[Sequence],
                    iou_threshold: float = 0.3, max_predictions: int = 1000) -> float:
  """ArtMiner's detection AP of one query (`single_shot_detection/eval.py` `Localization`).

  Walk the ranked (image, box) predictions; a prediction is a true positive for every not yet matched
  ground-truth box of its image with IoU > threshold; AP = sum over true positives of
  (#true positives so far) / rank, divided by the number of ground-truth boxes.
  """
  free = [True] * len(gt)
  hits = []
  for rank, (name, box) in enumerate(predictions[:max_predictions]):
    for k, (gt_name, gt_box) in enumerate(gt):
      if free[k] and name == gt_name and box_iou(box, gt_box) > iou_threshold:
        hits.append((len(hits) + 1) / (rank + 1))
        free[k] = False
  return float(np.sum(hits) / len(gt)) if gt else 0.0


def detection_boxes(stats: np.ndarray, crop_box: Sequence[float], crop_wh: Tuple[int, int],
                    db_wh: np.ndarray, center: str = 'fit', scale_range=(0.05, 20.0)) -> np.ndarray:
  """One box per candidate, in its original pixels, from where the query's box cells land.

  Per axis, a weighted least-squares line target = scale * source + offset is fitted from the query
  cell centres to their predicted positions in the candidate (weights = the retrieval weight of each
  cell, `scoring.correspondence_stats`); the query box (in [0, 1] of the query crop) is mapped
  through it. `center='coarse'` instead centres the mapped box on the reference's coarse location (the
  unweighted mean of the predicted positions). A fit without weight or with a non-positive slope
  falls back to scale 1 around the coarse location. Scales are clipped to `scale_range`.

  Args:
    stats: `(n, 11)` correspondence statistics. crop_box: query box in crop pixels. crop_wh: crop size.
    db_wh: `(n, 2)` original (width, height) of each candidate (its 640x640 resize is anisotropic).

  Returns:
    `(n, 4)` float boxes [x1, y1, x2, y2], clipped to the image.
  """
  coarse, total, mean_src, mean_tgt = stats[:, 0:2], stats[:, 2], stats[:, 3:5], stats[:, 5:7]
  cov, var = stats[:, 7:9], stats[:, 9:11]
  crop_wh = np.asarray(crop_wh, np.float64)
  box = np.asarray(crop_box, np.float64)
  src_center = (box[:2] + box[2:]) / 2 / crop_wh
  src_half = (box[2:] - box[:2]) / 2 / crop_wh
  with np.errstate(divide='ignore', invalid='ignore'):
    scale = cov / var
  valid = (total[:, None] > 1e-6) & (var > 1e-12) & (scale > 0)
  scale = np.where(valid, np.clip(scale, *scale_range), 1.0)
  fitted_center = mean_tgt + scale * (src_center - mean_src)
  use_coarse = (center == 'coarse') | ~valid.all(axis=1, keepdims=True)
  centre = np.where(use_coarse, coarse, fitted_center)
  half = scale * src_half
  norm_box = np.clip(np.concatenate([centre - half, centre + half], axis=1), 0.0, 1.0)
  return norm_box * np.tile(np.asarray(db_wh, np.float64), 2)


# -- evaluation ---------------------------------------------------------------------------------------

def evaluate(data_dir: str, split: str, params: Dict, config, batch_size: int = 32, cache_dir: str = 'feature_cache',
             cache_dtype: str = 'float16', work_dir: str = 'brueghel.partial', det_iou: float = 0.3,
             det_max_predictions: int = 1000, det_center: str = 'fit', num_queries: Optional[int] = None,
             db_size: int = DB_SIZE, box_size: int = QUERY_BOX_SIZE,
             digests: Optional[Dict[str, str]] = None, cache_format: str = 'backbone') -> Optional[Dict]:
  """Runs the benchmark; returns the results dict on process 0 (None on the others).

  `db_size` (database side and query crop, 640) and `box_size` (query box longer side, 64) are the
  reference's; other values are for quick checks only.
  """
  label = load_annotations(os.path.join(data_dir, SPLIT_FILES[split]))
  image_dir = os.path.join(data_dir, 'Image')
  db_names = list_database(image_dir)
  if len(db_names) != REFERENCE_DB_COUNT:
    print(f'note: {image_dir} holds {len(db_names)} images (the reference database has {REFERENCE_DB_COUNT})',
          file=sys.stderr)
  index_of = {n: i for i, n in enumerate(db_names)}
  queries = [(c, i) for c in label for i in range(len(label[c]))]
  for category, i in queries:
    for name in [label[category][i]['query'][0]] + [g[0] for g in label[category][i]['gt']]:
      if name not in index_of:
        raise DataError(f'{SPLIT_FILES[split]}: image {name!r} of category {category} is not in {image_dir}')
  queries = queries[:num_queries] if num_queries else queries

  model = inference.SegSwap(params, config, digests=digests)
  batch_size = inference.balanced_batch_size(len(db_names) - 1, batch_size, model.num_devices)
  cache = feature_cache.model_feature_cache(cache_dir, model.digests['backbone'], (db_size, db_size), 'imagenet',
                                            cache_dtype, config.feature_dim,
                                            compute_dtype=model.config.get('compute_dtype', 'float32'))
  load_db = lambda name: images.load_image(os.path.join(image_dir, name), (db_size, db_size))
  start = time.time()
  computed = cache.fill(db_names, load_db, lambda batch: model.features(batch, batch_size=len(batch)),
                        batch_size, jax.process_index(), jax.process_count(), multihost.barrier)
  store = feature_cache.CandidateStore(model, cache, db_names, cache_format, cache_dir, batch_size,
                                       feature_cache.device_budget_bytes(), jax.process_index(),
                                       jax.process_count(), multihost.barrier)
  cache_s = time.time() - start
  db_rows = cache.rows(db_names)

  local = multihost.query_shard(len(queries))
  n_db = len(db_names)
  key = {'split': split, 'db': db_names, 'num_queries': len(queries), 'cache': cache.meta, 'box_size': box_size,
         'model': model.fingerprint, 'cache_format': cache_format}
  progress = resumable.QueryProgress(work_dir, jax.process_index(),
                                     {'scores': ((n_db,), 'float32'), 'stats': ((n_db, NUM_STATS), 'float32'),
                                      'crop': ((6,), 'float32')}, len(local), key)
  start = time.time()
  for i in tqdm(range(len(local)), desc='queries', disable=jax.process_index() != 0,
                initial=int(progress.done.sum())):
    if progress.done[i]:
      continue
    category, j = queries[local[i]]
    name, box = label[category][j]['query']
    crop, crop_box, cells = prepare_query(os.path.join(image_dir, name), box, db_size, box_size)
    feat_q = model.features(crop[None])[0]
    own = index_of[name]
    others = np.delete(db_rows, own)
    result = model.score_candidates(feat_q, n_db - 1, lambda positions: store.read(others[positions]),
                                    init_mask=cells, batch_size=batch_size)
    progress.set(i, scores=np.insert(result['score'], own, -np.inf),
                 stats=np.insert(result['stats'], own, 0.0, axis=0),
                 crop=np.array([*crop_box, crop.shape[1], crop.shape[0]], np.float32))
  progress.flush()
  score_s = time.time() - start
  scores = multihost.gather_rows(progress.arrays['scores'], len(queries))
  stats = multihost.gather_rows(progress.arrays['stats'], len(queries))
  crops = multihost.gather_rows(progress.arrays['crop'], len(queries))
  if jax.process_index() != 0:
    return None

  db_wh = np.array([images.image_size(os.path.join(image_dir, n))[::-1] for n in db_names], np.float64)
  per_query, coarse_out = [], {c: [] for c in label}
  for q, (category, j) in enumerate(queries):
    item = label[category][j]
    own = index_of[item['query'][0]]
    gt_index = {index_of[g[0]] for g in item['gt']}  # the reference counts distinct gt images
    order = [k for k in np.argsort(-scores[q], kind='stable') if k != own]
    ap = average_precision([k in gt_index for k in order], len(gt_index))
    boxes = detection_boxes(stats[q], crops[q, :4], crops[q, 4:6], db_wh, det_center)
    predictions = [(db_names[k], boxes[k].tolist()) for k in order]
    det_ap = localization_ap(predictions, item['gt'], det_iou, det_max_predictions)
    per_query.append({'category': category, 'query': item['query'], 'ap': ap, 'detection_ap': det_ap,
                      'top': [[db_names[k], round(float(scores[q, k]), 6), [round(v, 1) for v in boxes[k]]]
                              for k in order[:20]]})
    coarse_out[category].append([[float(stats[q, k, 0]), float(stats[q, k, 1]), float(scores[q, k]),
                                  k in gt_index, int(k)] for k in order])

  def category_means(key):
    by_category = {c: float(np.mean([r[key] for r in per_query if r['category'] == c]))
                   for c in label if any(r['category'] == c for r in per_query)}
    return by_category, float(np.mean(list(by_category.values())))

  ap_per_category, retrieval_map = category_means('ap')
  det_per_category, detection_map = category_means('detection_ap')
  table = '\n'.join(['| category | queries | retrieval AP | detection AP |', '|---|---:|---:|---:|'] +
                    [f'| {c} | {sum(r["category"] == c for r in per_query)} | {100 * ap_per_category[c]:.1f} | '
                     f'{100 * det_per_category[c]:.1f} |' for c in ap_per_category] +
                    [f'| mean of categories | {len(per_query)} | {100 * retrieval_map:.1f} | '
                     f'{100 * detection_map:.1f} |'])
  return {
      'split': split,
      'retrieval_map': retrieval_map,
      'retrieval_ap_per_category': ap_per_category,
      'detection_map': detection_map,
      'detection_ap_per_category': det_per_category,
      'detection_map_over_queries': float(np.mean([r['detection_ap'] for r in per_query])),
      'settings': {'batch_size': batch_size, 'cache_dtype': cache_dtype, 'cache_format': cache_format,
                   'compute_dtype': model.config.get('compute_dtype', 'float32'), 'det_iou': det_iou,
                   'det_max_predictions': det_max_predictions, 'det_center': det_center,
                   'num_db': n_db, 'num_queries': len(queries), 'db_size': db_size, 'box_size': box_size},
      'table': table,
      'timing': {'cache_fill_s': cache_s, 'db_images_computed': computed, 'scoring_s': score_s,
                 'candidates_scored': len(queries) * (n_db - 1),
                 'cache_bytes_per_image': store.bytes_per_image, 'candidates_on_device': store.on_device,
                 'processes': jax.process_count(), 'devices_per_process': model.num_devices},
      'queries': per_query,
      'coarse': coarse_out,
  }


@cli.command
def main(argv=None) -> int:
  parser = cli.parser('python -m eval.brueghel', __doc__,
                      'python -m eval.brueghel --checkpoint CKPT --data-dir data/Brueghel --split test '
                      '--out results/brueghel_test.json')
  cli.add_checkpoint(parser)
  cli.add_data_dir(parser, 'folder with Image/ and the Brueghel jsons')
  parser.add_argument('--split', choices=sorted(SPLIT_FILES), default='test')
  cli.add_batch_size(parser, 32, 'candidates per forward call (all local devices)')
  cli.add_out(parser, 'results JSON', default='brueghel_results.json')
  parser.add_argument('--out-coarse', default=None,
                      help='also write the reference --out-coarse JSON: {category: [per query: '
                           '[[cx, cy, score, is_gt, db_idx], ...] by score]}')
  parser.add_argument('--det-iou', type=cli.open_unit_float, default=0.3, help='IoU above which a detection is correct')
  parser.add_argument('--det-max-predictions', type=cli.positive_int, default=1000, help="ArtMiner's nbPred")
  parser.add_argument('--det-center', choices=('fit', 'coarse'), default='fit',
                      help='detection box centre: least-squares fit, or the reference coarse location')
  parser.add_argument('--cache-dir', default=None, help='feature cache root (default: OUT_dir/feature_cache)')
  parser.add_argument('--cache-dtype', choices=('float16', 'float32'), default='float16')
  parser.add_argument('--num-queries', type=cli.positive_int, default=None,
                      help='only the first N queries (quick check)')
  parser.add_argument('--db-size', type=cli.size16, default=DB_SIZE,
                      help='database side and query crop in px (the reference: 640; change for quick checks only)')
  parser.add_argument('--query-box-size', type=cli.positive_int, default=QUERY_BOX_SIZE,
                      help="query box's longer side after resizing (the reference: 64)")
  cli.add_compute(parser)
  cli.add_multihost(parser)
  args = parser.parse_args(argv)
  multihost.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  compilation_cache.enable()
  params, config, digests = checkpoints.load_verified(args.checkpoint)
  config = cli.compute_config(config, args.compute_dtype)
  results = evaluate(
      args.data_dir, args.split, params, config, args.batch_size,
      cache_dir=args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), 'feature_cache'),
      cache_dtype=args.cache_dtype, work_dir=args.out + '.partial', det_iou=args.det_iou,
      det_max_predictions=args.det_max_predictions, det_center=args.det_center, num_queries=args.num_queries,
      db_size=args.db_size, box_size=args.query_box_size, digests=digests, cache_format=args.cache_format)
  if results is not None:
    coarse = results.pop('coarse')
    results = dict({'checkpoint': os.path.abspath(args.checkpoint)}, **results)
    retrieval.write_json(args.out, results)
    if args.out_coarse:
      retrieval.write_json(args.out_coarse, coarse)
    shutil.rmtree(args.out + '.partial', ignore_errors=True)
    print(results['table'])
    print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
