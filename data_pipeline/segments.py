"""Segment sources: the objects that segment swapping pastes into other images (docs/reference.md §3).

Three sources share one interface, `SegmentSource`:
  * `BundledSource`: the colour photographs shipped inside the scikit-image wheel, with unsupervised
    segments. Needs no download, so the demo runs on a fresh machine.
  * `FolderSource`: any folder of images, with the same unsupervised segments.
  * `CocoSource`: COCO instances (`annotations/instances_<split>.json` + the `<split>/` images), read with
    pycocotools, with the reference's category exclusion and our area filters.

Unsupervised segments (the paper's variant is not in the released code, so this part is ours):
Felzenszwalb-Huttenlocher graph segmentation (scikit-image) of a 256-px copy of the image at two scales,
holes filled, kept when the region covers 2-50% of the image, is compact (solidity = area / convex-hull
area >= 0.6) and does not span the whole image in either direction (a band of sky or floor is a
background, not an object); near-duplicates across scales (IoU > 0.8) are merged. docs/data.md shows why.

Images are RGB uint8 `(H, W, 3)`; their long side is capped at `max_side` (640 px, COCO's size) so that
the reference's 20-iteration dilation means the same thing for every source. Masks are bool `(H, W)` at
the size of the loaded image.
"""
from __future__ import annotations

import abc
import collections
import dataclasses
import glob
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from scipy import ndimage

from segswap_jax import images
from segswap_jax.errors import DataError, ImageError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')

# The colour photographs inside the scikit-image wheel (`skimage/data/`). Grey, synthetic or
# silhouette files there (camera, brick, chessboard, horse, phantom, ...) are left out.
BUNDLED_FILES = ('astronaut.png', 'chelsea.png', 'coffee.png', 'color.png', 'hubble_deep_field.jpg',
                 'ihc.png', 'logo.png', 'motorcycle_left.png', 'motorcycle_right.png', 'retina.jpg',
                 'rocket.jpg')


@dataclasses.dataclass(frozen=True)
class Segment:
  """One object of a source: `image` index, `key` (COCO annotation id or segment number), `category`
  (COCO category id; -1 for unsupervised segments, which have none)."""
  image: int
  key: int
  category: int = -1


@dataclasses.dataclass(frozen=True)
class UnsupervisedParams:
  """Felzenszwalb segmentation and the filters that keep object-like regions."""
  work_side: int = 256            # long side of the copy that is segmented
  scales: Tuple[float, ...] = (250.0, 750.0)
  sigma: float = 0.8
  min_region: float = 0.005       # Felzenszwalb min_size, as a fraction of the image area
  min_area: float = 0.02          # kept regions cover this much of the image ...
  max_area: float = 0.5           # ... and at most this much
  min_solidity: float = 0.6       # area / convex-hull area
  max_extent: float = 0.95        # bbox side / image side, in each direction
  dedupe_iou: float = 0.8
  min_pair_gap: float = 0.12      # two-object pairs: segments at least this far apart (x long side)


