"""Finds what repeats across a folder of images and writes an HTML report.

  python -m segswap_jax.discover --checkpoint checkpoints/segswap_official --images my_photos/ \
      --out report/ --max-pairs-per-image 10

Steps: every image is resized to --image-size (one number: a square, aspect not kept, as in the paper's
discovery runs; or HEIGHT WIDTH); backbone features are computed once per image; candidate pairs are
pre-filtered by a global descriptor (mean-pooled L2-normalised conv4 features, cosine similarity): each
image is paired with its --max-pairs-per-image nearest images, so the transformer runs O(N K) pairs
instead of N^2 / 2 (0 = every pair); pairs run in jitted batches (cached in REPORT_DIR/cache, a rerun
resumes); the correspondence graph (eval.discovery) gives the patterns. The report:
  index.html                 each pattern, largest first, with its instances outlined in every image
  pattern_XX.png             the same panels as pictures
  clusters.json              patterns -> images with instance boxes and outlines (original pixels)
"""
from __future__ import annotations

import html
import json
import os
import sys
import time
from typing import List, Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from eval import collection
from eval import discovery
from segswap_jax import cli
from segswap_jax import compilation_cache
from segswap_jax import errors
from segswap_jax import images as images_lib
from segswap_jax import inference
from segswap_jax import visualize

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
THUMB_HEIGHT = 200
GRID_COLUMNS = 5
MIN_IMAGES = 3


def list_images(folder: str) -> List[str]:
  """Image files of a folder (by extension, hidden files skipped), sorted by name."""
  if not os.path.isdir(folder):
    raise errors.DataError(f'{folder}: no such folder')
  names = sorted(n for n in os.listdir(folder)
                 if not n.startswith('.') and n.lower().endswith(IMAGE_EXTENSIONS)
                 and os.path.isfile(os.path.join(folder, n)))
  if not names:
    raise errors.DataError(f'{folder}: no images ({", ".join(IMAGE_EXTENSIONS)})')
  return names


def load_collection(folder: str, image_size, skip_unreadable: bool = False):
  """Reads the folder's images at `image_size` = (height, width). Returns (names, uint8 (N, H, W, 3))."""
  names, images = [], []
  for name in tqdm(list_images(folder), desc='load', unit='image', leave=False):
    try:
      images.append(images_lib.load_image(os.path.join(folder, name), tuple(image_size)))
      names.append(name)
    except errors.ImageError as e:
      if not skip_unreadable:
        raise errors.ImageError(e.path, f'{e.reason} (use --skip-unreadable to leave it out)') from e
      print(f'warning: skipped {e}', file=sys.stderr)
  if len(names) < MIN_IMAGES:
    raise errors.DataError(f'{folder}: {len(names)} usable image(s); discovery needs at least {MIN_IMAGES} '
                        '(for two images use `python -m segswap_jax.predict`)')
  return names, np.stack(images)


# ----------------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------------

