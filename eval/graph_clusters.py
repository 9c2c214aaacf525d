"""Clustering a sparse affinity into several groups, for the `patterns` discovery method.

Pure graph functions on scipy.sparse matrices and integer cell supports, O(nnz) per step where it
matters: prefix sums along an ordering, Fiedler sweep cuts by conductance, recursive bisection, and
merging of pieces that lie together in the images (`eval.discovery.discover_patterns` uses them).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg

# Fiedler vectors for pattern splitting: loose tolerance, bounded work.
FIEDLER_TOL = 1e-3
FIEDLER_MAXITER = 3000


def within_prefix(matrix: scipy.sparse.coo_matrix, order: np.ndarray) -> np.ndarray:
  """`(N,)` sum of the entries (a, b) with both a and b among the first k nodes of `order`, k = 1..N.

  An entry counts for every prefix longer than max(rank a, rank b): one bincount over that max and a
  cumulative sum give all N sums in O(nnz + N).
  """
  n = matrix.shape[0]
  rank = np.empty(n, np.int64)
  rank[order] = np.arange(n)
  last = np.maximum(rank[matrix.row], rank[matrix.col])
  return np.cumsum(np.bincount(last, weights=matrix.data.astype(np.float64), minlength=n))


def fiedler_cut(matrix: scipy.sparse.csr_matrix):
  """Best conductance sweep cut along the Fiedler vector of a connected piece (Shi-Malik / Cheeger).

  The second eigenvector v2 of D^-1/2 A D^-1/2 (ARPACK, v0 = ones; a sweep cut needs only a rough v2,
  hence the loose tolerance), nodes sorted by D^-1/2 v2; for every prefix S the conductance
  cut(S) / min(vol(S), vol(rest)) in O(nnz) via `within_prefix`.

  Returns:
    (bool `(N,)` side of each node, conductance of that cut).
  """
  n = matrix.shape[0]
  degree = np.asarray(matrix.sum(axis=1), np.float64).ravel()
  scale = 1.0 / np.sqrt(degree)
  normalized = scipy.sparse.diags(scale) @ matrix.astype(np.float64) @ scipy.sparse.diags(scale)
  try:
    _, vectors = scipy.sparse.linalg.eigsh(normalized, k=2, which='LA', v0=np.ones(n), tol=FIEDLER_TOL,
                                           maxiter=FIEDLER_MAXITER)
  except scipy.sparse.linalg.ArpackNoConvergence:
    return np.ones(n, bool), np.inf  # no reliable cut: keep the piece whole
  order = np.argsort(vectors[:, 0] * scale, kind='stable')  # eigsh sorts ascending: column 0 is v2
  volume = np.cumsum(degree[order])
  within = within_prefix(matrix.tocoo(), order)
  cut = volume - within
  smaller = np.minimum(volume, volume[-1] - volume)
  conductance = np.full(n, np.inf)
  conductance[:-1] = cut[:-1] / np.maximum(smaller[:-1], 1e-300)
  best = int(np.argmin(conductance))
  side = np.zeros(n, bool)
  side[order[:best + 1]] = True
  return side, float(conductance[best])


def _connected_pieces(matrix: scipy.sparse.csr_matrix, members: np.ndarray, min_nodes: int):
  """Connected components (of at least `min_nodes` nodes) of the subgraph induced by `members`."""
  sub = matrix[members][:, members]
  count, labels = scipy.sparse.csgraph.connected_components(sub, directed=False)
  sizes = np.bincount(labels, minlength=count)
  order = np.argsort(labels, kind='stable')
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  return [members[order[bounds[c]:bounds[c + 1]]] for c in np.flatnonzero(sizes >= min_nodes)]


def split_patterns(matrix: scipy.sparse.csr_matrix, max_conductance: float = 0.05, min_nodes: int = 4):
  """Node groups of a sparse affinity: connected components, split by recursive spectral bisection.

  A piece is split along its best Fiedler sweep cut while that cut's conductance (the fraction of the
  smaller side's affinity that crosses it) is below `max_conductance`; each side continues as its own
  connected pieces. Pieces (and sides) smaller than `min_nodes` are dropped, isolated nodes with them.

  Returns:
    list of int64 node-index arrays.
  """
  matrix = matrix.tocsr()
  pending = _connected_pieces(matrix, np.arange(matrix.shape[0]), min_nodes)
  groups = []
  while pending:
    members = pending.pop()
    if len(members) < 2 * min_nodes:
      groups.append(members)
      continue
    side, conductance = fiedler_cut(matrix[members][:, members])
    if conductance < max_conductance and min(side.sum(), (~side).sum()) >= min_nodes:
      pending += (_connected_pieces(matrix, members[side], min_nodes) +
                  _connected_pieces(matrix, members[~side], min_nodes))
    else:
      groups.append(members)
  return groups


def _cooccurrence(place: np.ndarray, group: np.ndarray, image: np.ndarray, num_groups: int, bound: int):
  """For rows sorted by `place` (one row per distinct (place, group)): how often two groups share a place.

  Returns:
    (g1, g2, image, count) arrays, g1 < g2, one entry per (g1, g2, image) with a shared place.
  """
  partners = np.searchsorted(place, place, side='right') - np.arange(len(place)) - 1
  first = np.repeat(np.arange(len(place)), partners)
  second = first + 1 + (np.arange(partners.sum()) - np.repeat(np.cumsum(partners) - partners, partners))
  low, high = np.minimum(group[first], group[second]), np.maximum(group[first], group[second])
  keys, counts = np.unique((low * num_groups + high) * bound + image[first], return_counts=True)
  pair, img = np.divmod(keys, bound)
  g1, g2 = np.divmod(pair, num_groups)
  return g1, g2, img, counts


def pattern_support(maps: np.ndarray, fraction: float = 0.3) -> np.ndarray:
  """`(num_images, h, w)` pattern maps -> `(M, 3)` (image, row, col) of the cells above `fraction` x the
  image's maximum (where the pattern really is, without its stray correspondences)."""
  peak = maps.reshape(len(maps), -1).max(axis=1)
  return np.argwhere((maps > fraction * peak[:, None, None]) & (peak[:, None, None] > 0))


