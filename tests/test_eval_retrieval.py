"""eval.retrieval: baseline parsing, re-ranking, spatial NMS and Recall@N on hand-worked toy cases."""
import numpy as np
import pytest

from eval import retrieval
from segswap_jax import errors


def _reference_nms(rank_idx, group=12):
  """The reference's quadratic NMS (keep the first index of each index // 12), as the oracle."""
  out = []
  for row in rank_idx:
    seen, kept = set(), []
    for idx in row:
      if idx // group not in seen:
        seen.add(idx // group)
        kept.append(idx)
    out.append(kept)
  return out


def test_spatial_nms_matches_quadratic_reference():
  rng = np.random.default_rng(0)
  ranking = np.stack([rng.permutation(120) for _ in range(5)]).astype(np.int32)
  got = retrieval.spatial_nms(ranking, 12)
  assert got.shape == (5, 10)  # a full permutation of 120 = 10 places per row
  for row, expected in zip(got, _reference_nms(ranking)):
    np.testing.assert_array_equal(row, expected)


def test_spatial_nms_hand_case_and_padding():
  ranking = np.array([[25, 13, 24, 0, 14, 5],
                      [1, 2, 3, -1, -1, -1]], np.int32)
  # Row 0: groups 2, 1, 2, 0, 1, 0 -> keep 25, 13, 0. Row 1: all group 0 -> keep 1.
  np.testing.assert_array_equal(retrieval.spatial_nms(ranking, 12), [[25, 13, 0], [1, -1, -1]])


def test_recall_hand_computed():
  db_utm = np.array([[0, 0], [100, 0], [0, 25], [0, 26], [500, 500]], float)
  qry_utm = np.array([[0, 0], [100, 0], [1000, 0]], float)
  ranking = np.array([[1, 4, 3, 2],   # first hit (db 2, exactly 25 m) at rank 4
                      [1, 0, 2, 3],   # hit at rank 1
                      [0, 1, 2, 3]])  # never
  rec = retrieval.recall_at_n(ranking, qry_utm, db_utm, ns=(1, 3, 4, 100))
  assert rec == {1: pytest.approx(1 / 3), 3: pytest.approx(1 / 3), 4: pytest.approx(2 / 3),
                 100: pytest.approx(2 / 3)}


def test_recall_ignores_padding():
  db_utm = np.zeros((3, 2))
  ranking = np.array([[-1, 2], [-1, -1]])
  assert retrieval.recall_at_n(ranking, np.zeros((2, 2)), db_utm, ns=(1, 2)) == {1: 0.0, 2: 0.5}


def test_rerank_resorts_only_topk():
  ranking = np.array([[7, 3, 5, 1, 0]])
  scores = np.array([[0.1, 0.9, 0.5]])
  np.testing.assert_array_equal(retrieval.rerank(ranking, scores), [[3, 5, 7, 1, 0]])
  # Ties keep the baseline order.
  np.testing.assert_array_equal(retrieval.rerank(ranking, np.zeros((1, 3))), ranking)


def test_baseline_score_matrix_and_index_matrix():
  scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]], np.float32)
  np.testing.assert_array_equal(retrieval.baseline_ranking(scores, 4, 3), [[1, 3, 2], [0, 1, 2]])
  indices = np.array([[3, 0], [1, 2]], np.int64)
  np.testing.assert_array_equal(retrieval.baseline_ranking(indices, 4, 100), indices)
  # Integer full-width rows with repeats are integer scores, not indices.
  int_scores = np.array([[0, 5, 5, 1]])
  np.testing.assert_array_equal(retrieval.baseline_ranking(int_scores, 4, 2), [[1, 2]])


def test_baseline_size_mismatch_names_the_file():
  with pytest.raises(errors.DataError, match=r'top100\.npy: score matrix has 3 columns but .* 5'):
    retrieval.baseline_ranking(np.zeros((2, 3), np.float32), 5, 2, source='top100.npy')
  with pytest.raises(errors.DataError, match='top100.npy'):
    retrieval.baseline_ranking(np.array([[9, 1]]), 5, 2, source='top100.npy')


def test_recall_table_and_json(tmp_path):
  table = retrieval.recall_table({'baseline': {1: 0.5, 5: 1.0}, 're-ranked': {1: 0.75, 5: 1.0}})
  assert '| re-ranked | 75.0 | 100.0 |' in table
  path = tmp_path / 'sub' / 'r.json'
  retrieval.write_json(str(path), {'a': [1, 2]})
  assert path.read_text().replace('\n', '').replace(' ', '') == '{"a":[1,2]}'