def read_image(path: str, max_side: int = 640, min_side: int = 0) -> np.ndarray:
  """Reads an image file as RGB uint8 `(H, W, 3)`, long side shrunk to at most `max_side`.

  Decoded by the one image reader (`segswap_jax.images`: grey replicated, 16-bit to 8, transparent
  images composited onto white). Raises `ImageError` (naming the file) if it cannot be decoded or its
  short side is below `min_side`.
  """
  image = images.read_rgb(path, alpha='white')
  height, width = image.shape[:2]
  if min(height, width) < min_side:
    raise ImageError(path, f'too small ({width}x{height} px; need at least {min_side} px on the '
                         'short side)')
  scale = max_side / max(height, width)
  if scale < 1.0:
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
  return image


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes a bool mask (bilinear, threshold 0.5)."""
  if mask.shape == (height, width):
    return mask
  resized = cv2.resize(mask.astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_LINEAR)
  return resized > 127


def _solidity(mask: np.ndarray) -> float:
  points = cv2.findNonZero(mask.astype(np.uint8))
  hull = cv2.convexHull(points).reshape(-1, 2).astype(np.float64) + 0.5
  # Pixel squares, not centres: a one-pixel-wide hull still has area.
  hull_area = cv2.contourArea(hull.astype(np.float32)) + 0.5 * cv2.arcLength(
      hull.astype(np.float32), True) + 1.0
  return float(mask.sum()) / hull_area


def unsupervised_segments(image: np.ndarray, params: UnsupervisedParams = UnsupervisedParams()
                          ) -> List[np.ndarray]:
  """Object-like regions of an image, from Felzenszwalb segmentation and shape filters.

  Args:
    image: RGB uint8 `(H, W, 3)`.
    params: segmentation scales and filters.

  Returns:
    bool masks `(h, w)` at the working size (long side `params.work_side`), largest first; resize
    them with `resize_mask`.
  """
  from skimage.segmentation import felzenszwalb  # Imported here: scikit-image is slow to import.
  height, width = image.shape[:2]
  scale = min(1.0, params.work_side / max(height, width))
  small = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                     interpolation=cv2.INTER_AREA) if scale < 1.0 else image
  h, w = small.shape[:2]
  area = float(h * w)
  kept: List[np.ndarray] = []
  for fz_scale in params.scales:
    labels = felzenszwalb(small, scale=fz_scale, sigma=params.sigma,
                          min_size=max(1, int(params.min_region * area)))
    for label in range(int(labels.max()) + 1):
      region = ndimage.binary_fill_holes(labels == label)
      fraction = region.sum() / area
      if not params.min_area <= fraction <= params.max_area:
        continue
      rows = np.flatnonzero(region.any(axis=1))
      cols = np.flatnonzero(region.any(axis=0))
      if (rows[-1] - rows[0] + 1 > params.max_extent * h or
          cols[-1] - cols[0] + 1 > params.max_extent * w):
        continue
      if _solidity(region) < params.min_solidity:
        continue
      duplicate = any(np.logical_and(region, other).sum() > params.dedupe_iou *
                      np.logical_or(region, other).sum() for other in kept)
      if not duplicate:
        kept.append(region)
  kept.sort(key=lambda m: -int(m.sum()))
  return kept


# Segmentation is the slow part of a draw; sources made again in one process (tests, a training demo
# that generates its data) reuse it. Keyed by (path, max_side, params).
_SEGMENT_CACHE: 'collections.OrderedDict' = collections.OrderedDict()
_SEGMENT_CACHE_SIZE = 64


class SegmentSource(abc.ABC):
  """Images with objects, and the reference's way of drawing them (docs/reference.md §3).

  Sampling takes a `np.random.Generator`, so a pair's draw depends only on its own seed.
  Methods that read images raise `ImageError` for an unusable file (the caller skips and counts).
  """

  name: str = 'source'

  def __init__(self, max_side: int = 640, min_side: int = 64, cache_size: int = 16):
    self.max_side = max_side
    self.min_side = min_side
    self._image_cache: 'collections.OrderedDict[int, np.ndarray]' = collections.OrderedDict()
    self._cache_size = cache_size

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of images."""

  @abc.abstractmethod
  def image_path(self, index: int) -> str:
    """File of image `index`."""

  @abc.abstractmethod
  def segment_mask(self, segment: Segment) -> np.ndarray:
    """bool `(H, W)` mask of `segment` at the size of `load_image(segment.image)`."""

  @abc.abstractmethod
  def sample_one(self, rng: np.random.Generator) -> Optional[Tuple[int, Segment]]:
    """(background image, object) for a one-object pair, or None if this draw found no object."""

  @abc.abstractmethod
  def sample_two(self, rng: np.random.Generator) -> Optional[Tuple[int, Segment, Segment]]:
    """(background image, object 1, object 2) of one source image with two different categories."""

  def scene(self, index: int) -> str:
    """What image `index` shows, as a key: images with one key show the same scene (stored with each
    pair so that training never uses two views of one scene as a negative)."""
    return os.path.basename(self.image_path(index))

  def load_image(self, index: int) -> np.ndarray:
    """RGB uint8 `(H, W, 3)`, long side <= max_side; small LRU cache."""
    if index in self._image_cache:
      self._image_cache.move_to_end(index)
      return self._image_cache[index]
    image = read_image(self.image_path(index), self.max_side, self.min_side)
    self._image_cache[index] = image
    if len(self._image_cache) > self._cache_size:
      self._image_cache.popitem(last=False)
    return image

  def check(self, num_probe: int = 32) -> None:
    """Fails early, with a clear message, when the first images are all unusable."""
    errors = []
    for index in range(min(num_probe, len(self))):
      try:
        self.load_image(index)
        return
      except ImageError as e:
        errors.append(str(e))
    raise DataError(f'{self.name}: none of the first {len(errors)} images is usable, e.g. {errors[0]}')


