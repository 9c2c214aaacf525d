"""The discovery graph on hand-made cases: nodes, affinities, spectral step, maps, masks (docs/reference.md §7)."""
import math

import cv2
import numpy as np
import pytest
import scipy.sparse

from eval import discovery, graph_clusters
from segswap_jax import errors

H = W = 4


def blank_outputs():
  """(H, W, 3) outputs pointing every cell at itself, mask 0."""
  ys, xs = np.mgrid[0:H, 0:W]
  return np.stack([(xs + 0.5) / W, (ys + 0.5) / H, np.zeros((H, W))], axis=-1).astype(np.float32)


def point(out, cell, target, mask=None):
  """Sets cell (x, y) of `out` to point at cell `target` (x, y) of the other image."""
  x, y = cell
  out[y, x, 0] = (target[0] + 0.5) / W
  out[y, x, 1] = (target[1] + 0.5) / H
  if mask is not None:
    out[y, x, 2] = mask


def triangle_pair_set(with_third_pair=True):
  """3 images, pairs (0,1), (0,2), (1,2); one node per pair (side j, a 1-1 tie), known 3-cycle maps."""
  outs = {p: (blank_outputs(), blank_outputs()) for p in [(0, 1), (0, 2), (1, 2)]}
  for a, _ in outs.values():
    a[3, 0, 2] = 0.9  # one confident cell on side i: ties with side j, so side j gives the node
  # Nodes (from side j): n0 = (1,1,2,1) c .9, n1 = (1,2,0,0) c .88, n2 = (3,0,3,3) c .95.
  point(outs[0, 1][1], (2, 1), (1, 1), 0.9)
  point(outs[0, 2][1], (0, 0), (1, 2), 0.88)
  point(outs[1, 2][1], (3, 3), (3, 0), 0.95)
  # Maps read by the 3-cycles (masks stay 0: they are read regardless of the mask).
  point(outs[1, 2][0], (2, 1), (0, 1))
  point(outs[1, 2][1], (0, 0), (2, 3))
  point(outs[0, 2][0], (1, 1), (3, 2))
  point(outs[0, 2][1], (3, 3), (1, 1))
  point(outs[0, 1][0], (1, 2), (3, 1))
  point(outs[0, 1][1], (3, 0), (1, 0))
  keys = [(0, 1), (0, 2), (1, 2)] if with_third_pair else [(0, 1), (0, 2)]
  return discovery.make_pair_set(3, keys, [outs[k][0] for k in keys], [outs[k][1] for k in keys],
                                 [(10.0, 10.0)] * len(keys))


def test_hand_made_triangle_affinities():
  pair_set = triangle_pair_set()
  for sigma in (1.0, 2.0):
    nodes, matrix = discovery.build_graph(pair_set, sigma)
    np.testing.assert_array_equal(nodes.cells, [[1, 1, 2, 1], [1, 2, 0, 0], [3, 0, 3, 3]])
    np.testing.assert_allclose(nodes.conf, [0.9, 0.88, 0.95])
    np.testing.assert_array_equal(nodes.blocks, [[0, 1, 0, 1], [0, 2, 1, 2], [1, 2, 2, 3]])
    k = lambda d: math.exp(-d / sigma)
    # (P01, P02) share image 0: d_u = 1, T_12(2,1) = (0,1) vs (0,0): 1, (2,1) vs T_21(0,0) = (2,3): 2.
    w01 = k(1) * 0.5 * (k(1) + k(2)) * 0.9 * 0.88
    # (P01, P12) share image 1: d_u = |(2,1)-(3,0)|, T_02(1,1) = (3,2) vs (3,3): 1, (1,1) vs T_20(3,3) = (1,1): 0.
    w02 = k(math.sqrt(2)) * 0.5 * (k(1) + k(0)) * 0.9 * 0.95
    # (P02, P12) share image 2: d_u = |(0,0)-(3,3)|, T_01(1,2) = (3,1) vs (3,0): 1, (1,2) vs T_10(3,0) = (1,0): 2.
    w12 = k(3 * math.sqrt(2)) * 0.5 * (k(1) + k(2)) * 0.88 * 0.95
    expected = np.zeros((3, 3))
    for (a, b), value in (((0, 1), w01), ((0, 2), w02), ((1, 2), w12)):
      if value > 0.01:
        expected[a, b] = expected[b, a] = value
    assert (w12 > 0.01) == (sigma == 2.0)  # the threshold matters in this case
    np.testing.assert_allclose(matrix.toarray(), expected, rtol=1e-6)
    assert matrix.dtype == np.float32


