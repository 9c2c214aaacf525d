"""Discovery recovers planted repeats from oracle correspondences (outputs in the model's format)."""
import cv2
import numpy as np
import pytest

from benchmarks import planted
from eval import discovery
from segswap_jax import errors


@pytest.fixture(scope='module')
def one_group():
  # Patch 0 in images 0-4; image 5 shows nothing repeated.
  return planted.make_planted_collection(groups=((0, 1, 2, 3, 4),), num_images=6, seed=3)


@pytest.fixture(scope='module')
def two_groups():
  # Patch 0 in images 0-4, patch 1 in 3-7: images 3 and 4 show both.
  return planted.make_planted_collection(groups=((0, 1, 2, 3, 4), (3, 4, 5, 6, 7)), seed=0)


def test_oracle_outputs_are_in_model_format(two_groups):
  pair_set = planted.oracle_pair_set(two_groups)
  h, w = two_groups.grid
  assert pair_set.out_a.shape[1:] == (h, w, 3) and pair_set.out_a.dtype == np.float32
  assert np.all((pair_set.out_a >= 0) & (pair_set.out_a <= 1))
  # Only image pairs sharing a patch are kept: 10 pairs in group 0, 10 in group 1, (3, 4) in both.
  assert len(pair_set.pairs) == 19
  # Cycle consistency of the oracle: i -> j -> i returns to the start on every matched cell.
  k = 0
  forward = discovery.rounded_targets(pair_set.out_a[k], h, w)
  backward = discovery.rounded_targets(pair_set.out_b[k], h, w)
  rows, cols = np.nonzero(pair_set.out_a[k, ..., 2] > 0.5)
  back = backward[forward[rows, cols, 1], forward[rows, cols, 0]]
  np.testing.assert_array_equal(back, np.stack([cols, rows], axis=1))


def test_reference_method_recovers_one_planted_group(one_group):
  result = discovery.discover(planted.oracle_pair_set(one_group), 'reference', sigma=1.0)
  truth = one_group.cell_masks()
  # The support of each image's map is exactly the planted patch (nothing in image 5).
  np.testing.assert_array_equal(result.maps > 0, truth)
  # And GrabCut turns the maps into pixel masks that match the pasted patch.
  pixels = one_group.pixel_masks()
  for index in (0, 2):
    image = cv2.cvtColor(one_group.images[index], cv2.COLOR_RGB2BGR)
    mask = discovery.soft_to_binary(result.maps[index], image)
    assert planted.iou(mask, pixels[index]) > 0.8


def test_patterns_method_separates_two_groups(two_groups):
  result = discovery.discover(planted.oracle_pair_set(two_groups), 'patterns', sigma=1.0)
  assert len(result.patterns) == 2
  found = sorted(sorted(p.images.tolist()) for p in result.patterns)
  assert found == [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]]
  for pattern in result.patterns:
    group = 0 if 0 in pattern.images else 1
    np.testing.assert_array_equal(pattern.maps > 0, two_groups.cell_masks([group]))
  # The single-eigenvector reference mixes both groups into one pattern.
  reference = discovery.discover(planted.oracle_pair_set(two_groups), 'reference', sigma=1.0)
  assert len(reference.patterns) == 1 and len(reference.patterns[0].images) == 8


def test_patterns_method_beats_reference_on_noisy_correspondences(two_groups):
  pair_set = planted.oracle_pair_set(two_groups, jitter=0.3, drop=0.2, false_matches=0.5, seed=1)
  support = lambda maps: maps > 0
  reference = planted.group_recovery(two_groups, discovery.discover(pair_set, 'reference', 1.0).patterns,
                                     binarize=support)
  patterns = planted.group_recovery(two_groups, discovery.discover(pair_set, 'patterns', 1.0).patterns,
                                    binarize=support)
  assert min(patterns) > 0.7
  assert np.mean(patterns) > np.mean(reference) + 0.15
  assert np.mean(patterns) > planted.chance_iou(two_groups) + 0.5


def test_empty_and_degenerate_inputs():
  empty = discovery.make_pair_set(4, np.zeros((0, 2)), np.zeros((0, 4, 4, 3)), np.zeros((0, 4, 4, 3)),
                                  np.zeros((0, 2)))
  for method in discovery.METHODS:
    result = discovery.discover(empty, method, 1.0)
    assert result.maps.shape == (4, 4, 4) and not result.maps.any() and not result.patterns
  with pytest.raises(errors.DataError):
    discovery.discover(empty, 'nonsense', 1.0)
