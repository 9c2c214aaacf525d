"""The docs/reference.md §2 objective on hand-made cases whose values are worked out independently here."""
import math

import numpy as np
import pytest

from segswap_jax import losses


def bce(p, t):
  return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def out_map(xy, mask):
  """(h, w, 2) + (h, w) -> (1, h, w, 3)."""
  return np.concatenate([np.asarray(xy, np.float32), np.asarray(mask, np.float32)[..., None]], -1)[None]


def test_in_batch_negatives_follow_the_reference_shifts():
  index_a, index_b = losses.in_batch_negatives(5, 15)
  expected = [(i, (i + s) % 5) for s in (1, 2, 3) for i in range(5)]
  assert list(zip(index_a.tolist(), index_b.tolist())) == expected
  assert all(a != b for a, b in expected)
  index_a, index_b = losses.in_batch_negatives(3, 6)
  assert sorted(zip(index_a.tolist(), index_b.tolist())) == sorted(
      (i, j) for i in range(3) for j in range(3) if i != j)
  with pytest.raises(ValueError, match='at most 6'):
    losses.in_batch_negatives(3, 7)


def test_loss_on_a_two_by_one_case():
  # One positive pair of 1 x 2 maps (h=1, w=2) and one negative pair.
  # A: cells (0,0), (0,1); GT mask_a = [1, 0.5] -> peak cell (0,0) only.  B: mask_b = [0, 1] -> peak (0,1).
  gt_corr_a = [[[0.75, 0.5], [0.9, 0.5]]]
  gt_corr_b = [[[0.1, 0.5], [0.25, 0.5]]]
  targets = losses.PositiveTargets(
      mask_a=np.array([[[1.0, 0.5]]], np.float32), mask_b=np.array([[[0.0, 1.0]]], np.float32),
      corr_a=np.array([gt_corr_a], np.float32), corr_b=np.array([gt_corr_b], np.float32))
  # Predictions: A's cells point exactly at B's cell centres (x = 0.25, 0.75), so the warped masks
  # read B's mask values exactly: warped_a = [mask_b(0,0), mask_b(0,1)] swapped by the pointing.
  pos_a = out_map([[[0.75, 0.5], [0.25, 0.5]]], [[0.8, 0.3]])   # cell 0 -> B cell 1, cell 1 -> B cell 0
  pos_b = out_map([[[0.25, 0.5], [0.25, 0.5]]], [[0.2, 0.6]])   # both B cells -> A cell 0
  neg_a = out_map([[[0.5, 0.5], [0.5, 0.5]]], [[0.1, 0.4]])
  neg_b = out_map([[[0.5, 0.5], [0.5, 0.5]]], [[0.7, 0.2]])
  result = {k: float(v) for k, v in losses.segswap_loss(pos_a, pos_b, targets, neg_a, neg_b,
                                                        warp_mask=True, eta_corr=8.0).items()}
  warped_a = [0.6, 0.2]   # B's mask at B cell 1, at B cell 0
  warped_b = [0.8, 0.8]   # A's mask at A cell 0, twice
  terms = ([bce(p, t) for p, t in zip([0.8, 0.3], [1.0, 0.5])] + [bce(p, t) for p, t in zip([0.2, 0.6], [0, 1])]
           + [bce(p, t) for p, t in zip(warped_a, [1.0, 0.5])] + [bce(p, t) for p, t in zip(warped_b, [0, 1])]
           + [bce(p, 0.0) for p in [0.1, 0.4, 0.7, 0.2]])
  assert result['loss_mask'] == pytest.approx(np.mean(terms), rel=1e-5)
  # L_corr only looks at peak cells, where the predictions equal the GT here (A (0,0), B (0,1)); the
  # wrong predictions of the non-peak cells do not count. The next test has a non-zero case.
  assert result['loss_corr'] == pytest.approx(0.0, abs=1e-7)
  assert result['loss'] == pytest.approx(result['loss_mask'], rel=1e-6)
  # Accuracies: peak cells A(0,0) 0.8 > 0.5 hit, B(0,1) 0.6 hit -> 1.0. Others: A(0,1) 0.3 < 0.5 hit,
  # B(0,0) 0.2 hit, negatives 0.1, 0.4, 0.2 hit and 0.7 miss -> 5 / 6.
  assert result['acc_pos'] == pytest.approx(1.0)
  assert result['acc_neg'] == pytest.approx(5 / 6)
  assert result['acc'] == pytest.approx(0.5 * (1 + 5 / 6))


def test_correspondence_loss_counts_peak_cells_of_both_images():
  mask_a = np.array([[[1.0, 1.0], [0.3, 0.0]]], np.float32)   # two peak cells
  mask_b = np.array([[[0.2, 0.0], [0.0, 0.4]]], np.float32)   # one peak cell (0.4 at (1,1))
  gt = np.full((1, 2, 2, 2), 0.5, np.float32)
  pred_a = np.full((1, 2, 2, 3), 0.5, np.float32)
  pred_b = np.full((1, 2, 2, 3), 0.5, np.float32)
  pred_a[0, 0, 0, :2] = [0.6, 0.3]    # |0.1| + |0.2| = 0.3
  pred_a[0, 0, 1, :2] = [0.5, 0.9]    # 0.4
  pred_a[0, 1, 0, :2] = [0.0, 0.0]    # not a peak: ignored
  pred_b[0, 1, 1, :2] = [0.4, 0.4]    # 0.2
  targets = losses.PositiveTargets(mask_a, mask_b, gt, gt)
  # (0.3 + 0.4 + 0.2) / 3 cells / 2
  assert float(losses.correspondence_loss(pred_a, pred_b, targets)) == pytest.approx(0.9 / 3 / 2, rel=1e-6)