def test_no_three_cycle_edge_without_the_third_pair():
  nodes, matrix = discovery.build_graph(triangle_pair_set(with_third_pair=False), 2.0)
  assert len(nodes) == 2 and matrix.nnz == 0


def test_two_cycle_affinity_by_hand():
  a, b = blank_outputs(), blank_outputs()
  point(a, (0, 0), (1, 1), 0.9)  # node (0,0,1,1)
  point(a, (1, 0), (1, 3), 0.86)  # node (1,0,1,3)
  b[0, 0, 2] = 0.9  # side j has 1 confident cell, side i 2: side i gives the nodes
  pair_set = discovery.make_pair_set(2, [(0, 1)], [a], [b], [(10.0, 10.0)])
  sigma = 1.5
  nodes, matrix = discovery.build_graph(pair_set, sigma, two_cycle=True, three_cycle=False)
  np.testing.assert_array_equal(nodes.cells, [[0, 0, 1, 1], [1, 0, 1, 3]])
  off = math.exp(-(1 + 2) / 2 / sigma) * 0.9 * 0.86
  np.testing.assert_allclose(matrix.toarray(), [[0.81, off], [off, 0.86 ** 2]], rtol=1e-6)


def test_node_rules_side_choice_and_skip():
  # Pair (0,1): side i has 3 confident cells, side j 1 -> side i (two of them share a target: both kept).
  a, b = blank_outputs(), blank_outputs()
  point(a, (0, 0), (2, 2), 0.9)
  point(a, (1, 0), (2, 2), 0.95)
  point(a, (0, 1), (3, 3), 0.99)
  b[1, 1, 2] = 0.9
  # Pair (0,2): side j (tie 2-2 -> j); two j cells point at one i cell: distinct nodes (different x2).
  c, d = blank_outputs(), blank_outputs()
  c[0, 0, 2] = c[0, 1, 2] = 0.9
  point(d, (0, 0), (3, 3), 0.9)
  point(d, (1, 0), (3, 3), 0.88)
  # Pair (1,2): side i has a confident cell, side j none -> no nodes.
  e, f = blank_outputs(), blank_outputs()
  e[2, 2, 2] = 0.99
  pair_set = discovery.make_pair_set(3, [(0, 1), (0, 2), (1, 2)], [a, c, e], [b, d, f], [(5, 5)] * 3)
  nodes = discovery.extract_nodes(pair_set, np.ones(3, bool))
  np.testing.assert_array_equal(nodes.cells, [[0, 0, 2, 2], [1, 0, 2, 2], [0, 1, 3, 3],
                                              [3, 3, 0, 0], [3, 3, 1, 0]])
  np.testing.assert_allclose(nodes.conf, [0.9, 0.95, 0.99, 0.9, 0.88])
  np.testing.assert_array_equal(nodes.blocks, [[0, 1, 0, 3], [0, 2, 3, 5]])


def test_nodes_in_row_major_source_order():
  a, b = blank_outputs(), blank_outputs()
  a[0, 0, 2] = 0.9
  for x in (3, 1, 0, 2):
    point(b, (x, 2), (0, 0), 0.9 + 0.01 * x)
  pair_set = discovery.make_pair_set(2, [(0, 1)], [a], [b], [(5, 5)])
  nodes = discovery.extract_nodes(pair_set, np.ones(1, bool))
  np.testing.assert_array_equal(nodes.cells, [[0, 0, x, 2] for x in range(4)])
  np.testing.assert_allclose(nodes.conf, [0.9, 0.91, 0.92, 0.93], rtol=1e-6)


def test_used_pairs_top_k_either_side():
  # 4 images; directed scores; top-1 per image.
  pairs = [(0, 1), (0, 2), (1, 2), (2, 3)]
  scores = [(5.0, 1.0), (3.0, 9.0), (2.0, 4.0), (1.0, 0.0)]
  outs = [blank_outputs()] * 4
  pair_set = discovery.make_pair_set(4, pairs, outs, outs, scores)
  # Image 0: best 5 -> (0,1); 1: S[1,0]=1, S[1,2]=2 -> (1,2); 2: S[2,0]=9 -> (0,2); 3: S[3,2]=0 -> none.
  np.testing.assert_array_equal(discovery.used_pairs(pair_set, top_k=1), [True, True, True, False])
  np.testing.assert_array_equal(discovery.used_pairs(pair_set, top_k=5), [True, True, True, True])


