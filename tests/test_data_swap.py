"""Segment swapping: the affine chain, its ground truth, Poisson blending in place, and stylisation."""
import cv2
import numpy as np
import pytest
from scipy import ndimage

from data_pipeline import blend
from data_pipeline import builder
from data_pipeline import style
from data_pipeline import swap
from segswap_jax import geometry
import test_data_support as support
from test_data_support import generated_pairs  # noqa: F401 (fixture)


def test_two_object_regions_are_the_reference_sixteen():
  s, b, g = 480, 240, 16
  expected = [
      ((0, 0, b, b - g), (0, b + g, b, s)), ((0, 0, b - g, b - g), (b + g, b + g, s, s)),
      ((0, 0, b - g, b), (b + g, 0, s, b)), ((0, 0, b, b - g), (0, b + g, s, s)),
      ((0, 0, b - g, b), (b + g, 0, s, s)), ((0, b, b - g, s), (b + g, b, s, s)),
      ((0, b + g, b - g, s), (b + g, 0, s, b - g)), ((0, b + g, b, s), (0, 0, s, b - g)),
      ((0, b, b - g, s), (b + g, 0, s, s)), ((b, b + g, s, s), (b, 0, s, b - g)),
      ((b, b + g, s, s), (0, 0, s, b - g)), ((b + g, b, s, s), (0, 0, b - g, s)),
      ((b + g, 0, s, b), (0, 0, b - g, s)), ((b, 0, s, b - g), (0, b + g, s, s)),
      ((0, 0, s, b - g), (0, b + g, s, s)), ((0, 0, b - g, s), (b + g, 0, s, s))]
  assert sorted(swap.two_object_regions(s)) == sorted(expected)


def test_correspondences_of_a_hand_made_affine():
  # Half scale, then a shift of (48, 32) px, at S = 64 (4 x 4 cells of 16 px).
  affine = np.array([[0.5, 0.0, 48.0], [0.0, 0.5, 32.0], [0.0, 0.0, 1.0]])
  corr_a, corr_b = swap.correspondences(affine, 64)
  assert corr_a.shape == corr_b.shape == (4, 4, 2) and corr_a.dtype == np.float32
  np.testing.assert_allclose(corr_a[0, 0], [(0.5 * 8 + 48) / 64, (0.5 * 8 + 32) / 64])
  np.testing.assert_allclose(corr_a[3, 1], [(0.5 * 24 + 48) / 64, (0.5 * 56 + 32) / 64])
  np.testing.assert_allclose(corr_b[2, 3], [(56 - 48) * 2 / 64, (40 - 32) * 2 / 64])
  np.testing.assert_allclose(corr_b[0, 0], [(8 - 48) * 2 / 64, (8 - 32) * 2 / 64])  # leaves A


@pytest.mark.parametrize('scale', [0.3, 1.7])
def test_warp_object_lands_where_the_affine_says(scale):
  size = 128
  image = np.zeros((size, size, 3), np.uint8)
  yy, xx = np.mgrid[:size, :size] + 0.5
  centre = np.array([50.3, 70.8])
  image[..., 1] = np.round(255 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / 60.0))
  angle = np.deg2rad(12.0)
  affine = np.array([[scale * np.cos(angle), scale * np.sin(angle), 20.0],
                     [-scale * np.sin(angle), scale * np.cos(angle), 10.0], [0.0, 0.0, 1.0]])
  warped, _ = swap.warp_object(image, np.ones((size, size), np.float32), affine, size)
  if scale > 1:  # keep the blob inside the canvas
    affine[:2, 2] -= [60.0, 60.0]
    warped, _ = swap.warp_object(image, np.ones((size, size), np.float32), affine, size)
  weights = warped[..., 1].astype(np.float64)
  found = np.array([(weights * xx).sum(), (weights * yy).sum()]) / weights.sum()
  np.testing.assert_allclose(found, swap.apply_affine(affine, centre), atol=0.25)


