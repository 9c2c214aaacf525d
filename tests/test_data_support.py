"""Helpers for the data tests: small configs and miniature datasets in the real on-disk formats.

Everything is built from the photographs bundled with scikit-image (no download, no mocks).
"""
import json
import os

import cv2
import numpy as np
import pytest

from configs.data import demo
from data_pipeline import builder
from data_pipeline import generate
from data_pipeline import segments
from data_pipeline import shards


def small_config(**overrides):
  """The demo config at 192 x 192 (12 x 12 cells) with a handful of pairs, made in this process.

  Two-object pairs need room: below ~192 px most objects' masks fall under the minimum cell count.
  """
  config = demo.get_config()
  config.image_size = 192
  config.swap.min_mask_cells = 2.0
  config.num_pairs = 6
  config.num_validation = 2
  config.shard_size = 3
  config.num_workers = 1
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def bundled(name: str) -> str:
  return next(p for p in segments.bundled_image_paths() if os.path.basename(p) == name)


def write_image_folder(directory: str, names=('astronaut.png', 'coffee.png', 'chelsea.png',
                                              'motorcycle_left.png')) -> list:
  """Copies some bundled photographs into `directory` (as JPEG); returns the paths."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for name in names:
    path = os.path.join(directory, os.path.splitext(name)[0] + '.jpg')
    cv2.imwrite(path, cv2.imread(bundled(name)))
    paths.append(path)
  return paths


# A miniature COCO: three photographs with hand-drawn polygons in the instances_*.json format.
# Category 1 'person' and 2 'cup' and 3 'cat'; astronaut has a person (face) and a cup-like helmet box.
COCO_OBJECTS = {
    'astronaut.png': [(1, [[170, 30, 260, 30, 270, 150, 170, 160]]),           # face
                      (2, [[360, 330, 500, 330, 500, 460, 360, 460]])],        # helmet
    'coffee.png': [(2, [[180, 20, 420, 20, 430, 220, 170, 220]])],             # cup
    'chelsea.png': [(3, [[100, 40, 350, 40, 360, 290, 90, 290]]),              # cat face
                    (3, [[0, 0, 30, 0, 30, 30, 0, 30]])],                       # too small: filtered
}


def write_mini_coco(root: str, split: str = 'train2017', crowd: bool = True) -> str:
  """Writes root/annotations/instances_<split>.json and root/<split>/*.jpg; returns root."""
  image_dir = os.path.join(root, split)
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  images, annotations = [], []
  ann_id = 1
  for image_id, (name, objects) in enumerate(sorted(COCO_OBJECTS.items()), start=1):
    image = cv2.imread(bundled(name))
    file_name = f'{image_id:012d}.jpg'
    cv2.imwrite(os.path.join(image_dir, file_name), image)
    height, width = image.shape[:2]
    images.append({'id': image_id, 'file_name': file_name, 'height': height, 'width': width})
    for category, polygon in objects:
      xs, ys = polygon[0][0::2], polygon[0][1::2]
      area = float(cv2.contourArea(np.array(list(zip(xs, ys)), np.float32)))
      annotations.append({'id': ann_id, 'image_id': image_id, 'category_id': category,
                          'segmentation': polygon, 'area': area, 'iscrowd': 0,
                          'bbox': [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
      ann_id += 1
  if crowd:  # A crowd region over the coffee image (id 3): must never be pasted.
    annotations.append({'id': ann_id, 'image_id': 3, 'category_id': 1, 'iscrowd': 1,
                        'segmentation': [[0, 300, 200, 300, 200, 399, 0, 399]], 'area': 19800.0,
                        'bbox': [0, 300, 200, 99]})
  categories = [{'id': 1, 'name': 'person'}, {'id': 2, 'name': 'cup'}, {'id': 3, 'name': 'cat'}]
  with open(os.path.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
    json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f)
  return root


def test_mini_coco_is_read_by_pycocotools(tmp_path):
  from pycocotools.coco import COCO
  root = write_mini_coco(str(tmp_path / 'coco'))
  coco = COCO(os.path.join(root, 'annotations', 'instances_train2017.json'))
  assert len(coco.imgs) == 3 and len(coco.anns) == 6
  mask = coco.annToMask(coco.anns[1])
  assert mask.shape == (512, 512) and 8000 < mask.sum() < 12000  # ~90 x 125 px quadrilateral


@pytest.fixture(scope='session')
def small_dataset(tmp_path_factory):
  """An uninterrupted generation of `small_config()` (6 train + 2 validation pairs); its directory."""
  return generate.generate(small_config(), str(tmp_path_factory.mktemp('small_dataset')))


@pytest.fixture(scope='session')
def generated_pairs():
  """Pairs made by the real pipeline (bundled photos, 256 px), decoded from their stored JPEGs:
  four one-object pairs, then four two-object pairs."""
  pairs = []
  for fraction in (0.0, 1.0):
    maker = shards.PairMaker(small_config(image_size=256, two_object_fraction=fraction,
                                          **{'swap.min_mask_cells': 4.0}))
    stats = shards.empty_stats()
    for index in range(4):
      example = maker.example('train', index, stats)
      pairs.append({**example, **{k: builder.decode_jpeg(example[k])
                                  for k in builder.IMAGE_FEATURES}})
  return pairs