def test_make_pair_set_orients_and_sorts():
  a, b = blank_outputs(), blank_outputs() + [0, 0, 0.5]
  pair_set = discovery.make_pair_set(3, [(2, 0)], [a], [b], [(1.0, 2.0)])
  np.testing.assert_array_equal(pair_set.pairs, [[0, 2]])
  np.testing.assert_array_equal(pair_set.out_a, b[None])
  np.testing.assert_array_equal(pair_set.scores, [[2.0, 1.0]])
  with pytest.raises(errors.DataError):
    discovery.make_pair_set(3, [(0, 1), (1, 0)], [a, a], [b, b], [(1, 1)] * 2)


def test_prefix_sizes_by_hand():
  # round(1.1^c): 1 (c=0..4), 2 (5..9), 3 (10..13), 4, 4, 5, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12, 13, 14, 16,
  # 17, 19, 21, 23, 26, 28, 31 ...
  assert discovery.prefix_sizes(30).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 19, 21,
                                                 23, 26, 28, 30]
  assert discovery.prefix_sizes(1).tolist() == [1]


def test_prefix_energies_match_brute_force():
  rng = np.random.default_rng(0)
  dense = rng.random((7, 7)) * (rng.random((7, 7)) < 0.5)
  dense = dense + dense.T
  order = rng.permutation(7)
  energies = discovery.prefix_energies(scipy.sparse.csr_matrix(dense), order)
  for k in range(1, 8):
    u = np.zeros(7)
    u[order[:k]] = 1 / math.sqrt(k)
    assert energies[k - 1] == pytest.approx(u @ dense @ u)


def test_sign_rule_by_hand():
  dense = np.zeros((5, 5))
  for a in range(3):
    for b in range(3):
      if a != b:
        dense[a, b] = 1.0
  dense[3, 4] = dense[4, 3] = 0.5
  matrix = scipy.sparse.csr_matrix(dense)
  # The triangle holds the negative end: its prefix of 3 has energy 6/3 = 2 > any positive prefix.
  vector = np.array([-0.6, -0.6, -0.6, 0.1, 0.1])
  signed, order, size, energy = discovery.sign_and_energy(matrix, vector)
  np.testing.assert_array_equal(signed, -vector)
  assert size == 3 and energy == pytest.approx(2.0) and set(order[:3]) == {0, 1, 2}
  # A tie (full set best for both signs) picks the positive sum.
  clique = scipy.sparse.csr_matrix(np.ones((4, 4)) - np.eye(4))
  signed, _, size, _ = discovery.sign_and_energy(clique, -np.full(4, 0.5))
  assert size == 4 and np.all(signed > 0)


def test_leading_eigenvector_matches_dense():
  rng = np.random.default_rng(1)
  dense = rng.random((12, 12))
  dense = (dense + dense.T) * (rng.random((12, 12)) < 0.6)
  dense = np.triu(dense, 1) + np.triu(dense, 1).T
  vector = discovery.leading_eigenvector(scipy.sparse.csr_matrix(dense.astype(np.float32)))
  values, vectors = np.linalg.eigh(dense)
  expected = vectors[:, np.argmax(np.abs(values))]
  assert abs(abs(vector @ expected) - 1) < 1e-4
  assert np.sum(vector) > 0  # Perron vector of a non-negative matrix, signed positive


def test_image_maps_overwrite_within_pair_and_sum_across():
  nodes = discovery.Nodes(
      cells=np.array([[0, 0, 1, 1], [0, 0, 2, 2], [3, 3, 1, 1]]), conf=np.ones(3, np.float32),
      blocks=np.array([[0, 1, 0, 2], [0, 2, 2, 3]]), block_pair=np.array([0, 1]), grid=(4, 4))
  maps = discovery.image_maps(nodes, np.array([1.0, 2.0, 4.0]), num_images=3)
  expected = np.zeros((3, 4, 4))
  expected[0, 0, 0] = 2.0  # nodes 0 and 1 hit (0,0) of image 0 within one pair: the last value stays
  expected[1, 1, 1] = 1.0
  expected[1, 2, 2] = 2.0
  expected[0, 3, 3] = 4.0  # second pair (0, 2): its own cells
  expected[2, 1, 1] = 4.0
  np.testing.assert_allclose(maps, expected)
  nodes2 = discovery.Nodes(cells=np.array([[0, 0, 1, 1], [0, 0, 2, 2]]), conf=np.ones(2, np.float32),
                           blocks=np.array([[0, 1, 0, 1], [0, 2, 1, 2]]), block_pair=np.array([0, 1]),
                           grid=(4, 4))
  # Across pairs the same cell accumulates.
  assert discovery.image_maps(nodes2, np.array([1.0, 2.0]), 3)[0, 0, 0] == pytest.approx(3.0)