class UnsupervisedSource(SegmentSource):
  """Image files with unsupervised segments; any other image serves as background."""

  name = 'folder'

  def __init__(self, paths: Sequence[str], params: UnsupervisedParams = UnsupervisedParams(),
               max_side: int = 640, min_side: int = 64, cache_size: int = 16,
               groups: Optional[Sequence[int]] = None):
    super().__init__(max_side, min_side, cache_size)
    if len(paths) < 2:
      raise DataError(f'{self.name}: need at least 2 images (an object source and a background), '
                      f'found {len(paths)}')
    self.paths = list(paths)
    self.params = params
    # Images of one group show the same scene (a stereo pair): never source and background of a pair,
    # or B's background would hold unlabelled copies of A's content.
    self.groups = list(groups) if groups is not None else list(range(len(self.paths)))
    first_of_group = {}
    for index, group in enumerate(self.groups):
      first_of_group.setdefault(group, index)
    # A group's scene key is its first image's: one dict pass, not a list search per pair.
    self._scene_image = [first_of_group[group] for group in self.groups]
    self._one_per_group = len(set(self.groups)) == len(self.groups)
    if len(set(self.groups)) < 2:
      raise DataError(f'{self.name}: need images of at least 2 different scenes')
    self._pair_cache: 'collections.OrderedDict[int, List[Tuple[int, int]]]' = collections.OrderedDict()

  def __len__(self) -> int:
    return len(self.paths)

  def image_path(self, index: int) -> str:
    return self.paths[index]

  def scene(self, index: int) -> str:
    """The key of the first image of `index`'s group (a stereo pair shares one)."""
    return self.scene_key(self.paths[self._scene_image[index]])

  def scene_key(self, path: str) -> str:
    return os.path.basename(path)

  def segments(self, index: int) -> List[np.ndarray]:
    """Unsupervised segments of image `index` at the working size (cached per process)."""
    key = (self.paths[index], self.max_side, self.params)
    if key in _SEGMENT_CACHE:
      _SEGMENT_CACHE.move_to_end(key)
      return _SEGMENT_CACHE[key]
    masks = unsupervised_segments(self.load_image(index), self.params)
    _SEGMENT_CACHE[key] = masks
    if len(_SEGMENT_CACHE) > _SEGMENT_CACHE_SIZE:
      _SEGMENT_CACHE.popitem(last=False)
    return masks

  def segment_mask(self, segment: Segment) -> np.ndarray:
    height, width = self.load_image(segment.image).shape[:2]
    return resize_mask(self.segments(segment.image)[segment.key], height, width)

  def separated_pairs(self, index: int) -> List[Tuple[int, int]]:
    """Pairs of segments of image `index` at least `min_pair_gap` apart (cached).

    Neighbouring regions of one segmentation touch; once dilated, pasted and seen at cell resolution
    they would always overlap, so two-object pairs draw from separated segments only.
    """
    if index in self._pair_cache:
      return self._pair_cache[index]
    masks = self.segments(index)
    gap = self.params.min_pair_gap * max(masks[0].shape) if masks else 0.0
    distances = [cv2.distanceTransform((~m).astype(np.uint8), cv2.DIST_L2, 3) for m in masks]
    pairs = [(i, j) for i in range(len(masks)) for j in range(i + 1, len(masks))
             if distances[i][masks[j]].min() >= gap]
    self._pair_cache[index] = pairs
    if len(self._pair_cache) > self._cache_size:
      self._pair_cache.popitem(last=False)
    return pairs

  def _other_image(self, rng: np.random.Generator, exclude: int) -> int:
    """A uniformly drawn image of another group than image `exclude`."""
    if self._one_per_group:  # skip building the list
      index = int(rng.integers(len(self) - 1))
      return index + (index >= exclude)
    others = [i for i, group in enumerate(self.groups) if group != self.groups[exclude]]
    return others[int(rng.integers(len(others)))]

  def sample_one(self, rng, tries: int = 8):
    background = int(rng.integers(len(self)))
    for _ in range(tries):
      index = self._other_image(rng, background)
      masks = self.segments(index)
      if masks:
        return background, Segment(index, int(rng.integers(len(masks))))
    return None

  def sample_two(self, rng, tries: int = 8):
    for _ in range(tries):
      index = int(rng.integers(len(self)))
      pairs = self.separated_pairs(index)
      if pairs:
        first, second = pairs[int(rng.integers(len(pairs)))]
        if rng.random() < 0.5:
          first, second = second, first
        return self._other_image(rng, index), Segment(index, first), Segment(index, second)
    return None


