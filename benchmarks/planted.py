"""A synthetic collection with known repeats, and correspondence outputs that know them (an oracle).

Backgrounds are crops of the photographs bundled with scikit-image; each planted group is one patch (a
crop of another bundled photograph) pasted, cell-aligned, into several images. Because the positions are
known, the correct model outputs for any pair are known too: `oracle_pair_set` writes them in the model's
output format ((x, y, mask) per cell, x and y in [0, 1] of the other image), optionally degraded (jittered
targets, dropped cells, false matches between unrelated images) so that methods can be compared on
imperfect correspondences. Used by the discovery tests, the benchmark and the trained-model check.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import skimage

from eval import discovery
from segswap_jax import geometry

STRIDE = 16
_DATA_DIR = os.path.join(os.path.dirname(skimage.__file__), 'data')
BACKGROUNDS = ('rocket.jpg', 'motorcycle_left.png', 'retina.jpg', 'ihc.png', 'hubble_deep_field.jpg',
               'grass.png', 'gravel.png', 'brick.png', 'camera.png', 'motorcycle_right.png')
# (file, (x, y, size)) of the square crop each planted group shows.
PATCHES = (('chelsea.png', (140, 20, 200)), ('astronaut.png', (150, 20, 180)), ('coffee.png', (180, 40, 260)))


def bundled_photo(name: str) -> np.ndarray:
  """A scikit-image sample photograph as RGB uint8 `(H, W, 3)` (grey ones replicated)."""
  image = cv2.imread(os.path.join(_DATA_DIR, name), cv2.IMREAD_COLOR)
  if image is None:
    raise FileNotFoundError(f'{os.path.join(_DATA_DIR, name)}: bundled photograph missing')
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclasses.dataclass
class PlantedCollection:
  """Images with planted repeats.

  Attributes:
    images: `(N, S, S, 3)` uint8 RGB.
    groups: one dict per planted group: image index -> (col, row) of the patch's top-left cell.
    patch_cells: side of every patch in cells (patches are `patch_cells * 16` pixels).
  """
  images: np.ndarray
  groups: List[Dict[int, Tuple[int, int]]]
  patch_cells: int

  @property
  def grid(self) -> Tuple[int, int]:
    return self.images.shape[1] // STRIDE, self.images.shape[2] // STRIDE

  def cell_masks(self, groups: Optional[Sequence[int]] = None) -> np.ndarray:
    """bool `(N, h, w)`: the cells covered by the given groups (all by default)."""
    h, w = self.grid
    masks = np.zeros((len(self.images), h, w), bool)
    p = self.patch_cells
    for g in range(len(self.groups)) if groups is None else groups:
      for image, (col, row) in self.groups[g].items():
        masks[image, row:row + p, col:col + p] = True
    return masks

  def pixel_masks(self, groups: Optional[Sequence[int]] = None) -> np.ndarray:
    """bool `(N, S, S)`: the pixels covered by the given groups (all by default)."""
    cells = self.cell_masks(groups)
    return np.repeat(np.repeat(cells, STRIDE, axis=1), STRIDE, axis=2)


def make_planted_collection(groups: Sequence[Sequence[int]] = ((0, 1, 2, 3, 4), (3, 4, 5, 6, 7)),
                            num_images: Optional[int] = None, image_size: int = 240, patch_cells: int = 5,
                            seed: int = 0) -> PlantedCollection:
  """Pastes patch g into the images of `groups[g]` at random cell-aligned, non-overlapping places."""
  if image_size % STRIDE:
    raise ValueError(f'image_size must be a multiple of {STRIDE}, got {image_size}')
  if len(groups) > len(PATCHES):
    raise ValueError(f'at most {len(PATCHES)} planted groups, got {len(groups)}')
  num_images = num_images or 1 + max(max(g) for g in groups)
  rng = np.random.default_rng(seed)
  cells = image_size // STRIDE
  images = []
  for index in range(num_images):
    photo = bundled_photo(BACKGROUNDS[index % len(BACKGROUNDS)])
    side = min(photo.shape[:2])
    crop = int(side * rng.uniform(0.6, 0.9))
    y0, x0 = rng.integers(0, photo.shape[0] - crop + 1), rng.integers(0, photo.shape[1] - crop + 1)
    background = cv2.resize(photo[y0:y0 + crop, x0:x0 + crop], (image_size, image_size),
                            interpolation=cv2.INTER_AREA)
    images.append(background[:, ::-1] if rng.random() < 0.5 else background)
  images = np.ascontiguousarray(np.stack(images))
  placements = [dict() for _ in groups]
  occupied = np.zeros((num_images, cells, cells), bool)
  for g, members in enumerate(groups):
    name, (px, py, psize) = PATCHES[g]
    patch = cv2.resize(bundled_photo(name)[py:py + psize, px:px + psize],
                       (patch_cells * STRIDE, patch_cells * STRIDE), interpolation=cv2.INTER_AREA)
    for image in members:
      for _ in range(1000):
        col, row = rng.integers(0, cells - patch_cells + 1, size=2)
        if not occupied[image, row:row + patch_cells, col:col + patch_cells].any():
          break
      else:
        raise ValueError(f'no room for patch {g} in image {image}')
      occupied[image, row:row + patch_cells, col:col + patch_cells] = True
      placements[g][image] = (int(col), int(row))
      images[image, row * STRIDE:(row + patch_cells) * STRIDE, col * STRIDE:(col + patch_cells) * STRIDE] = patch
  return PlantedCollection(images, placements, patch_cells)


def oracle_pair_set(collection: PlantedCollection, jitter: float = 0.0, drop: float = 0.0,
                    false_matches: float = 0.0, seed: int = 0) -> discovery.PairSet:
  """Ground-truth pair outputs for every pair of images, in the model's output format.

  A cell of image i inside a patch that image j also shows points at the same patch cell in j with mask
  0.95; every other cell points at itself with mask 0.02. Degradations, all 0 by default:
    jitter: probability that a matched cell's target moves to a random 8-neighbour;
    drop: probability that a matched cell's mask falls to 0.3;
    false_matches: probability that an image pair gets a confident false match: a random 3 x 3 block
      of cells mapped onto a random 3 x 3 block of the other image (mask 0.9 on both sides).
  The directed score of a pair is the sum of its confident mask values on that side; pairs whose best
  score does not pass `discovery.keep_threshold` are not kept, as in the reference.
  """
  rng = np.random.default_rng(seed)
  n = len(collection.images)
  h, w = collection.grid
  p = collection.patch_cells
  centres = geometry.cell_centers(h, w, np.float32)
  pairs, outs_a, outs_b, scores = [], [], [], []
  for i, j in itertools.combinations(range(n), 2):
    out_i = np.concatenate([centres, np.full((h, w, 1), 0.02, np.float32)], axis=-1)
    out_j = out_i.copy()
    for group in collection.groups:
      if i in group and j in group:
        for src, dst, out in ((i, j, out_i), (j, i, out_j)):
          (c0, r0), (c1, r1) = group[src], group[dst]
          rows, cols = np.mgrid[0:p, 0:p]
          target = np.stack([cols + c1, rows + r1], axis=-1)
          moved = rng.random((p, p)) < jitter
          target = target + moved[..., None] * rng.integers(-1, 2, size=(p, p, 2))
          target = np.clip(target, 0, [w - 1, h - 1])
          out[r0:r0 + p, c0:c0 + p, 0] = (target[..., 0] + 0.5) / w
          out[r0:r0 + p, c0:c0 + p, 1] = (target[..., 1] + 0.5) / h
          out[r0:r0 + p, c0:c0 + p, 2] = np.where(rng.random((p, p)) < drop, 0.3, 0.95)
    if rng.random() < false_matches:
      (ri, ci), (rj, cj) = rng.integers(0, [h - 2, w - 2], size=(2, 2))
      rows, cols = np.mgrid[0:3, 0:3]
      for out, (r0, c0), (r1, c1) in ((out_i, (ri, ci), (rj, cj)), (out_j, (rj, cj), (ri, ci))):
        out[r0:r0 + 3, c0:c0 + 3, 0] = (cols + c1 + 0.5) / w
        out[r0:r0 + 3, c0:c0 + 3, 1] = (rows + r1 + 0.5) / h
        out[r0:r0 + 3, c0:c0 + 3, 2] = 0.9
    score = [float(np.sum(o[..., 2] * (o[..., 2] > 0.5))) for o in (out_i, out_j)]
    if max(score) > discovery.keep_threshold((h, w)):
      pairs.append((i, j))
      outs_a.append(out_i)
      outs_b.append(out_j)
      scores.append(score)
  if not pairs:
    return discovery.make_pair_set(n, np.zeros((0, 2)), np.zeros((0, h, w, 3)), np.zeros((0, h, w, 3)),
                                   np.zeros((0, 2)))
  return discovery.make_pair_set(n, pairs, outs_a, outs_b, scores)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
  """Foreground IoU of two bool arrays (1.0 when both are empty)."""
  union = np.logical_or(pred, truth).sum()
  return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


def binary_cell_maps(maps: np.ndarray, fg_threshold: float = discovery.FG_THRESHOLD) -> np.ndarray:
  """Per-image `(N, h, w)` maps -> bool: value > fg_threshold * the image's max (positive maxima only)."""
  peak = maps.reshape(len(maps), -1).max(axis=1)[:, None, None]
  return (maps > fg_threshold * peak) & (peak > 0)


