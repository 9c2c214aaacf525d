"""Rankings and their metrics for place recognition: baseline rankings, re-ranking, spatial NMS, Recall@N.

Host-side numpy only (the jitted candidate scoring lives in the inference engine, `segswap_jax.inference`).

Conventions:
  * A ranking is an int32 matrix `(num_queries, depth)` of database indices, best first; -1 pads rows
    that have fewer than `depth` entries (e.g. after spatial NMS of a short list).
  * Positions are UTM (easting, northing) in metres, `(n, 2)`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Sequence

import numpy as np

from segswap_jax.errors import DataError

RECALL_NS = (1, 5, 10, 100)


def load_npy(path: str, what: str, mmap: bool = False) -> np.ndarray:
  """np.load with a one-line DataError naming the file when it is missing or unreadable."""
  if not os.path.isfile(path):
    raise DataError(f'{what}: file not found: {path}')
  try:
    return np.load(path, mmap_mode='r' if mmap else None, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise DataError(f'{what}: cannot read {path} as a .npy array ({e})') from None


def baseline_ranking(baseline: np.ndarray, num_db: int, depth: int, source: str = 'baseline',
                     chunk_rows: int = 256) -> np.ndarray:
  """Turns the baseline file into a ranking `(num_queries, depth')`, depth' = min(depth, available).

  Two layouts are accepted, told apart by dtype and shape:
    * a score matrix `(num_queries, num_db)`, floating point, higher is better (the reference's
      `top100_patchVlad.npy`); ranked by descending score, ties by lower index (stable sort; the
      reference's numpy quicksort leaves tie order unspecified);
    * an index matrix `(num_queries, K)` of integer database indices in rank order (Patch-NetVLAD's
      predictions). An integer matrix with `num_db` columns is read as indices when every row is a
      set of distinct valid indices, else as integer scores.

  Args:
    baseline: the loaded array (may be a read-only memmap; read in row chunks).
    num_db: number of database images (length of the database list).
    depth: how many leading entries of each row to keep.
    source: file name for error messages.
    chunk_rows: rows sorted at a time (bounds memory for large score matrices).
  """
  if baseline.ndim != 2:
    raise DataError(f'{source}: expected a 2-D query x database score matrix or query x K index '
                    f'matrix, got shape {baseline.shape}')
  num_cols = baseline.shape[1]
  is_int = np.issubdtype(baseline.dtype, np.integer)
  if not (is_int or np.issubdtype(baseline.dtype, np.floating)):
    raise DataError(f'{source}: unsupported dtype {baseline.dtype}')
  if is_int and _is_index_matrix(baseline, num_db):
    return np.ascontiguousarray(baseline[:, :min(depth, num_cols)], dtype=np.int32)
  if is_int and num_cols != num_db:
    raise DataError(f'{source}: integer matrix {baseline.shape} is neither a score matrix over the '
                    f'{num_db} database images nor a matrix of distinct indices in [0, {num_db})')
  if num_cols != num_db:
    raise DataError(f'{source}: score matrix has {num_cols} columns but the database list has {num_db} '
                    'images')
  depth = min(depth, num_db)
  out = np.empty((baseline.shape[0], depth), np.int32)
  for start in range(0, baseline.shape[0], chunk_rows):
    block = -np.asarray(baseline[start:start + chunk_rows], dtype=np.float64)
    if np.isnan(block).any():
      raise DataError(f'{source}: NaN scores in rows {start}..{start + len(block) - 1}')
    out[start:start + len(block)] = np.argsort(block, axis=1, kind='stable')[:, :depth]
  return out


def _is_index_matrix(matrix: np.ndarray, num_db: int) -> bool:
  values = np.asarray(matrix)
  if values.size == 0 or values.min() < 0 or values.max() >= num_db:
    return False
  ordered = np.sort(values, axis=1)
  return not (ordered[:, 1:] == ordered[:, :-1]).any()


def rerank(ranking: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Re-sorts the first `K = scores.shape[1]` entries of each row by descending score.

  Entries past K keep the baseline order (docs/reference.md §4 step 5: a pure re-sort, no score fusion). Ties keep
  the baseline order (stable sort).

  Args:
    ranking: `(Q, depth)` int, depth >= K.
    scores: `(Q, K)` re-ranking scores of `ranking[:, :K]`.
  """
  k = scores.shape[1]
  if ranking.shape[0] != scores.shape[0] or ranking.shape[1] < k:
    raise ValueError(f'rerank: ranking {ranking.shape} vs scores {scores.shape}')
  order = np.argsort(-scores, axis=1, kind='stable')
  out = ranking.copy()
  out[:, :k] = np.take_along_axis(ranking[:, :k], order, axis=1)
  return out


def spatial_nms(ranking: np.ndarray, group_size: int = 12) -> np.ndarray:
  """Keeps the first database index of each place group (index // group_size) per row, in rank order.

  The Tokyo 24/7 convention (NetVLAD `nnSearchPostprocess`, the reference's `spatial_nms`): 12
  consecutive database cut-outs form one panorama. O(depth log depth) per row (one stable sort), not
  the reference's quadratic scan. Rows are padded with -1 to the longest row.

  Args:
    ranking: `(Q, depth)` int, -1 entries are ignored.
    group_size: database images per place.

  Returns:
    `(Q, depth')` int32 ranking of distinct places' first images.
  """
  ranking = np.asarray(ranking)
  num_q, depth = ranking.shape
  groups = np.where(ranking >= 0, ranking // group_size, -1)
  order = np.argsort(groups, axis=1, kind='stable')  # within a group, rank order is kept
  sorted_groups = np.take_along_axis(groups, order, axis=1)
  first = np.ones_like(sorted_groups, dtype=bool)
  first[:, 1:] = sorted_groups[:, 1:] != sorted_groups[:, :-1]
  first &= sorted_groups >= 0
  keep = np.zeros_like(first)
  np.put_along_axis(keep, order, first, axis=1)  # back to rank positions
  counts = keep.sum(axis=1)
  width = int(counts.max()) if num_q else 0
  out = np.full((num_q, width), -1, np.int32)
  # Stable compaction: the kept positions, in rank order, moved to the front of each row.
  rows, cols = np.nonzero(keep)
  slot = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
  out[rows, slot] = ranking[rows, cols]
  return out


def recall_at_n(ranking: np.ndarray, qry_utm: np.ndarray, db_utm: np.ndarray,
                ns: Sequence[int] = RECALL_NS, threshold: float = 25.0) -> Dict[int, float]:
  """Fraction of queries with a database image within `threshold` metres among their first N.

  Args:
    ranking: `(Q, depth)` int database indices, -1 = no entry.
    qry_utm: `(Q, 2)`; db_utm: `(num_db, 2)`.
    ns: the N of Recall@N (N past the ranking's depth count what is there).
    threshold: distance in metres; a candidate at exactly the threshold counts (the reference's `<=`).
  """
  ranking = np.asarray(ranking)
  if ranking.shape[0] != len(qry_utm):
    raise ValueError(f'recall_at_n: {ranking.shape[0]} ranked rows for {len(qry_utm)} queries')
  n_max = min(max(ns), ranking.shape[1])
  top = ranking[:, :n_max]
  dist = np.linalg.norm(np.asarray(db_utm, np.float64)[np.maximum(top, 0)]
                        - np.asarray(qry_utm, np.float64)[:, None], axis=-1)
  hit = (dist <= threshold) & (top >= 0)
  first_hit = np.where(hit.any(axis=1), hit.argmax(axis=1), np.iinfo(np.int64).max)
  return {int(n): float(np.mean(first_hit < n)) for n in ns}


def recall_table(recalls: Dict[str, Dict[int, float]]) -> str:
  """Markdown table: one row per ranking variant, one column per N (percent)."""
  ns = sorted(next(iter(recalls.values())))
  lines = ['| ranking | ' + ' | '.join(f'R@{n}' for n in ns) + ' |',
           '|---|' + '---:|' * len(ns)]
  for name, values in recalls.items():
    lines.append(f'| {name} | ' + ' | '.join(f'{100 * values[n]:.1f}' for n in ns) + ' |')
  return '\n'.join(lines)


def write_json(path: str, payload) -> None:
  """Writes JSON atomically (temp file + rename), creating the parent folder."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(payload, f, indent=1)
  os.replace(tmp, path)
