"""Segment sources: bundled photographs, unsupervised segments, image folders, COCO; and their errors."""
import os

import cv2
import numpy as np
import pytest
from scipy import ndimage

from data_pipeline import segments
from segswap_jax.errors import DataError, ImageError
import test_data_support as support


BUNDLED = list(segments.BUNDLED_FILES)


def test_bundled_source_is_the_colour_photographs():
  source = segments.BundledSource()
  assert len(source) == 11
  for index in range(len(source)):
    image = source.load_image(index)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert max(image.shape[:2]) <= 640
    channels = image.astype(np.int32)
    assert np.abs(channels[..., 0] - channels[..., 2]).mean() > 3  # really coloured
  # Scene keys: one per photograph, the stereo pair's two views share one.
  scenes = [source.scene(i) for i in range(len(source))]
  assert len(set(scenes)) == 10
  assert scenes[BUNDLED.index('motorcycle_right.png')] == scenes[BUNDLED.index('motorcycle_left.png')]


def test_unsupervised_segments_find_a_planted_object_and_skip_bands():
  image = cv2.cvtColor(cv2.imread(support.bundled('coffee.png')), cv2.COLOR_BGR2RGB)  # 400 x 600
  disc = np.zeros(image.shape[:2], np.uint8)
  cv2.ellipse(disc, (450, 260), (90, 70), 0, 0, 360, 1, -1)
  image[disc > 0] = (40, 200, 60)
  image[:60] = (30, 60, 220)  # a full-width band: a background, never an object
  masks = segments.unsupervised_segments(image)
  assert masks, 'no segment found'
  full = [segments.resize_mask(m, *image.shape[:2]) for m in masks]
  ious = [np.logical_and(m, disc).sum() / np.logical_or(m, disc).sum() for m in full]
  assert max(ious) > 0.85
  band = np.zeros(image.shape[:2], bool)
  band[:60] = True
  assert all(np.logical_and(m, band).sum() < 0.5 * band.sum() for m in full)


def test_separated_pairs_are_far_apart():
  source = segments.BundledSource()
  index = [os.path.basename(p) for p in source.paths].index('astronaut.png')
  masks = source.segments(index)
  pairs = source.separated_pairs(index)
  assert pairs
  gap = source.params.min_pair_gap * max(masks[0].shape)
  for i, j in pairs:
    distance = ndimage.distance_transform_edt(~masks[i])[masks[j]].min()
    assert distance >= gap - 1.0


def test_read_image_errors_name_the_file(tmp_path):
  corrupt = tmp_path / 'corrupt.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  with pytest.raises(ImageError, match='corrupt.jpg: unreadable or corrupt image'):
    segments.read_image(str(corrupt))
  with pytest.raises(ImageError, match='missing.png: no such image file'):
    segments.read_image(str(tmp_path / 'missing.png'))
  small = tmp_path / 'small.png'
  cv2.imwrite(str(small), np.zeros((40, 50, 3), np.uint8))
  with pytest.raises(ImageError, match=r'small.png: too small \(50x40 px'):
    segments.read_image(str(small), min_side=64)
  logo = segments.read_image(support.bundled('logo.png'))  # RGBA: transparent corners become white
  assert logo.shape == (500, 500, 3) and (logo[0, 0] == 255).all()


def test_folder_source_errors(tmp_path):
  with pytest.raises(DataError, match='image folder not found'):
    segments.FolderSource(str(tmp_path / 'nowhere'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'notes.txt').write_text('no images here')
  with pytest.raises(DataError, match='no images in .*empty'):
    segments.FolderSource(str(empty))
  single = tmp_path / 'single'
  support.write_image_folder(str(single), ['coffee.png'])
  with pytest.raises(DataError, match='need at least 2 images'):
    segments.FolderSource(str(single))
  tiny = tmp_path / 'tiny'
  tiny.mkdir()
  for i in range(3):
    cv2.imwrite(str(tiny / f'{i}.png'), np.full((32, 48, 3), 60 * i, np.uint8))
  with pytest.raises(DataError, match=r'none of the first 3 images is usable.*too small \(48x32'):
    segments.FolderSource(str(tiny)).check()


def test_coco_missing_and_corrupt_files(tmp_path):
  with pytest.raises(DataError, match='COCO annotations not found: .*instances_train2017.json'):
    segments.CocoSource(str(tmp_path))
  root = support.write_mini_coco(str(tmp_path / 'coco'))
  annotations = os.path.join(root, 'annotations', 'instances_train2017.json')
  with pytest.raises(DataError, match=r'COCO annotations not found.*\(found instances_train2017.json\)'):
    segments.CocoSource(root, split='val2017')
  with open(annotations, 'w') as f:
    f.write('{"images": [')
  with pytest.raises(DataError, match='instances_train2017.json is not valid JSON'):
    segments.CocoSource(root)
  with open(annotations, 'w') as f:
    f.write('{"images": []}')
  with pytest.raises(DataError, match='lacks "images", "annotations" or "categories"'):
    segments.CocoSource(root)


def test_coco_filters_and_category_exclusion(tmp_path):
  source = segments.CocoSource(support.write_mini_coco(str(tmp_path / 'coco')))
  kept = sorted(a for objects in source.category_objects.values() for a in objects)
  assert kept == [1, 2, 3, 5]  # the 30 x 30 px cat (id 4) and the crowd region (id 6) are filtered
  names = {i: source.coco.imgs[source.image_ids[i]]['file_name'] for i in range(len(source))}
  rng = np.random.default_rng(0)
  draws = [source.sample_one(rng) for _ in range(300)]
  seen_categories = set()
  for background, segment in [d for d in draws if d is not None]:
    # The reference meant to exclude backgrounds that contain the object's category.
    assert segment.category not in source.image_categories[source.image_ids[background]]
    assert segment.image != background
    seen_categories.add(segment.category)
  assert seen_categories == {1, 2, 3}
  for _ in range(50):
    draw = source.sample_two(rng)
    if draw is None:
      continue
    background, first, second = draw
    assert names[first.image] == names[second.image] == f'{1:012d}.jpg'  # only astronaut has 2 cats
    assert {first.category, second.category} == {1, 2}
    assert not source.image_categories[source.image_ids[background]] & {1, 2}
  mask = source.segment_mask(segments.Segment(0, 1, 1))
  assert mask.shape == (512, 512) and mask[90, 215] and not mask[300, 300]
