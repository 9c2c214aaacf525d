"""Discovery where the reference is exactly determined: the map upsampling equals PyTorch's, GrabCut's
random stream can be the released one, the reference method's kernel is float32; and where it is not
determined (a graph in pieces), the run says so."""
import os

import cv2
import numpy as np
import pytest
import scipy.sparse

from benchmarks import planted
from eval import discovery, internet

torch = pytest.importorskip('torch')


def torch_upsample(cell_map, height, width):
  tensor = torch.from_numpy(np.asarray(cell_map, np.float32))[None, None]
  return torch.nn.functional.interpolate(tensor, size=(height, width), mode='bilinear',
                                         align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize('shape, size', [((30, 30), (375, 500)), ((30, 30), (333, 479)), ((30, 40), (480, 640)),
                                         ((8, 8), (128, 200)), ((30, 30), (1000, 37)), ((30, 30), (30, 30))])
def test_upsampling_equals_pytorch_on_every_pixel(shape, size):
  rng = np.random.default_rng(sum(size))
  cell_map = rng.standard_normal(shape).astype(np.float32)
  cell_map[:, :2] = 0.0    # zero outer cells: the edge bands PyTorch leaves exactly 0
  cell_map[-1] = 0.0
  ours, theirs = discovery.upsample(cell_map, *size), torch_upsample(cell_map, *size)
  np.testing.assert_array_equal(ours, theirs)
  assert np.any(theirs == 0) and np.array_equal(ours == 0, theirs == 0)


def test_downsampling_stays_within_a_float_step():
  cell_map = np.random.default_rng(0).standard_normal((30, 30)).astype(np.float32)
  np.testing.assert_allclose(discovery.upsample(cell_map, 17, 23), torch_upsample(cell_map, 17, 23), atol=3e-7)


@pytest.fixture(scope='module')
def internet_class(tmp_path_factory):
  """A miniature Internet class (images + GroundTruth/) with oracle pair outputs."""
  collection = planted.make_planted_collection(groups=((0, 1, 2, 3),), num_images=6, image_size=240, seed=5)
  folder = str(tmp_path_factory.mktemp('internet') / 'Horse100')
  planted.write_class_folder(collection, folder)
  return folder, planted.oracle_pair_set(collection, jitter=0.3, seed=1)


def test_the_released_pipeline_upsamples_exactly_as_pytorch(internet_class):
  folder, pair_set = internet_class
  result = discovery.discover(pair_set, 'reference', internet.class_sigma('Horse100', 'reference'))
  for index, name in enumerate(internet.list_images(folder)):
    height, width = internet.load_original_bgr(folder, name).shape[:2]
    np.testing.assert_array_equal(discovery.upsample(result.maps[index], height, width),
                                  torch_upsample(result.maps[index], height, width))
  released = internet.evaluate_class(pair_set, folder, 'reference', 1.2, grabcut_rng='released')
  again = internet.evaluate_class(pair_set, folder, 'reference', 1.2, grabcut_rng='released')
  assert released['per_image'] == again['per_image']   # one stream per class, started afresh each time
  assert released['J'] > 0.5


def test_grabcut_streams():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
  image[15:45, 20:60] = (40, 200, 90)
  cell_map = np.zeros((6, 8), np.float32)
  cell_map[2:4, 3:5] = 1.0
  cell_map[1:5, 2:6] += 0.3
  per_call = [discovery.soft_to_binary(cell_map, image) for _ in range(2)]
  np.testing.assert_array_equal(per_call[0], per_call[1])
  discovery.reset_grabcut_rng()
  first = discovery.soft_to_binary(cell_map, image, grabcut_rng='released')
  np.testing.assert_array_equal(first, per_call[0])   # a fresh stream starts where per-call reseeds
  with pytest.raises(discovery.DataError, match='grabcut_rng'):
    discovery.soft_to_binary(cell_map, image, grabcut_rng='other')


def test_the_reference_method_uses_a_float32_kernel():
  table32 = discovery._kernel_table(1.2, (30, 30), 'float32')
  assert table32.dtype == np.float32
  expected = np.exp(-np.sqrt(np.arange(29 ** 2 * 2 + 1).astype(np.float32)) / np.float32(1.2))
  np.testing.assert_array_equal(table32, expected)
  table64 = discovery._kernel_table(1.2, (30, 30))
  assert np.any(table32.astype(np.float64) != table64)   # the two differ by float32 steps


def test_a_graph_in_pieces_is_reported_undetermined():
  # Two disconnected cliques: the leading eigenvector lives on the stronger one, the other is noise.
  strong = np.full((4, 4), 0.9)
  weak = np.full((5, 5), 0.2)
  matrix = scipy.sparse.csr_matrix(scipy.sparse.block_diag([strong, weak]))
  vector = discovery.leading_eigenvector(matrix)
  assert discovery.undetermined_fraction(matrix, vector) == pytest.approx(5 / 9)
  connected = scipy.sparse.csr_matrix(np.full((5, 5), 0.5))
  assert discovery.undetermined_fraction(connected, discovery.leading_eigenvector(connected)) == 0.0