def merge_groups(supports: Sequence[np.ndarray], grid, min_iou: float = 0.3, min_near_images: int = 3,
                 near_fraction: float = 0.8) -> List[np.ndarray]:
  """Which groups are pieces of one pattern, judged by where they lie in the images they share.

  Spectral cuts can cut one pattern into pieces: along a chain of images (each similar to the next),
  where the pieces cover the same cells in the images where they meet, or across space when sigma is
  small, where the pieces sit side by side in every image. Two groups merge when, in some image, the
  IoU of their supports is at least `min_iou`, or when their supports come within two cells of each
  other in at least `min_near_images` images and in at least `near_fraction` of the images both appear
  in (distinct patterns that happen to lie side by side in an image or two stay apart). Vectorised over
  (image, cell, group) triples; merges are unions (connected components over groups).

  Args:
    supports: per group, `(M, 3)` int (image, row, col) of its cells (`pattern_support`).
  Returns:
    lists of group indices, one per merged pattern.
  """
  n = len(supports)
  if n < 2:
    return [np.arange(n)]
  h, w = grid
  group = np.concatenate([np.full(len(t), k) for k, t in enumerate(supports)])
  image, rows, cols = np.concatenate(supports).T if len(group) else (np.zeros(0, int),) * 3
  bound = int(image.max()) + 1 if len(image) else 1

  def distinct(img, row, col, grp):
    """Distinct (image, cell, group) rows sorted by place = (image, cell)."""
    t = np.unique(np.stack([img, row * w + col, grp], axis=1), axis=0)
    return t[:, 0] * (h * w) + t[:, 1], t[:, 2], t[:, 0]

  place, grp, img = distinct(image, rows, cols, group)
  size_keys, sizes = np.unique(grp * bound + img, return_counts=True)  # cells per (group, image)
  g1, g2, im, shared = _cooccurrence(place, grp, img, n, bound)
  size_1 = sizes[np.searchsorted(size_keys, g1 * bound + im)]
  size_2 = sizes[np.searchsorted(size_keys, g2 * bound + im)]
  overlapping = shared >= min_iou * (size_1 + size_2 - shared)
  merges = [g1[overlapping] * n + g2[overlapping]]
  # Nearness: supports grown by one cell (8-neighbourhood) meet, i.e. within two cells.
  dy, dx = np.mgrid[-1:2, -1:2]
  grown_rows = np.clip(rows[:, None] + dy.reshape(1, -1), 0, h - 1).reshape(-1)
  grown_cols = np.clip(cols[:, None] + dx.reshape(1, -1), 0, w - 1).reshape(-1)
  place, grp, img = distinct(np.repeat(image, 9), grown_rows, grown_cols, np.repeat(group, 9))
  n1, n2, _, _ = _cooccurrence(place, grp, img, n, bound)
  near_keys, near_images = np.unique(n1 * n + n2, return_counts=True)
  # Images where both groups appear: (image, group) rows, sorted by image.
  present_image, present_group = size_keys % bound, size_keys // bound
  order = np.lexsort((present_group, present_image))
  b1, b2, _, _ = _cooccurrence(present_image[order], present_group[order], present_image[order], n, bound)
  both_keys, both_images = np.unique(b1 * n + b2, return_counts=True)
  common = both_images[np.searchsorted(both_keys, near_keys)] if len(near_keys) else near_keys
  near = (near_images >= min_near_images) & (near_images >= near_fraction * common)
  merges.append(near_keys[near])
  merges = np.concatenate(merges)
  link = scipy.sparse.coo_matrix((np.ones(len(merges)), np.divmod(merges, n)), shape=(n, n))
  count, labels = scipy.sparse.csgraph.connected_components(link, directed=False)
  return [np.flatnonzero(labels == c) for c in range(count)]