def grabcut_masks(collection: PlantedCollection):
  """A `binarize` for `group_recovery`: per-image maps -> pixel masks with `discovery.soft_to_binary`."""
  def binarize(maps):
    return np.stack([discovery.soft_to_binary(m, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                     for m, image in zip(maps, collection.images)])
  return binarize


def group_recovery(collection: PlantedCollection, patterns: Sequence[discovery.Pattern],
                   binarize=binary_cell_maps) -> List[float]:
  """Per planted group: the best mean IoU of any one pattern over the group's images.

  Args:
    binarize: per-image maps `(N, h, w)` -> bool masks, either at cell resolution `(N, h, w)` (default:
      0.6 x each image's max) or at pixel resolution `(N, S, S)` (e.g. `grabcut_masks(collection)`).
  """
  recovered = []
  binary = [binarize(pattern.maps) for pattern in patterns]
  for g, group in enumerate(collection.groups):
    members = sorted(group)
    best = 0.0
    for pred in binary:
      truth = (collection.cell_masks([g]) if pred.shape[1:] == collection.grid
               else collection.pixel_masks([g]))
      best = max(best, float(np.mean([iou(pred[i], truth[i]) for i in members])))
    recovered.append(best)
  return recovered


def chance_iou(collection: PlantedCollection, groups: Optional[Sequence[int]] = None, trials: int = 200,
               seed: int = 0) -> float:
  """Mean cell IoU of patch-sized squares placed uniformly at random (one per planted patch)."""
  rng = np.random.default_rng(seed)
  truth = collection.cell_masks(groups)
  h, w = collection.grid
  p = collection.patch_cells
  counts = [sum(image in collection.groups[g] for g in (range(len(collection.groups)) if groups is None
                                                           else groups)) for image in range(len(truth))]
  values = []
  for image, count in enumerate(counts):
    if count == 0:
      continue
    for _ in range(trials):
      guess = np.zeros((h, w), bool)
      for col, row in rng.integers(0, [w - p + 1, h - p + 1], size=(count, 2)):
        guess[row:row + p, col:col + p] = True
      values.append(iou(guess, truth[image]))
  return float(np.mean(values))


def write_class_folder(collection: PlantedCollection, class_dir: str, ground_truth: bool = True,
                       prefix: str = 'img') -> List[str]:
  """Writes the images as `<prefix>_NN.jpg` (and, for the Internet layout, `GroundTruth/<name>.png` masks
  of all planted patches, 0/255). Returns the image names."""
  os.makedirs(class_dir, exist_ok=True)
  masks = collection.pixel_masks()
  names = []
  for index, image in enumerate(collection.images):
    name = f'{prefix}_{index:02d}.jpg'
    cv2.imwrite(os.path.join(class_dir, name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 95])
    if ground_truth:
      os.makedirs(os.path.join(class_dir, 'GroundTruth'), exist_ok=True)
      cv2.imwrite(os.path.join(class_dir, 'GroundTruth', name.replace('.jpg', '.png')),
                  masks[index].astype(np.uint8) * 255)
    names.append(name)
  return names


def virtual_pair_set(num_images: int, group_size: int = 20, grid: int = 30, cross_pairs: int = 1,
                     object_cells=(8, 14), jitter: float = 0.2, confident: float = 0.7,
                     seed: int = 0) -> discovery.PairSet:
  """Kept-pair outputs of a virtual collection (no pixels) at the scale of real runs, for benchmarks.

  Images come in groups of `group_size` (an Internet class is one group of 100); the images of a group
  show one object, a square of `object_cells` cells (random side) at a random place of a grid x grid
  map. Every pair within a group is kept, as most pairs of a class pass the keep threshold; each image
  also gets `cross_pairs` kept pairs with random images of other groups, whose outputs are confident
  false matches (random targets). Within a group a pair maps object cells onto the other object
  (scaled) with `jitter` probability of a one-cell error, a fraction `confident` of them above the
  confidence threshold. Scores are random, so the top-5 partners are a random subset.
  """
  rng = np.random.default_rng(seed)
  group = np.arange(num_images) // group_size
  sides = rng.integers(object_cells[0], object_cells[1] + 1, size=num_images)
  corners = np.stack([rng.integers(0, grid - s + 1, size=2) for s in sides])  # (col, row)
  within = [(i, j) for i in range(num_images) for j in range(i + 1, num_images) if group[i] == group[j]]
  cross = []
  for i in range(num_images):
    others = np.flatnonzero(group != group[i])
    if len(others):
      cross += [tuple(sorted((i, int(j)))) for j in rng.choice(others, size=min(cross_pairs, len(others)),
                                                               replace=False)]
  pairs = np.array(sorted(set(within) | set(cross)), np.int64).reshape(-1, 2)
  centres = geometry.cell_centers(grid, grid, np.float32)
  rows, cols = np.mgrid[0:grid, 0:grid]

  def side(src, dst):
    out = np.concatenate([centres, np.full((grid, grid, 1), 0.05, np.float32)], axis=-1)
    (c0, r0), s0 = corners[src], sides[src]
    (c1, r1), s1 = corners[dst], sides[dst]
    inside = (cols >= c0) & (cols < c0 + s0) & (rows >= r0) & (rows < r0 + s0)
    if group[src] == group[dst]:
      tx = c1 + (cols - c0 + 0.5) * s1 / s0 - 0.5
      ty = r1 + (rows - r0 + 0.5) * s1 / s0 - 0.5
      moved = rng.random((grid, grid)) < jitter
      tx = np.clip(np.round(tx) + moved * rng.integers(-1, 2, (grid, grid)), 0, grid - 1)
      ty = np.clip(np.round(ty) + moved * rng.integers(-1, 2, (grid, grid)), 0, grid - 1)
    else:
      tx, ty = rng.integers(0, grid, (2, grid, grid))
    out[..., 0] = np.where(inside, (tx + 0.5) / grid, out[..., 0])
    out[..., 1] = np.where(inside, (ty + 0.5) / grid, out[..., 1])
    conf = np.where(rng.random((grid, grid)) < confident, rng.uniform(0.86, 0.99, (grid, grid)), 0.6)
    out[..., 2] = np.where(inside, conf, out[..., 2])
    return out

  out_a = np.stack([side(i, j) for i, j in pairs])
  out_b = np.stack([side(j, i) for i, j in pairs])
  scores = rng.uniform(10, 100, size=(len(pairs), 2))
  return discovery.make_pair_set(num_images, pairs, out_a, out_b, scores)