def pattern_color(index: int):
  """A distinct, saturated RGB colour per pattern."""
  hue = int(index * 47) % 180
  bgr = cv2.cvtColor(np.array([[[hue, 230, 215]]], np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
  return tuple(int(c) for c in bgr[::-1])


def outline_instance(image: np.ndarray, mask: np.ndarray, color) -> np.ndarray:
  """RGB image with the instance lightly tinted and its outline drawn."""
  out = image.copy()
  tint = np.asarray(color, np.float32)
  out[mask] = (out[mask] * 0.65 + tint * 0.35).astype(np.uint8)
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  thickness = max(2, image.shape[0] // 100)
  cv2.drawContours(out, contours, -1, (255, 255, 255), thickness + 2, cv2.LINE_AA)
  cv2.drawContours(out, contours, -1, color, thickness, cv2.LINE_AA)
  return out


def keep_seeded_parts(mask: np.ndarray, cell_map: np.ndarray) -> np.ndarray:
  """Drops the specks GrabCut may add away from the pattern: keeps the parts of `mask` that touch its sure
  foreground (map > 0.6 x max; report only, the P / J protocol keeps GrabCut's output as is)."""
  soft = discovery.upsample(cell_map, *mask.shape)
  seed = soft > discovery.FG_THRESHOLD * soft.max()
  count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
  touching = np.unique(labels[seed & mask])
  return np.isin(labels, touching[touching > 0])


def grid(panels: Sequence[np.ndarray], columns: int = GRID_COLUMNS) -> np.ndarray:
  rows = []
  for start in range(0, len(panels), columns):
    row = panels[start]
    for panel in panels[start + 1:start + columns]:
      row = visualize.side_by_side(row, panel)
    rows.append(row)
  return visualize.stack_rows(rows)


def instance_record(mask: np.ndarray, scale_x: float, scale_y: float) -> dict:
  """Box and outline (largest contour) of a display-size mask, in original pixels."""
  ys, xs = np.nonzero(mask)
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  outline = []
  if contours:
    largest = max(contours, key=cv2.contourArea)
    approx = cv2.approxPolyDP(largest, 1.5, True)[:, 0]
    outline = [[round(float(x) * scale_x, 1), round(float(y) * scale_y, 1)] for x, y in approx]
  return {'box': [round(float(xs.min()) * scale_x, 1), round(float(ys.min()) * scale_y, 1),
                  round(float(xs.max() + 1) * scale_x, 1), round(float(ys.max() + 1) * scale_y, 1)],
          'area_fraction': round(float(mask.mean()), 4), 'outline': outline}


def write_report(out_dir: str, folder: str, names: Sequence[str], result: discovery.Discovery,
                 summary: dict, grabcut: bool = True, timing: Optional[dict] = None) -> dict:
  """Writes index.html, pattern_XX.png and clusters.json; returns the clusters dict (with `timing`, the
  machine figures of the run, when given)."""
  os.makedirs(out_dir, exist_ok=True)
  clusters = []
  sections = []
  thumbs = {}

  def thumbnail(index):
    if index not in thumbs:
      original = images_lib.load_image(os.path.join(folder, names[index]))
      height, width = original.shape[:2]
      size = (THUMB_HEIGHT, max(1, round(width * THUMB_HEIGHT / height)))
      thumbs[index] = (images_lib.resize_image(original, size), width, height)
    return thumbs[index]

  for number, pattern in enumerate(tqdm(result.patterns, desc='report', unit='pattern', leave=False), 1):
    color = pattern_color(number - 1)
    panels, instances = [], []
    for index in pattern.images:
      image, width, height = thumbnail(int(index))
      mask = discovery.soft_to_binary(pattern.maps[index], cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                      grabcut=grabcut)
      mask = keep_seeded_parts(mask, pattern.maps[index])
      if not mask.any():
        continue
      panels.append(visualize.put_title(outline_instance(image, mask, color), names[index][:40]))
      record = instance_record(mask, width / image.shape[1], height / image.shape[0])
      instances.append(dict(image=names[index], **record))
    if not instances:
      continue
    picture = f'pattern_{len(clusters) + 1:02d}.png'
    visualize.save_png(os.path.join(out_dir, picture), grid(panels))
    clusters.append({'pattern': len(clusters) + 1, 'num_images': len(instances),
                     'num_correspondences': int(len(pattern.nodes)), 'strength': round(pattern.energy, 4),
                     'picture': picture, 'instances': instances})
    listed = ', '.join(html.escape(i['image']) for i in instances)
    sections.append(f'<section><h2 style="color:rgb{color}">Pattern {len(clusters)}</h2>'
                    f'<p>{len(instances)} images, {len(pattern.nodes)} correspondences, strength '
                    f'{pattern.energy:.3f}</p><img src="{picture}" alt="pattern {len(clusters)}">'
                    f'<p class="names">{listed}</p></section>')
  in_patterns = {i['image'] for c in clusters for i in c['instances']}
  alone = [n for n in names if n not in in_patterns]
  data = {'folder': os.path.abspath(folder), 'summary': summary, 'patterns': clusters,
          'images_in_no_pattern': alone}
  if timing is not None:
    data['timing'] = timing
  with open(os.path.join(out_dir, 'clusters.json'), 'w') as f:
    json.dump(data, f, indent=1)
  facts = ''.join(f'<li>{html.escape(str(k))}: {html.escape(str(v))}</li>' for k, v in summary.items())
  body = ''.join(sections) or '<p><b>No repeated pattern was found.</b></p>'
  page = f'''<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>SegSwap discovery: {html.escape(os.path.basename(os.path.abspath(folder)))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} img{{max-width:100%;border:1px solid #ccc}}
section{{margin-bottom:2.5em}} .names{{color:#555;font-size:90%}} ul{{color:#333}}</style></head>
<body><h1>Repeated patterns in {html.escape(os.path.abspath(folder))}</h1>
<p>{len(clusters)} pattern(s), largest first. Each picture shows every image where the pattern was found,
with the instance outlined. Machine-readable: <a href="clusters.json">clusters.json</a>.</p>
{body}
<h2>Images in no pattern ({len(alone)})</h2><p class="names">{html.escape(', '.join(alone)) or 'none'}</p>
<h2>Run</h2><ul>{facts}</ul></body></html>
'''
  with open(os.path.join(out_dir, 'index.html'), 'w') as f:
    f.write(page)
  return data


# ----------------------------------------------------------------------------------------------------
# Pipeline.
# ----------------------------------------------------------------------------------------------------

def discover_folder(images_dir: str, out_dir: str, checkpoint: Optional[str] = None,
                    model: Optional[inference.SegSwap] = None, image_size=(480, 480),
                    max_pairs_per_image: int = 10, method: str = 'patterns', sigma: float = 2.0,
                    flip: str = 'none', max_patterns: int = 10, batch_size: int = 16, grabcut: bool = True,
                    skip_unreadable: bool = False, node_threshold: float = discovery.CONF_THRESHOLD,
                    compute_dtype: Optional[str] = None, cache_format: str = 'projected') -> dict:
  """The whole `discover` run; returns the clusters dict written to clusters.json."""
  if method not in discovery.METHODS:
    raise errors.ConfigError(f'unknown method {method!r}; expected one of {sorted(discovery.METHODS)}')
  image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  images_lib.check_image_size(*image_size, what='--image-size')
  if max_pairs_per_image < 0:
    raise errors.ConfigError(f'--max-pairs-per-image must be >= 0, got {max_pairs_per_image}')
  if not 0.0 < node_threshold < 1.0:
    raise errors.ConfigError(f'--node-threshold must be in (0, 1), got {node_threshold}')
  names, images = load_collection(images_dir, image_size, skip_unreadable)
  timings = {}
  start = time.perf_counter()
  model = model or inference.SegSwap.load(checkpoint, compute_dtype=compute_dtype)
  features = collection.collection_features(model, images)
  pairs = collection.candidate_pairs(collection.global_descriptors(features), max_pairs_per_image or None)
  timings['features + pre-filter (s)'] = round(time.perf_counter() - start, 2)
  start = time.perf_counter()
  pair_set = collection.score_pairs(
      model, images, pairs, cache_dir=os.path.join(out_dir, 'cache'), flip=flip, batch_size=batch_size,
      features=features, cache_key=dict(images=names), cache_format=cache_format)
  scoring_s = time.perf_counter() - start
  timings['pairs (s)'] = round(scoring_s, 2)
  start = time.perf_counter()
  kwargs = {'max_patterns': max_patterns} if method == 'patterns' else {}
  result = discovery.discover(pair_set, method, sigma, conf_threshold=node_threshold, **kwargs)
  timings['graph (s)'] = round(time.perf_counter() - start, 2)
  summary = {'images': len(names), 'image size': f'{image_size[0]}x{image_size[1]}', 'pairs run': int(len(pairs)),
             'pairs kept': int(len(pair_set.pairs)), 'nodes': int(len(result.nodes)),
             'edges': int(result.matrix.nnz), 'method': method, 'sigma': sigma,
             'node threshold': node_threshold, 'flip': flip,
             'max_pairs_per_image': max_pairs_per_image, 'checkpoint': checkpoint or 'in memory', **timings}
  h, w = features.shape[1:3]
  per_image = h * w * (features.shape[3] * features.dtype.itemsize
                       + (4 * model.config.d_model if model.hoists and cache_format == 'projected' else 0))
  timing = {'scoring_s': scoring_s, 'candidates_scored': int(len(pairs)), 'cache_bytes_per_image': int(per_image),
            'cache_format': cache_format, 'compute_dtype': model.config.get('compute_dtype', 'float32')}
  return write_report(out_dir, images_dir, names, result, summary, grabcut, timing)


@cli.command
def main(argv=None) -> int:
  parser = cli.parser('python -m segswap_jax.discover', __doc__,
                      'python -m segswap_jax.discover --checkpoint CKPT --images my_photos/ --out report/')
  cli.add_checkpoint(parser)
  parser.add_argument('--images', required=True, help='folder of images')
  cli.add_out(parser, 'report directory (index.html, PNGs, clusters.json)', required=True, kind='dir')
  parser.add_argument('--max-pairs-per-image', type=cli.nonnegative_int, default=10,
                      help='pair each image with its K nearest images by global descriptor (default 10; '
                           '0 = every pair)')
  cli.add_image_size(parser, (480, 480), 'model input size', square=True)
  parser.add_argument('--method', default='patterns', choices=sorted(discovery.METHODS),
                      help='patterns: several patterns (default); reference: the paper\'s single eigenvector')
  parser.add_argument('--sigma', type=cli.positive_float, default=2.0,
                      help='distance scale of the affinity, cells (default 2.0)')
  parser.add_argument('--flip', default='none', choices=list(collection.FLIP_MODES),
                      help='also try the mirrored second image (corrected is geometrically right)')
  parser.add_argument('--max-patterns', type=cli.positive_int, default=10, help='at most this many patterns')
  parser.add_argument('--node-threshold', type=cli.open_unit_float, default=discovery.CONF_THRESHOLD,
                      help='graph nodes are cells whose mask exceeds this (default %(default)s, the '
                           "reference's); lower it for a model whose masks are less confident")
  cli.add_batch_size(parser, 16, 'pairs per forward call')
  parser.add_argument('--no-grabcut', action='store_true', help='outline the thresholded maps directly')
  parser.add_argument('--skip-unreadable', action='store_true', help='leave unreadable images out')
  cli.add_compute(parser, cache_format_default='projected')
  args = parser.parse_args(argv)
  list_images(args.images)  # fail on the folder before loading the model
  compilation_cache.enable()
  data = discover_folder(args.images, args.out, checkpoint=args.checkpoint, image_size=args.image_size,
                         max_pairs_per_image=args.max_pairs_per_image, method=args.method, sigma=args.sigma,
                         flip=args.flip, max_patterns=args.max_patterns, batch_size=args.batch_size,
                         grabcut=not args.no_grabcut, skip_unreadable=args.skip_unreadable,
                         node_threshold=args.node_threshold, compute_dtype=args.compute_dtype,
                         cache_format=args.cache_format)
  print(f'{len(data["patterns"])} pattern(s) in {data["summary"]["images"]} images -> '
        f'{os.path.join(args.out, "index.html")}')
  for cluster in data['patterns']:
    print(f'  pattern {cluster["pattern"]}: {cluster["num_images"]} images, '
          f'{", ".join(i["image"] for i in cluster["instances"][:6])}'
          + (' ...' if cluster['num_images'] > 6 else ''))
  return 0


if __name__ == '__main__':
  sys.exit(main())