def test_without_warp_mask_and_validation_metrics():
  targets = losses.PositiveTargets(np.ones((1, 1, 2), np.float32), np.zeros((1, 1, 2), np.float32) + [[[1.0, 0.0]]],
                                   np.full((1, 1, 2, 2), 0.5, np.float32), np.full((1, 1, 2, 2), 0.5, np.float32))
  pos_a = out_map([[[0.5, 0.5], [0.5, 0.5]]], [[0.9, 0.9]])
  pos_b = out_map([[[0.5, 0.5], [0.5, 0.5]]], [[0.9, 0.1]])
  empty = np.zeros((0, 1, 2, 3), np.float32)
  result = losses.segswap_loss(pos_a, pos_b, targets, empty, empty, warp_mask=False)
  expected = np.mean([bce(0.9, 1), bce(0.9, 1), bce(0.9, 1), bce(0.1, 0)])
  assert float(result['loss_mask']) == pytest.approx(expected, rel=1e-5)

  pred = np.array([[[0.9, 0.9], [0.1, 0.6]]])
  gt = np.array([[[1.0, 0.0], [0.0, 1.0]]])
  assert float(losses.mask_iou(pred, gt)[0]) == pytest.approx(2 / 3)   # {00, 11} & {00, 01, 11}
  assert float(losses.mask_iou(np.zeros((2, 2)), np.zeros((2, 2)))) == 1.0
  xy_gt = np.array([[[0.5, 0.5]]], np.float32)
  xy_pred = np.array([[[0.5 + 3 / 8, 0.5 + 4 / 10]]], np.float32)   # 3 cells right of 8, 4 down of 10
  assert float(losses.correspondence_error_cells(xy_pred, xy_gt, (10, 8))[0, 0]) == pytest.approx(5.0)


def test_peak_cells_tolerate_float_rounding_and_foreground_cells():
  # A bilinear sum of 1.0s can round to 0.99999994: still the interior. 0.999 is not.
  mask = np.array([[[1.0, np.float32(0.99999994)], [0.999, 0.6]]], np.float32)
  np.testing.assert_array_equal(np.asarray(losses.peak_cells(mask)), [[[True, True], [False, False]]])
  # A coarse, twice-warped mask whose maximum is 0.83: the reference's rule keeps one cell,
  # 'foreground' keeps every cell above one half.
  soft = np.array([[[0.83, 0.7], [0.55, 0.2]]], np.float32)
  assert int(np.sum(losses.supervised_cells(soft, 'peak'))) == 1
  np.testing.assert_array_equal(np.asarray(losses.supervised_cells(soft, 'foreground')),
                                [[[True, True], [True, False]]])
  gt = np.full((1, 2, 2, 2), 0.5, np.float32)
  pred = np.full((1, 2, 2, 3), 0.5, np.float32)
  pred[0, 1, 0, :2] = [0.9, 0.5]     # 0.4 off at the 0.55 cell; the other cells exact
  targets = losses.PositiveTargets(soft, soft, gt, gt)
  # foreground: 0.4 in A + 0.4 in B over 3 + 3 cells, halved; peak: that cell is not counted.
  assert float(losses.correspondence_loss(pred, pred, targets, 'foreground')) == pytest.approx(0.8 / 6 / 2)
  assert float(losses.correspondence_loss(pred, pred, targets, 'peak')) == pytest.approx(0.0)
  with pytest.raises(ValueError, match='corr_cells'):
    losses.supervised_cells(soft, 'interior')


def test_negatives_sharing_a_scene_are_left_out():
  # Pairs: 0 = object of scene 7 on background 3; 1 = scene 3 on 9; 2 = scene 7 on 5; 3 = unknown.
  scenes = np.array([[7, 3], [3, 9], [7, 5], [-1, -1]], np.int32)
  index_a = np.array([0, 1, 2, 3, 0, 1], np.int32)
  index_b = np.array([1, 2, 3, 0, 2, 0], np.int32)
  # A0 (7) vs B1 (3, 9): kept. A1 (3) vs B2 (7, 5): kept. A2 (7) vs B3 (unknown): kept.
  # A3 (unknown) vs B0: kept. A0 (7) vs B2 (7, 5): same source scene. A1 (3) vs B0 (7, 3): B0's
  # background is A1's scene.
  weights = np.asarray(losses.distinct_scene_weights(scenes, index_a, index_b))
  np.testing.assert_array_equal(weights, [1, 1, 1, 1, 0, 0])

  # A left-out negative changes nothing: the loss equals the loss without it.
  rng = np.random.default_rng(0)
  pos = rng.uniform(0.05, 0.95, (2, 2, 3, 3)).astype(np.float32)
  targets = losses.PositiveTargets(np.ones((2, 2, 3), np.float32), np.ones((2, 2, 3), np.float32),
                                   np.full((2, 2, 3, 2), 0.5, np.float32),
                                   np.full((2, 2, 3, 2), 0.5, np.float32))
  neg = rng.uniform(0.05, 0.95, (3, 2, 3, 3)).astype(np.float32)
  kept = losses.segswap_loss(pos, pos, targets, neg[:2], neg[:2])
  weighted = losses.segswap_loss(pos, pos, targets, neg, neg, neg_weights=np.array([1.0, 1.0, 0.0]))
  for key in ('loss', 'loss_mask', 'acc_neg'):
    assert float(weighted[key]) == pytest.approx(float(kept[key]), rel=1e-6)
  assert float(weighted['neg_kept']) == pytest.approx(2 / 3)