class FolderSource(UnsupervisedSource):
  """Every image file in a folder (recursively), sorted by path, with unsupervised segments."""

  name = 'folder'

  def __init__(self, directory: str, **kwargs):
    if not os.path.isdir(directory):
      raise DataError(f'image folder not found: {directory}')
    paths = sorted(p for p in glob.glob(os.path.join(directory, '**', '*'), recursive=True)
                   if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p))
    if not paths:
      raise DataError(f'no images in {directory} (looked for {", ".join(IMAGE_EXTENSIONS)})')
    self.directory = directory
    super().__init__(paths, **kwargs)

  def scene_key(self, path: str) -> str:
    # Relative paths: a/1.jpg and b/1.jpg are different scenes.
    return os.path.relpath(path, self.directory)


def bundled_image_paths() -> List[str]:
  """The colour photographs inside the installed scikit-image wheel."""
  import skimage
  directory = os.path.join(os.path.dirname(skimage.__file__), 'data')
  paths = [os.path.join(directory, name) for name in BUNDLED_FILES]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise DataError(f'scikit-image wheel lacks bundled images: {", ".join(missing)}')
  return paths


class BundledSource(UnsupervisedSource):
  """The embedded default: scikit-image's colour photographs with unsupervised segments."""

  name = 'bundled'

  def __init__(self, **kwargs):
    paths = bundled_image_paths()
    scenes = [os.path.basename(p).replace('_right', '_left') for p in paths]  # motorcycle stereo pair
    super().__init__(paths, groups=[scenes.index(s) for s in scenes], **kwargs)


@dataclasses.dataclass(frozen=True)
class CocoFilters:
  """Which COCO instances become pasted objects (ours: the reference's object list is not released)."""
  min_area: float = 0.01        # instance area >= 1% of its image ...
  max_area: float = 0.8         # ... and <= 80% (a near-full-frame object leaves no background)
  min_box_side: int = 16        # bbox at least one feature cell in both directions
  exclude_crowd: bool = True    # crowd regions are groups, not objects


def find_coco_annotations(root: str, split: str) -> Tuple[str, str]:
  """(annotation json, image folder) of a standard COCO folder; DataError naming what is missing."""
  annotations = os.path.join(root, 'annotations', f'instances_{split}.json')
  if not os.path.isfile(annotations):
    found = sorted(glob.glob(os.path.join(root, 'annotations', 'instances_*.json')))
    hint = f' (found {", ".join(os.path.basename(f) for f in found)})' if found else ''
    raise DataError(f'COCO annotations not found: {annotations}{hint}')
  images = os.path.join(root, split)
  if not os.path.isdir(images):
    raise DataError(f'COCO image folder not found: {images}')
  return annotations, images