def test_poisson_paste_keeps_everything_in_place():
  rng = np.random.default_rng(0)
  size = 96
  source = cv2.GaussianBlur(rng.integers(0, 255, (size, size, 3)).astype(np.uint8), (0, 0), 1.5)
  background = cv2.cvtColor(cv2.imread(support.bundled('chelsea.png')), cv2.COLOR_BGR2RGB)[:size, :size]
  mask = np.zeros((size, size), bool)
  mask[21:77, 30:68] = True
  out = blend.poisson_paste(background, source, mask)
  outside = ~cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
  np.testing.assert_array_equal(out[outside], background[outside])

  def roughness(dx, dy):  # gradient left in (result - shifted source) inside the mask
    diff = out.astype(np.float64) - np.roll(source, (dy, dx), (0, 1)).astype(np.float64)
    inner = diff[25:73, 34:64]
    return np.abs(np.diff(inner, axis=0)).mean() + np.abs(np.diff(inner, axis=1)).mean()

  in_place = roughness(0, 0)
  assert all(in_place < 0.5 * roughness(dx, dy) for dx, dy in [(1, 0), (-1, 0), (0, 1), (0, -1)])


def test_copy_paste_and_the_choice_of_blending():
  rng = np.random.default_rng(1)
  background = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
  source = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
  mask = np.zeros((8, 8), bool)
  mask[2:5, 3:7] = True
  out = blend.copy_paste(background, source, mask)
  np.testing.assert_array_equal(out[mask], source[mask])
  np.testing.assert_array_equal(out[~mask], background[~mask])
  # Feathered: nothing changes outside the mask, the centre is the source, the border the background.
  dark, bright = np.full((40, 40, 3), 10, np.uint8), np.full((40, 40, 3), 250, np.uint8)
  square = np.zeros((40, 40), bool)
  square[10:30, 10:30] = True
  soft = blend.copy_paste(dark, bright, square, feather=2.0)
  np.testing.assert_array_equal(soft[~square], dark[~square])
  assert soft[20, 20, 0] >= 245 and soft[20, 10, 0] < 30 and soft[10, 20, 0] < 30
  assert np.all(np.diff(soft[20, 10:21, 0].astype(int)) >= 0)      # rises monotonically inwards
  # p = 1 and p = 0 draw nothing (the reference's stream is unchanged); p = 0.5 mixes.
  draws = np.random.default_rng(3)
  assert blend.choose_paste(draws, 1.0) is blend.poisson_paste
  assert blend.choose_paste(draws, 0.0).func is blend.copy_paste
  assert draws.random() == np.random.default_rng(3).random()
  assert blend.choose_paste(draws, 0.0, feather=1.5).keywords == {'feather': 1.5}
  chosen = [blend.choose_paste(draws, 0.5) is blend.poisson_paste for _ in range(400)]
  assert 0.4 < np.mean(chosen) < 0.6


def test_generated_pairs_have_the_stored_format(generated_pairs):
  for pair in generated_pairs:
    for name in builder.IMAGE_FEATURES:
      assert pair[name].shape == (256, 256, 3) and pair[name].dtype == np.uint8
    assert pair['corr_a'].shape == pair['corr_b'].shape == (16, 16, 2)
    assert pair['mask_a'].shape == pair['mask_b'].shape == (16, 16)
    assert pair['mask_a'].sum() >= 4 and pair['mask_b'].sum() >= 4
    assert not np.array_equal(pair['image_a'], pair['image_a_styled'])
  assert [p['num_objects'] for p in generated_pairs] == [1] * 4 + [2] * 4


def test_masks_are_cycle_consistent(generated_pairs):
  for pair in generated_pairs:
    corr_a, corr_b, mask_a, mask_b = (pair[k] for k in ('corr_a', 'corr_b', 'mask_a', 'mask_b'))
    if pair['num_objects'] == 1:  # docs/reference.md §3: mask B = sample(mask A, at B's correspondences) inside
      inside_b = np.all((corr_b > 0) & (corr_b < 1), axis=-1)
      np.testing.assert_allclose(mask_b, geometry.warp_map(mask_a, corr_b) * inside_b, atol=1e-6)
    # Whatever A sees of the object is seen by B where it lands, and back.
    strong_a, strong_b = mask_a > 0.5, mask_b > 0.5
    assert np.all((corr_a[strong_a] > 0) & (corr_a[strong_a] < 1))
    assert np.all(geometry.warp_map(mask_b, corr_a)[strong_a] > 0)
    assert np.all(geometry.warp_map(mask_a, corr_b)[strong_b] > 0)