def test_upsample_like_interpolate():
  out = discovery.upsample(np.array([[0.0, 1.0], [2.0, 3.0]]), 4, 4)
  # align_corners=False: source x = (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
  np.testing.assert_allclose(out[0], [0, 0.25, 0.75, 1])
  np.testing.assert_allclose(out[:, 0], [0, 0.5, 1.5, 2])


def test_grabcut_labels_and_ring():
  soft = np.zeros((30, 30), np.float32)
  soft[10:20, 10:20] = 0.5
  soft[14:16, 14:16] = 1.0
  labels = discovery.grabcut_labels(soft)
  assert labels[15, 15] == cv2.GC_FGD and labels[12, 12] == cv2.GC_PR_FGD
  # The 10x10 dilation adds 5 pixels above/left and 4 below/right.
  assert labels[5, 15] == cv2.GC_PR_BGD and labels[4, 15] == cv2.GC_BGD
  assert labels[23, 15] == cv2.GC_PR_BGD and labels[24, 15] == cv2.GC_BGD
  assert labels[15, 5] == cv2.GC_PR_BGD and labels[15, 4] == cv2.GC_BGD
  soft[0, 0] = 0.6  # exactly at the threshold (0.6 * max): stays GC_BGD like the reference
  assert discovery.grabcut_labels(soft)[0, 0] == cv2.GC_BGD


def test_soft_to_binary_segments_an_object():
  image = np.full((96, 96, 3), 40, np.uint8)
  image[32:64, 24:72] = (30, 200, 230)
  image += np.random.default_rng(0).integers(0, 20, image.shape, dtype=np.uint8)
  cell_map = np.zeros((6, 6), np.float32)
  cell_map[2:4, 2:4] = 1.0  # the object's centre cells (16 px each)
  mask = discovery.soft_to_binary(cell_map, image)
  truth = np.zeros((96, 96), bool)
  truth[32:64, 24:72] = True
  assert np.logical_and(mask, truth).sum() / np.logical_or(mask, truth).sum() > 0.9
  assert not discovery.soft_to_binary(-cell_map, image).any()


def test_fiedler_cut_separates_two_cliques_by_hand():
  dense = np.zeros((8, 8))
  dense[:4, :4] = 1.0
  dense[4:, 4:] = 1.0
  np.fill_diagonal(dense, 0.0)
  dense[3, 4] = dense[4, 3] = 0.1
  side, conductance = graph_clusters.fiedler_cut(scipy.sparse.csr_matrix(dense))
  assert set(np.flatnonzero(side)) in ({0, 1, 2, 3}, {4, 5, 6, 7})
  assert conductance == pytest.approx(0.1 / 12.1)  # cut 0.1 over the volume 4 * 3 + 0.1
  groups = graph_clusters.split_patterns(scipy.sparse.csr_matrix(dense), max_conductance=0.05, min_nodes=2)
  assert sorted(sorted(g.tolist()) for g in groups) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_merge_groups_rules():
  def support(images, rows, cols):
    return np.array([(i, r, c) for i in images for r in rows for c in cols])

  supports = [
      support([0, 1, 2], range(0, 3), range(0, 2)),  # 0
      support([0, 1, 2], range(0, 3), range(2, 4)),  # 1: beside 0 in all 3 shared images -> one pattern
      support([5], range(0, 3), range(0, 3)),  # 2: with 3, IoU 6 / 9 in image 5 -> merged
      support([5, 6], range(1, 3), range(0, 3)),  # 3
      support([0, 1, 7, 8], range(4, 7), range(0, 2)),  # 4: within 2 cells of 0 in its only 2 shared images
  ]
  merged = sorted(sorted(m.tolist()) for m in graph_clusters.merge_groups(supports, (10, 10)))
  assert merged == [[0, 1], [2, 3], [4]]


def test_nodes_without_any_cycle_give_no_pattern_and_no_error():
  # Two images: confident nodes, but no third image closes a 3-cycle: an all-zero affinity (ARPACK
  # stops on it; the demo model's outputs at 192 px hit this).
  from benchmarks import planted
  pair_set = planted.oracle_pair_set(planted.make_planted_collection(groups=((0, 1),), num_images=2, seed=0))
  for method in ('reference', 'patterns'):
    result = discovery.discover(pair_set, method, sigma=1.0)
    assert len(result.nodes) > 0 and not np.any(result.matrix.data)
    assert result.patterns == []
  assert np.array_equal(discovery.leading_eigenvector(scipy.sparse.csr_matrix((3, 3))), np.zeros(3))