class CocoSource(SegmentSource):
  """COCO instances; backgrounds never contain the object's category (the reference's intent)."""

  name = 'coco'

  def __init__(self, root: str, split: str = 'train2017', filters: CocoFilters = CocoFilters(),
               max_side: int = 640, min_side: int = 64, cache_size: int = 16):
    super().__init__(max_side, min_side, cache_size)
    annotation_file, self.image_dir = find_coco_annotations(root, split)
    self.coco = _load_coco(annotation_file)
    self.filters = filters
    self.image_ids = sorted(self.coco.imgs)
    if len(self.image_ids) < 2:
      raise DataError(f'{annotation_file}: needs at least 2 images, has {len(self.image_ids)}')
    self._position = {image_id: i for i, image_id in enumerate(self.image_ids)}
    # Every category present in an image, whatever its size: the background exclusion uses them all.
    self.image_categories: Dict[int, frozenset] = {
        image_id: frozenset(a['category_id'] for a in self.coco.imgToAnns.get(image_id, []))
        for image_id in self.image_ids}
    # Objects that pass the filters, by category and by image.
    self.category_objects: Dict[int, List[int]] = collections.defaultdict(list)
    image_objects: Dict[int, Dict[int, List[int]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    for ann_id in sorted(self.coco.anns):
      ann = self.coco.anns[ann_id]
      if self._keep(ann):
        self.category_objects[ann['category_id']].append(ann_id)
        image_objects[ann['image_id']][ann['category_id']].append(ann_id)
    if not self.category_objects:
      raise DataError(f'{annotation_file}: no instance passes the filters {filters}')
    self.categories = sorted(self.category_objects)
    self.image_objects = {k: dict(v) for k, v in image_objects.items()}
    self.two_category_images = sorted(i for i, cats in self.image_objects.items() if len(cats) >= 2)

  def _keep(self, ann) -> bool:
    image = self.coco.imgs.get(ann['image_id'])
    if image is None:
      return False
    if self.filters.exclude_crowd and ann.get('iscrowd', 0):
      return False
    fraction = float(ann.get('area', 0.0)) / max(1.0, float(image['width'] * image['height']))
    box = ann.get('bbox', [0, 0, 0, 0])
    return (self.filters.min_area <= fraction <= self.filters.max_area and
            min(box[2], box[3]) >= self.filters.min_box_side)

  def __len__(self) -> int:
    return len(self.image_ids)

  def image_path(self, index: int) -> str:
    return os.path.join(self.image_dir, self.coco.imgs[self.image_ids[index]]['file_name'])

  def segment_mask(self, segment: Segment) -> np.ndarray:
    height, width = self.load_image(segment.image).shape[:2]
    try:
      with warnings.catch_warnings():  # pycocotools' decode trips a numpy-2 DeprecationWarning
        warnings.simplefilter('ignore', DeprecationWarning)
        mask = self.coco.annToMask(self.coco.anns[segment.key]).astype(bool)
    except Exception as e:  # pycocotools raises assorted errors on malformed polygons.
      raise ImageError(self.image_path(segment.image),
                           f'annotation {segment.key} has an unusable segmentation ({e})') from e
    return resize_mask(mask, height, width)

  def _object(self, rng, category: int) -> Segment:
    objects = self.category_objects[category]
    ann = self.coco.anns[objects[int(rng.integers(len(objects)))]]
    return Segment(self._position[ann['image_id']], ann['id'], category)

  def sample_one(self, rng):
    background = int(rng.integers(len(self)))
    excluded = self.image_categories[self.image_ids[background]]
    available = [c for c in self.categories if c not in excluded]
    if not available:
      return None
    segment = self._object(rng, available[int(rng.integers(len(available)))])
    return background, segment

  def sample_two(self, rng):
    if not self.two_category_images:
      return None
    image_id = self.two_category_images[int(rng.integers(len(self.two_category_images)))]
    by_category = self.image_objects[image_id]
    cats = sorted(by_category)
    first, second = (cats[i] for i in rng.choice(len(cats), 2, replace=False))
    segments = []
    for category in (first, second):
      anns = by_category[category]
      segments.append(Segment(self._position[image_id], anns[int(rng.integers(len(anns)))], category))
    background = int(rng.integers(len(self) - 1))
    background += background >= self._position[image_id]
    if self.image_categories[self.image_ids[background]] & {first, second}:
      return None
    return background, segments[0], segments[1]


def _load_coco(annotation_file: str):
  """pycocotools COCO index of a file, with DataError for unreadable or malformed json."""
  from pycocotools.coco import COCO
  try:
    with open(annotation_file) as f:
      dataset = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f'COCO annotation file {annotation_file} is not valid JSON: {e}') from e
  if not isinstance(dataset, dict) or not all(k in dataset for k in ('images', 'annotations',
                                                                       'categories')):
    raise DataError(f'COCO annotation file {annotation_file} lacks "images", "annotations" or '
                    '"categories"')
  coco = COCO()
  coco.dataset = dataset
  try:
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines.
      coco.createIndex()
  except (KeyError, TypeError) as e:
    raise DataError(f'COCO annotation file {annotation_file} is malformed: missing key {e}') from e
  return coco


def make_source(config) -> SegmentSource:
  """The source named by `config.source` ('bundled', 'folder' or 'coco'), from a data config."""
  common = dict(max_side=config.swap.max_source_side, min_side=config.swap.min_source_side)
  params = UnsupervisedParams(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                                 for k, v in config.unsupervised.to_dict().items()})
  if config.source == 'bundled':
    return BundledSource(params=params, **common)
  if config.source == 'folder':
    if not config.source_dir:
      raise DataError('source "folder" needs --config.source_dir=DIR')
    return FolderSource(config.source_dir, params=params, **common)
  if config.source == 'coco':
    if not config.source_dir:
      raise DataError('source "coco" needs --config.source_dir=COCO_ROOT')
    return CocoSource(config.source_dir, config.coco.split,
                      CocoFilters(**{k: v for k, v in config.coco.to_dict().items() if k != 'split'}),
                      **common)
  raise DataError(f'unknown source {config.source!r}; use bundled, folder or coco')