def sift_matches(image_a, image_b):
  """SIFT matches (Lowe's ratio test) as continuous pixel coordinates: (points_a, points_b) `(N, 2)`."""
  sift = cv2.SIFT_create()
  keys_a, desc_a = sift.detectAndCompute(cv2.cvtColor(image_a, cv2.COLOR_RGB2GRAY), None)
  keys_b, desc_b = sift.detectAndCompute(cv2.cvtColor(image_b, cv2.COLOR_RGB2GRAY), None)
  if desc_a is None or desc_b is None or len(keys_b) < 2:
    return np.zeros((0, 2)), np.zeros((0, 2))
  pairs = [(keys_a[m.queryIdx].pt, keys_b[m.trainIdx].pt)
           for m, n in (k for k in cv2.BFMatcher().knnMatch(desc_a, desc_b, k=2) if len(k) == 2)
           if m.distance < 0.75 * n.distance]
  if not pairs:
    return np.zeros((0, 2)), np.zeros((0, 2))
  points_a, points_b = (np.array(p, np.float64) + 0.5 for p in zip(*pairs))  # index -> continuous
  return points_a, points_b


def check_against_sift(pair):
  """Per object of A (connected parts of mask > 0.5): an affine fitted by RANSAC to the SIFT matches
  that start there, compared with the stored correspondences of that object's cells.

  Returns (checked objects, errors in px of every checked cell).
  """
  image_a, image_b, corr_a, mask_a = (pair[k] for k in ('image_a', 'image_b', 'corr_a', 'mask_a'))
  size, cells = image_a.shape[0], mask_a.shape[0]
  points_a, points_b = sift_matches(image_a, image_b)
  labels, count = ndimage.label(mask_a > 0.5)
  cell_of = np.clip((points_a * cells / size).astype(int), 0, cells - 1)
  checked, errors = 0, []
  for label in range(1, count + 1):
    start = labels[cell_of[:, 1], cell_of[:, 0]] == label
    if start.sum() < 8:
      continue
    affine, inliers = cv2.estimateAffine2D(points_a[start], points_b[start],
                                           ransacReprojThreshold=3.0)
    if affine is None or inliers.sum() < 8:
      continue
    rows, cols = np.nonzero(labels == label)
    centres = np.stack([(cols + 0.5) * size / cells, (rows + 0.5) * size / cells], axis=-1)
    from_sift = centres @ affine[:, :2].T + affine[:, 2]
    errors.append(np.linalg.norm(corr_a[rows, cols] * size - from_sift, axis=-1))
    checked += 1
  return checked, np.concatenate(errors) if errors else np.zeros(0)


def test_ground_truth_agrees_with_sift_matches(generated_pairs):
  for num_objects in (1, 2):
    results = [check_against_sift(p) for p in generated_pairs if p['num_objects'] == num_objects]
    checked = sum(r[0] for r in results)
    errors = np.concatenate([r[1] for r in results])
    assert checked >= 2, f'too few objects with enough SIFT matches ({num_objects}-object pairs)'
    # Every checked cell lands within one feature cell (16 px) of where the matched image content went.
    assert errors.max() < 16.0, (num_objects, np.round(errors, 1))
    assert np.median(errors) < 2.0


def test_classical_style_changes_colours_not_geometry():
  image = cv2.cvtColor(cv2.imread(support.bundled('astronaut.png')), cv2.COLOR_BGR2RGB)
  image = cv2.resize(image, (192, 192), interpolation=cv2.INTER_AREA)
  stylizer = style.ClassicalStylizer([support.bundled('coffee.png'), support.bundled('ihc.png')])
  first = stylizer(image, np.random.default_rng(3))
  np.testing.assert_array_equal(first, stylizer(image, np.random.default_rng(3)))  # seeded
  assert first.shape == image.shape and first.dtype == np.uint8
  assert np.abs(first.astype(np.int32) - image).mean() > 8
  gray = lambda x: np.float32(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY))
  (dx, dy), _ = cv2.phaseCorrelate(gray(image), gray(first))
  assert abs(dx) < 0.5 and abs(dy) < 0.5
