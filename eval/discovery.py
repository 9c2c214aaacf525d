"""Discovery: from the model's outputs on the pairs of a collection to repeated patterns (docs/reference.md §7).

Host-side numpy + scipy.sparse; the node x node affinity is only ever held sparse. Two methods:

* `reference` (docs/reference.md §7 "Graph"), reproduced rule for rule: top-5 partners per image,
  confident nodes (mask > 0.85) from the side with more of them, de-duplicated; 3-cycle affinities
  (2-cycle optional, off as in the official runs) with k(d) = exp(-d / sigma); entries <= 0.01 dropped;
  leading eigenvector (`eigsh(k=1, v0=ones)`) with the reference's sign rule; per-image 30x30 maps in
  the 'sum' mode (a repeated cell within one pair keeps the last value); then `soft_to_binary` (bilinear
  upsample, 0.6 * max, GrabCut).
* `patterns` (ours): several patterns per collection. The same graph is cut into groups
  (`eval.graph_clusters`: connected components, split recursively along the best conductance sweep
  cut of the Fiedler vector while that cut is weak, pieces lying together in the images merged back);
  each group's node values are its own leading eigenvector (the reference's weighting). Per-image maps
  are built from each pattern's nodes alone, with positive values only, so one pattern's map is never
  cancelled by another's.

Shapes: pair outputs `(K, h, w, 3)` = (x, y, mask) as the model returns them (x, y in [0, 1] of the other
image); cells are integer (column, row) = (x, y) of an h x w grid; node cells `(N, 4)` = (x1, y1, x2, y2)
with (x1, y1) in the pair's first image i and (x2, y2) in its second image j (i < j).
"""
from __future__ import annotations

import dataclasses
from typing import List

import cv2
import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from eval import graph_clusters
from segswap_jax import geometry
from segswap_jax.errors import DataError

# Reference defaults (docs/reference.md §7 "Graph").
TOP_K = 5
CONF_THRESHOLD = 0.85
MIN_WEIGHT = 0.01
FG_THRESHOLD = 0.6
DILATE = 10
GRABCUT_ITERATIONS = 5
SPACE_LOG = 1.1
# A pair is kept when its best directed score exceeds 1% of the cells (9 at 30 x 30).
KEEP_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class PairSet:
  """Model outputs on the kept pairs of a collection (the reference's stored pair files).

  Attributes:
    num_images: images in the collection.
    pairs: `(K, 2)` int64 image indices (i, j), i < j, sorted (the reference's pair-id order).
    out_a: `(K, h, w, 3)` float32 outputs on image i: (x, y) of the match in j, mask.
    out_b: `(K, h, w, 3)` float32 outputs on image j, pointing into i.
    scores: `(K, 2)` float64 directed scores (s_ij, s_ji).
  Every stored pair counts as *kept* (its best score passed the keep threshold).
  """
  num_images: int
  pairs: np.ndarray
  out_a: np.ndarray
  out_b: np.ndarray
  scores: np.ndarray

  @property
  def grid(self):
    """(h, w) of the output maps."""
    return tuple(self.out_a.shape[1:3])


def make_pair_set(num_images: int, pairs, out_a, out_b, scores) -> PairSet:
  """Validates and sorts pair results into a `PairSet` (pairs given as (i, j) with i != j in any order)."""
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  out_a = np.asarray(out_a, np.float32)
  out_b = np.asarray(out_b, np.float32)
  scores = np.asarray(scores, np.float64).reshape(-1, 2)
  k = len(pairs)
  if out_a.shape[:1] != (k,) or out_b.shape[:1] != (k,) or len(scores) != k:
    raise DataError(f'pair results disagree in length: pairs {pairs.shape}, out_a {out_a.shape}, '
                         f'out_b {out_b.shape}, scores {scores.shape}')
  if k and (out_a.ndim != 4 or out_a.shape[-1] != 3 or out_a.shape != out_b.shape):
    raise DataError(f'outputs must be (K, h, w, 3) on both sides, got {out_a.shape} and {out_b.shape}')
  if k and (pairs.min() < 0 or pairs.max() >= num_images or np.any(pairs[:, 0] == pairs[:, 1])):
    raise DataError(f'pair indices must be distinct images in [0, {num_images})')
  # Orient every pair as i < j, swapping its sides and scores where needed.
  swap = pairs[:, 0] > pairs[:, 1]
  pairs = np.where(swap[:, None], pairs[:, ::-1], pairs)
  out_a, out_b = (np.where(swap[:, None, None, None], out_b, out_a),
                  np.where(swap[:, None, None, None], out_a, out_b))
  scores = np.where(swap[:, None], scores[:, ::-1], scores)
  order = np.lexsort((pairs[:, 1], pairs[:, 0]))
  pairs = pairs[order]
  if k > 1 and np.any(np.all(pairs[1:] == pairs[:-1], axis=1)):
    raise DataError('a pair of images appears twice in the pair results')
  return PairSet(int(num_images), pairs, out_a[order], out_b[order], scores[order])


def keep_threshold(grid) -> float:
  """Score a pair must exceed to be kept: 1% of the cells of one image (9 at 30 x 30)."""
  return KEEP_FRACTION * grid[0] * grid[1]


# ----------------------------------------------------------------------------------------------------
# Top partners and nodes.
# ----------------------------------------------------------------------------------------------------

def used_pairs(pair_set: PairSet, top_k: int = TOP_K) -> np.ndarray:
  """Pairs among the top-k partners of either of their images, by directed score.

  Per image i its `top_k` partners j by S[i, j] (= s_ij). The reference sorts the whole dense row, zeros
  included, with an unstable sort; here only positive scores compete and ties go to the lower index, so
  the choice is deterministic (it differs only where the reference's is arbitrary).

  Returns:
    bool `(K,)`.
  """
  k = len(pair_set.pairs)
  if k == 0:
    return np.zeros(0, bool)
  rows = np.concatenate([pair_set.pairs[:, 0], pair_set.pairs[:, 1]])
  cols = np.concatenate([pair_set.pairs[:, 1], pair_set.pairs[:, 0]])
  score = np.concatenate([pair_set.scores[:, 0], pair_set.scores[:, 1]])
  pair_id = np.concatenate([np.arange(k), np.arange(k)])
  order = np.lexsort((cols, -score, rows))
  rows, score, pair_id = rows[order], score[order], pair_id[order]
  first_of_row = np.searchsorted(rows, rows, side='left')
  rank = np.arange(len(rows)) - first_of_row
  chosen = (rank < top_k) & (score > 0)
  used = np.zeros(k, bool)
  used[pair_id[chosen]] = True
  return used


@dataclasses.dataclass(frozen=True)
class Nodes:
  """Graph nodes: confident correspondences of the used pairs.

  Attributes:
    cells: `(N, 4)` int64 (x1, y1, x2, y2): the node's cell in image i and in image j of its pair.
    conf: `(N,)` float32 mask value of the confident cell.
    blocks: `(P, 4)` int64 rows (i, j, start, end): the nodes of one pair are the contiguous block
      start:end (the reference's `img_idx_start_end`), pairs in pair-id order.
    block_pair: `(P,)` int64 index of each block's pair in the `PairSet`.
    grid: (h, w).
  """
  cells: np.ndarray
  conf: np.ndarray
  blocks: np.ndarray
  block_pair: np.ndarray
  grid: tuple

  def __len__(self):
    return len(self.conf)

  def node_block(self) -> np.ndarray:
    """`(N,)` block index of every node."""
    return np.repeat(np.arange(len(self.blocks)), self.blocks[:, 3] - self.blocks[:, 2])

  def node_images(self) -> np.ndarray:
    """`(N, 2)` image indices (i, j) of every node's pair."""
    return self.blocks[self.node_block(), :2]


def rounded_targets(outputs: np.ndarray, h: int, w: int) -> np.ndarray:
  """`(..., 3)` (or `(..., 2)`) outputs -> `(..., 2)` int64 target cells (col, row) in the other image.

  Rounded as the reference (half to even, `geometry.target_cells`) on the other image's h x w grid and
  clipped into it (model outputs never leave [0, 1], hand-made ones might).
  """
  cells = geometry.target_cells(np.asarray(outputs[..., :2], np.float64), h, w).astype(np.int64)
  return np.clip(cells, 0, np.array([w - 1, h - 1]))


def extract_nodes(pair_set: PairSet, used: np.ndarray, conf_threshold: float = CONF_THRESHOLD) -> Nodes:
  """Confident nodes of the used pairs (docs/reference.md §7 "Graph" step 2).

  Per used pair, the side with more cells whose mask exceeds `conf_threshold` (ties: side j) gives the
  nodes: its confident cells with their rounded predicted cell in the other image; a pair with no
  confident cell on either side gives none. Nodes of a pair are in row-major order of their source
  cells. (The reference de-duplicates nodes on (x1, y1, x2, y2) with a dict; since the source cell is
  part of that key and every source cell yields one node, no two nodes of a pair ever share it, so the
  de-duplication never merges anything and is not repeated here.)
  """
  h, w = pair_set.grid
  empty = Nodes(np.zeros((0, 4), np.int64), np.zeros(0, np.float32), np.zeros((0, 4), np.int64),
                np.zeros(0, np.int64), (h, w))
  ids = np.flatnonzero(used)
  if len(ids) == 0:
    return empty
  conf_a = pair_set.out_a[ids, ..., 2] > conf_threshold
  conf_b = pair_set.out_b[ids, ..., 2] > conf_threshold
  count_a = conf_a.sum(axis=(1, 2))
  count_b = conf_b.sum(axis=(1, 2))
  valid = (count_a > 0) & (count_b > 0)
  from_a = valid & (count_a > count_b)
  from_b = valid & ~from_a
  parts = []
  for side_mask, confident, outputs, source_is_i in ((from_a, conf_a, pair_set.out_a, True),
                                                     (from_b, conf_b, pair_set.out_b, False)):
    local, rows, cols = np.nonzero(confident & side_mask[:, None, None])
    pair = ids[local]
    target = rounded_targets(outputs[pair, rows, cols], h, w)
    source = np.stack([cols, rows], axis=-1)
    cells = np.concatenate([source, target] if source_is_i else [target, source], axis=1)
    parts.append((pair, rows * w + cols, cells, outputs[pair, rows, cols, 2]))
  pair = np.concatenate([p[0] for p in parts])
  source_cell = np.concatenate([p[1] for p in parts])
  cells = np.concatenate([p[2] for p in parts]).astype(np.int64)
  conf = np.concatenate([p[3] for p in parts]).astype(np.float32)
  if len(pair) == 0:
    return empty
  # Pair-id order, row-major over the source cells within a pair.
  order = np.lexsort((source_cell, pair))
  pair, cells, conf = pair[order], cells[order], conf[order]
  block_pair, start, counts = np.unique(pair, return_index=True, return_counts=True)
  blocks = np.stack([pair_set.pairs[block_pair, 0], pair_set.pairs[block_pair, 1], start, start + counts],
                    axis=1).astype(np.int64)
  return Nodes(cells, conf, blocks, block_pair.astype(np.int64), (h, w))


# ----------------------------------------------------------------------------------------------------
# Affinity.
# ----------------------------------------------------------------------------------------------------

KERNEL_DTYPES = ('float32', 'float64')


def _kernel_table(sigma: float, grid, dtype: str = 'float64') -> np.ndarray:
  """k(d) = exp(-d / sigma) for every squared cell distance d^2 of the grid: index by dx^2 + dy^2.

  Cells are integers, so the kernel of a distance is one table look-up. 'float32' computes it as the
  reference does (the reference method uses it); 'float64' is ours.
  """
  h, w = grid
  squared = np.arange((h - 1) ** 2 + (w - 1) ** 2 + 1)
  if dtype == 'float32':
    return np.exp(-np.sqrt(squared.astype(np.float32)) / np.float32(sigma)).astype(np.float32)
  return np.exp(-np.sqrt(squared.astype(np.float64)) / sigma)


def _squared_distances(cells_1: np.ndarray, cells_2: np.ndarray) -> np.ndarray:
  """`(n1, 2)`, `(n2, 2)` int cells -> `(n1, n2)` squared distances."""
  dx = cells_1[:, None, 0] - cells_2[None, :, 0]
  dy = cells_1[:, None, 1] - cells_2[None, :, 1]
  return dx * dx + dy * dy


def _two_cycle_entries(nodes: Nodes, sigma: float, min_weight: float):
  """Within-pair edges: exp(-(d_i + d_j) / 2 / sigma) * conf_a * conf_b, diagonal included."""
  root = np.sqrt(np.arange((nodes.grid[0] - 1) ** 2 + (nodes.grid[1] - 1) ** 2 + 1, dtype=np.float64))
  cells = nodes.cells.astype(np.int32)
  out = []
  for _, _, start, end in nodes.blocks:
    c = cells[start:end]
    distance = root[_squared_distances(c[:, :2], c[:, :2])] + root[_squared_distances(c[:, 2:], c[:, 2:])]
    weight = np.exp(-distance / 2 / sigma) * nodes.conf[start:end, None] * nodes.conf[None, start:end]
    a, b = np.nonzero(weight > min_weight)
    out.append(((a + start).astype(np.int32), (b + start).astype(np.int32), weight[a, b].astype(np.float32)))
  return out


def three_cycle_blocks(nodes: Nodes, pair_set: PairSet):
  """Pairs of blocks (pairs) that share exactly one image and whose other ends form a kept pair.

  Returns:
    dict of int64 arrays, one entry per such block pair: `block_1`, `block_2` (block_1 < block_2),
    `shared` (the common image u), `other_1` (p, the other end of block_1), `other_2` (q), and `third`
    (index in the PairSet of the kept pair {p, q}).
  """
  blocks = nodes.blocks
  num_blocks = len(blocks)
  # Incidence (image, block), grouped by image; every two blocks of one group share that image.
  image = np.concatenate([blocks[:, 0], blocks[:, 1]])
  block = np.concatenate([np.arange(num_blocks), np.arange(num_blocks)])
  order = np.lexsort((block, image))
  image, block = image[order], block[order]
  group_end = np.searchsorted(image, image, side='right')
  partners = group_end - np.arange(len(image)) - 1  # later entries in the same group
  first = np.repeat(np.arange(len(image)), partners)
  second = first + 1 + (np.arange(partners.sum()) - np.repeat(np.cumsum(partners) - partners, partners))
  block_1, block_2, shared = block[first], block[second], image[first]
  swap = block_1 > block_2
  block_1, block_2 = np.where(swap, block_2, block_1), np.where(swap, block_1, block_2)

  def other_end(b):
    return np.where(blocks[b, 0] == shared, blocks[b, 1], blocks[b, 0])

  other_1, other_2 = other_end(block_1), other_end(block_2)
  # Is {p, q} a kept pair?  Sorted pair keys + searchsorted: no dense image x image table.
  n = pair_set.num_images
  kept_keys = pair_set.pairs[:, 0] * n + pair_set.pairs[:, 1]
  query = np.minimum(other_1, other_2) * n + np.maximum(other_1, other_2)
  position = np.clip(np.searchsorted(kept_keys, query), 0, max(len(kept_keys) - 1, 0))
  found = (kept_keys[position] == query) if len(kept_keys) else np.zeros(len(query), bool)
  result = dict(block_1=block_1, block_2=block_2, shared=shared, other_1=other_1, other_2=other_2,
                third=position)
  result = {k: v[found].astype(np.int64) for k, v in result.items()}
  order = np.lexsort((result['block_2'], result['block_1']))
  return {k: v[order] for k, v in result.items()}


def _three_cycle_entries(nodes: Nodes, pair_set: PairSet, sigma: float, min_weight: float,
                         kernel_dtype: str = 'float64'):
  """3-cycle edges (docs/reference.md §7 "Graph" step 3) between nodes a (of block 1) and b (of block 2).

  w = exp(-|a_u - b_u| / sigma) * 0.5 * [exp(-|T_pq(a_p) - b_q| / sigma) + exp(-|a_p - T_qp(b_q)| / sigma)]
      * conf_a * conf_b, with u the shared image, p and q the other ends and T the rounded predicted
  cells of the kept pair {p, q} (read regardless of its mask). The per-node cells of every block pair
  are gathered at once; each block pair is then one dense n1 x n2 block of integer distances and
  kernel look-ups, thresholded before anything is kept.
  """
  triples = three_cycle_blocks(nodes, pair_set)
  if len(triples['block_1']) == 0:
    return []
  table = _kernel_table(sigma, nodes.grid, kernel_dtype).astype(np.float64)
  targets_a = rounded_targets(pair_set.out_a, *nodes.grid).astype(np.int32)  # cells of i -> cells in j
  targets_b = rounded_targets(pair_set.out_b, *nodes.grid).astype(np.int32)
  cells = nodes.cells.astype(np.int32)
  blocks = nodes.blocks
  sizes = blocks[:, 3] - blocks[:, 2]

  def block_side(which):
    """Per (block pair, node of its block `which`): node, cell in u, cell in the other end, mapped cell."""
    b = triples[f'block_{which}']
    other = triples[f'other_{which}']
    other_partner = triples[f'other_{3 - which}']
    count = sizes[b]
    item = np.repeat(np.arange(len(b)), count)
    node = blocks[b, 2][item] + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    u_is_i = (blocks[b, 0][item] == triples['shared'][item])[:, None]
    cell_u = np.where(u_is_i, cells[node, :2], cells[node, 2:])
    cell_other = np.where(u_is_i, cells[node, 2:], cells[node, :2])
    # The kept pair {p, q} stores p's maps in out_a when p < q.
    third = triples['third'][item]
    forward = (other[item] < other_partner[item])[:, None]
    mapped = np.where(forward, targets_a[third, cell_other[:, 1], cell_other[:, 0]],
                      targets_b[third, cell_other[:, 1], cell_other[:, 0]])
    return node, cell_u, cell_other, mapped, np.cumsum(count) - count

  node_1, u_1, other_1, mapped_1, start_1 = block_side(1)
  node_2, u_2, other_2, mapped_2, start_2 = block_side(2)
  n1, n2 = sizes[triples['block_1']], sizes[triples['block_2']]
  conf = nodes.conf.astype(np.float64)
  out = []
  for k in range(len(n1)):
    r = slice(start_1[k], start_1[k] + n1[k])
    c = slice(start_2[k], start_2[k] + n2[k])
    shared = table[_squared_distances(u_1[r], u_2[c])]
    cycle = table[_squared_distances(mapped_1[r], other_2[c])] + table[_squared_distances(other_1[r], mapped_2[c])]
    weight = shared * cycle * (0.5 * conf[node_1[r], None] * conf[None, node_2[c]])
    i, j = np.nonzero(weight > min_weight)
    a, b, value = node_1[r][i].astype(np.int32), node_2[c][j].astype(np.int32), weight[i, j].astype(np.float32)
    out.append((a, b, value))
    out.append((b, a, value))
  return out


def affinity(nodes: Nodes, pair_set: PairSet, sigma: float, two_cycle: bool = False,
             three_cycle: bool = True, min_weight: float = MIN_WEIGHT,
             kernel_dtype: str = 'float64') -> scipy.sparse.csr_matrix:
  """Sparse symmetric node affinity (docs/reference.md §7 "Graph" step 3), float32 CSR `(N, N)`; entries <= min_weight dropped.

  The official runs use `two_cycle=False, three_cycle=True` (`--only3cycle`).
  """
  if sigma <= 0:
    raise DataError(f'sigma must be positive, got {sigma}')
  n = len(nodes)
  parts = []
  if two_cycle:
    parts += _two_cycle_entries(nodes, sigma, min_weight)
  if three_cycle:
    parts += _three_cycle_entries(nodes, pair_set, sigma, min_weight, kernel_dtype)
  if not parts:
    return scipy.sparse.csr_matrix((n, n), dtype=np.float32)
  rows = np.concatenate([p[0] for p in parts])
  cols = np.concatenate([p[1] for p in parts])
  data = np.concatenate([p[2] for p in parts]).astype(np.float32, copy=False)
  return scipy.sparse.csr_matrix((data, (rows, cols)), shape=(n, n))


# ----------------------------------------------------------------------------------------------------
# Spectral step.
# ----------------------------------------------------------------------------------------------------

def prefix_sizes(n: int, space_log: float = SPACE_LOG) -> np.ndarray:
  """The reference's prefix sizes: {round(space_log^c) < n, c >= 0} U {n}, ascending."""
  sizes = set()
  c = 0
  while True:
    size = int(round(space_log ** c))
    if size >= n:
      break
    sizes.add(size)
    c += 1
  return np.array(sorted(sizes) + [n], np.int64)


def prefix_energies(matrix: scipy.sparse.spmatrix, order: np.ndarray) -> np.ndarray:
  """u_k^T A u_k for the L2-normalised indicators u_k of the first k nodes of `order`, k = 1..N."""
  n = matrix.shape[0]
  return graph_clusters.within_prefix(matrix.tocoo(), order) / np.arange(1, n + 1)


def sign_and_energy(matrix: scipy.sparse.spmatrix, vector: np.ndarray, space_log: float = SPACE_LOG):
  """The reference's sign rule for an eigenvector (docs/reference.md §7 "Graph" step 4).

  Nodes sorted by the vector ascending ('negative' end first) and descending ('positive' end first); at
  each reference prefix size the energy of the normalised indicator is computed; the sign whose best
  energy is larger wins. The full set counts once for both, so when it is the best prefix the two tie:
  the reference then keeps whatever sign ARPACK returned (arbitrary; an all-negative Perron vector
  leaves every map empty); here a tie picks the sign with the positive sum, which is deterministic.

  Returns:
    (signed vector, the winning order (its strongest nodes first), the best prefix size of that order,
    its energy).
  """
  n = len(vector)
  ascending = np.argsort(vector, kind='stable')
  descending = ascending[::-1]
  sizes = prefix_sizes(n, space_log)
  energy_pos = prefix_energies(matrix, descending)[sizes - 1]
  energy_neg = prefix_energies(matrix, ascending)[sizes - 1]
  energy_neg[-1] = energy_pos[-1]
  best_pos, best_neg = energy_pos.max(), energy_neg.max()
  if best_pos > best_neg or (best_pos == best_neg and vector.sum() >= 0):
    best = int(np.argmax(energy_pos))
    return vector, descending, int(sizes[best]), float(energy_pos[best])
  best = int(np.argmax(energy_neg))
  return -vector, ascending, int(sizes[best]), float(energy_neg[best])


def leading_eigenvector(matrix: scipy.sparse.spmatrix, space_log: float = SPACE_LOG) -> np.ndarray:
  """Leading eigenvector (largest magnitude) of a symmetric sparse matrix, signed by the reference rule.

  `eigsh(k=1, which='LM', v0=ones)` as the reference; ARPACK needs N >= 2, so a single node gets [1],
  and a matrix without a non-zero affinity (nodes, but no cycle joins any two) has no leading direction:
  zeros, no pattern (ARPACK would stop on a zero Krylov vector).
  """
  n = matrix.shape[0]
  if n == 0:
    return np.zeros(0)
  if n == 1:
    return np.ones(1)
  if not np.any(matrix.data):
    return np.zeros(n)
  _, vectors = scipy.sparse.linalg.eigsh(matrix, k=1, which='LM', v0=np.ones(n))
  return sign_and_energy(matrix, np.real(vectors[:, 0]), space_log)[0]


# ----------------------------------------------------------------------------------------------------
# Per-image maps and masks.
# ----------------------------------------------------------------------------------------------------

def image_maps(nodes: Nodes, values: np.ndarray, num_images: int) -> np.ndarray:
  """Per-image `(num_images, h, w)` maps in the reference's 'sum' mode (docs/reference.md §7 "Graph" steps 5-6).

  Each node adds its value at its cell in both images of its pair. Within one pair a cell hit by several
  nodes gets the value of the last of them (numpy's `a[idx] = a[idx] + v` with repeated indices);
  across pairs values accumulate.
  """
  h, w = nodes.grid
  maps = np.zeros((num_images, h, w), np.float64)
  if len(nodes) == 0:
    return maps.astype(np.float32)
  block = nodes.node_block()
  images = nodes.blocks[block, :2]
  values = np.asarray(values, np.float64)
  for side, cell in ((0, nodes.cells[:, :2]), (1, nodes.cells[:, 2:])):
    key = (block * h + cell[:, 1]) * w + cell[:, 0]
    _, last_rev = np.unique(key[::-1], return_index=True)
    last = len(key) - 1 - last_rev
    np.add.at(maps, (images[last, side], cell[last, 1], cell[last, 0]), values[last])
  return maps.astype(np.float32)


def _fma32(a, b, c) -> np.ndarray:
  """float32 a * b + c rounded once, as a fused multiply-add (float64 holds the float32 product exactly)."""
  return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _interpolation_axis(in_size: int, out_size: int):
  """PyTorch's bilinear source indices and weights along one axis (align_corners=False, float32)."""
  scale = np.float32(in_size) / np.float32(out_size)
  source = _fma32(scale, np.arange(out_size, dtype=np.float32) + np.float32(0.5), np.float32(-0.5))
  source = np.maximum(source, np.float32(0.0))
  low = source.astype(np.int64)
  high = np.minimum(low + 1, in_size - 1)
  weight_high = (source - low.astype(np.float32)).astype(np.float32)
  return low, high, (np.float32(1.0) - weight_high).astype(np.float32), weight_high


def upsample(cell_map: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resizing `(h, w)` -> `(height, width)`, float32, as PyTorch's `F.interpolate(mode='bilinear',
  align_corners=False)` computes it on a CPU (what the reference upsamples its maps with).

  Same source indices (fused multiply-add, clamped at 0), weights and order of operations, so the result
  equals PyTorch's on every pixel when upsampling, edges included: where the outer cells are 0 the edge
  bands are exactly 0 (`soft > 0` decides GrabCut's probable foreground).
  """
  values = np.asarray(cell_map, np.float32)
  r0, r1, a0, a1 = _interpolation_axis(values.shape[0], height)
  c0, c1, b0, b1 = _interpolation_axis(values.shape[1], width)
  a0, a1, b0, b1 = a0[:, None], a1[:, None], b0[None], b1[None]
  top, bottom = values[r0], values[r1]
  upper = _fma32(b0, top[:, c0], b1 * top[:, c1])
  lower = _fma32(b0, bottom[:, c0], b1 * bottom[:, c1])
  return _fma32(a0, upper, a1 * lower)


def grabcut_labels(soft: np.ndarray, fg_threshold: float = FG_THRESHOLD, dilate: int = DILATE) -> np.ndarray:
  """GrabCut initial labels from a full-resolution soft map (docs/reference.md §7 "Graph" step 6).

  GC_FGD (1) where value > fg_threshold * max; GC_PR_BGD (2) on the ring added by a `dilate` x `dilate`
  square dilation of the positive area (anchored like skimage's `dilation`: 5 pixels up/left, 4
  down/right for 10); GC_PR_FGD (3) where 0 < value < threshold; GC_BGD (0) elsewhere.
  """
  threshold = fg_threshold * soft.max()
  positive = (soft > 0).astype(np.uint8)
  labels = np.zeros(soft.shape, np.uint8)
  labels[soft > threshold] = cv2.GC_FGD
  if dilate > 0:
    anchor = (dilate - 1) // 2
    grown = cv2.dilate(positive, np.ones((dilate, dilate), np.uint8), anchor=(anchor, anchor),
                       borderType=cv2.BORDER_CONSTANT, borderValue=0)
    labels[(grown > 0) & (positive == 0)] = cv2.GC_PR_BGD
  labels[(soft > 0) & (soft < threshold)] = cv2.GC_PR_FGD
  return labels


GRABCUT_RNG = ('per-call', 'released')


def soft_to_binary(cell_map: np.ndarray, image_bgr: np.ndarray, fg_threshold: float = FG_THRESHOLD,
                   dilate: int = DILATE, iterations: int = GRABCUT_ITERATIONS,
                   grabcut: bool = True, grabcut_rng: str = 'per-call') -> np.ndarray:
  """A per-image cell map -> bool `(H, W)` foreground mask at the image's resolution (docs/reference.md §7 "Graph" steps 5-6).

  Upsampled bilinearly to the image size; no positive value -> all background; else GrabCut
  (`iterations`, initialised by `grabcut_labels`), foreground = GC_FGD or GC_PR_FGD. When GrabCut cannot
  run (no background sample at all) or `grabcut=False`, the initial foreground labels are returned.
  GrabCut's k-means draws from OpenCV's RNG: `grabcut_rng='per-call'` (ours) reseeds it before every
  call, so a mask does not depend on what ran before; 'released' leaves it alone, one stream through the
  whole process as in the reference (`reset_grabcut_rng` starts that stream where a fresh process does).
  """
  height, width = image_bgr.shape[:2]
  soft = upsample(cell_map, height, width)
  if not np.any(soft > 0):
    return np.zeros((height, width), bool)
  labels = grabcut_labels(soft, fg_threshold, dilate)
  initial = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
  if not grabcut or not np.any((labels == cv2.GC_BGD) | (labels == cv2.GC_PR_BGD)):
    return initial
  if grabcut_rng == 'per-call':
    cv2.setRNGSeed(0)
  elif grabcut_rng != 'released':
    raise DataError(f'grabcut_rng must be one of {GRABCUT_RNG}, got {grabcut_rng!r}')
  try:
    labels, _, _ = cv2.grabCut(np.ascontiguousarray(image_bgr, np.uint8), labels, None,
                               np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64), iterations,
                               cv2.GC_INIT_WITH_MASK)
  except cv2.error:
    return initial
  return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def reset_grabcut_rng() -> None:
  """OpenCV's RNG in the state a fresh process starts with (the reference runs one class per process)."""
  cv2.setRNGSeed(0)  # RNG(0) is OpenCV's default state, 0xffffffff


# ----------------------------------------------------------------------------------------------------
# Methods.
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Pattern:
  """One discovered pattern.

  Attributes:
    nodes: `(M,)` indices of its nodes.
    values: `(M,)` their (positive) eigenvector values.
    energy: normalised energy u^T A u of its node set (average affinity per node).
    maps: `(num_images, h, w)` per-image cell maps from its nodes.
    images: indices of the images it appears in, strongest first.
  """
  nodes: np.ndarray
  values: np.ndarray
  energy: float
  maps: np.ndarray
  images: np.ndarray


@dataclasses.dataclass
class Discovery:
  """Everything a discovery run produced: nodes, affinity, eigenvector, per-image maps, patterns, and the
  fraction of nodes whose eigenvector value is float noise (`undetermined_fraction`; 0 for 'patterns',
  whose per-group eigenvectors live on connected groups)."""
  nodes: Nodes
  matrix: scipy.sparse.csr_matrix
  vector: np.ndarray
  maps: np.ndarray
  patterns: List[Pattern]
  undetermined: float = 0.0


def build_graph(pair_set: PairSet, sigma: float, top_k: int = TOP_K, conf_threshold: float = CONF_THRESHOLD,
                two_cycle: bool = False, three_cycle: bool = True, min_weight: float = MIN_WEIGHT,
                kernel_dtype: str = 'float64'):
  """Used pairs -> nodes -> sparse affinity. Returns (nodes, matrix)."""
  nodes = extract_nodes(pair_set, used_pairs(pair_set, top_k), conf_threshold)
  matrix = affinity(nodes, pair_set, sigma, two_cycle, three_cycle, min_weight, kernel_dtype)
  return nodes, matrix


NOISE_FLOOR = 1e-6  # eigenvector entries below this x the largest are float noise


def undetermined_fraction(matrix: scipy.sparse.spmatrix, vector: np.ndarray) -> float:
  """The fraction of nodes the leading eigenvector leaves undetermined.

  When the graph falls apart into components, the eigenvector lives on one of them and its other entries
  are float noise (|x| < NOISE_FLOOR x max |x|) whose signs and values depend on the solver, not on the
  data: the reference method's maps (and so its masks) there are not determined by the method.
  """
  if len(vector) == 0 or not np.any(vector):
    return 0.0
  return float(np.mean(np.abs(vector) < NOISE_FLOOR * np.abs(vector).max()))


def _pattern(nodes: Nodes, members: np.ndarray, values: np.ndarray, energy: float, num_images: int,
             min_image_strength: float = 0.0) -> Pattern:
  """A pattern from its nodes and values: per-image maps of the positive values, images by strength.

  An image's strength is the sum of its map; images weaker than `min_image_strength` x the strongest
  are left out (their maps zeroed): a few stray correspondences do not make an instance.
  """
  positive = np.maximum(values, 0.0)
  full = np.zeros(len(nodes))
  full[members] = positive
  maps = image_maps(nodes, full, num_images)
  strength = maps.reshape(num_images, -1).sum(axis=1)
  keep = (strength > 0) & (strength >= min_image_strength * strength.max(initial=0.0))
  maps[~keep] = 0.0
  images = np.flatnonzero(keep)
  images = images[np.argsort(-strength[images], kind='stable')]
  return Pattern(members, positive, energy, maps, images)


def discover_reference(pair_set: PairSet, sigma: float, top_k: int = TOP_K,
                       conf_threshold: float = CONF_THRESHOLD, two_cycle: bool = False,
                       three_cycle: bool = True, min_weight: float = MIN_WEIGHT) -> Discovery:
  """docs/reference.md §7 "Graph" steps 1-6: one pattern, the leading eigenvector; `maps` are the reference's 'sum' maps."""
  # The reference computes its kernel in float32.
  nodes, matrix = build_graph(pair_set, sigma, top_k, conf_threshold, two_cycle, three_cycle, min_weight,
                              kernel_dtype='float32')
  vector = leading_eigenvector(matrix)
  maps = image_maps(nodes, vector, pair_set.num_images)
  patterns = []
  if len(nodes) and np.any(vector):
    energy = sign_and_energy(matrix, vector)[3]
    pattern = _pattern(nodes, np.arange(len(nodes)), vector, energy, pair_set.num_images)
    if len(pattern.images):
      patterns.append(pattern)
  return Discovery(nodes, matrix, vector, maps, patterns, undetermined_fraction(matrix, vector))


def discover_patterns(pair_set: PairSet, sigma: float, top_k: int = TOP_K,
                      conf_threshold: float = CONF_THRESHOLD, two_cycle: bool = False,
                      three_cycle: bool = True, min_weight: float = MIN_WEIGHT, max_patterns: int = 10,
                      max_conductance: float = 0.05, min_nodes: int = 4, min_relative_energy: float = 0.05,
                      min_image_strength: float = 0.1) -> Discovery:
  """Several patterns per collection, on the reference graph (ours).

  1. Groups: connected components cut along weak Fiedler cuts (`split_patterns`); groups whose energy
     u^T A u (average affinity per node) is below `min_relative_energy` x the best are noise.
  2. Each group becomes a pattern: node values = the group's own leading eigenvector (the reference's
     weighting, signed by its rule, negatives clipped), so one pattern's map is never cancelled by
     another's; images holding less than `min_image_strength` of the strongest image's map mass are
     not instances.
  3. Pieces of one pattern are merged back (`merge_groups` on `pattern_support`) and recomputed.
  Patterns are ranked by the number of images they appear in, then by energy; at most `max_patterns`.
  `maps` (used for co-segmentation) are the first pattern's.
  """
  nodes, matrix = build_graph(pair_set, sigma, top_k, conf_threshold, two_cycle, three_cycle, min_weight)

  def make_pattern(members):
    sub = matrix[members][:, members]
    energy = float(np.asarray(sub.sum()) / len(members))
    return _pattern(nodes, members, leading_eigenvector(sub), energy, pair_set.num_images, min_image_strength)

  groups = graph_clusters.split_patterns(matrix, max_conductance, min_nodes)
  energies = [float(np.asarray(matrix[g][:, g].sum()) / len(g)) for g in groups]
  groups = [g for g, e in zip(groups, energies) if e >= min_relative_energy * max(energies, default=0.0)]
  pieces = [make_pattern(g) for g in groups]
  patterns = []
  supports = [graph_clusters.pattern_support(p.maps) for p in pieces]
  for merged in graph_clusters.merge_groups(supports, nodes.grid) if pieces else []:
    if len(merged) == 1:
      patterns.append(pieces[merged[0]])
    else:
      patterns.append(make_pattern(np.sort(np.concatenate([groups[k] for k in merged]))))
  patterns = [p for p in patterns if len(p.images) >= 2]
  patterns.sort(key=lambda p: (-len(p.images), -p.energy))
  patterns = patterns[:max_patterns]
  vector = np.zeros(len(nodes))
  if patterns:
    vector[patterns[0].nodes] = patterns[0].values
  h, w = nodes.grid
  maps = patterns[0].maps if patterns else np.zeros((pair_set.num_images, h, w), np.float32)
  return Discovery(nodes, matrix, vector, maps, patterns, 0.0)


METHODS = {'reference': discover_reference, 'patterns': discover_patterns}


def discover(pair_set: PairSet, method: str = 'reference', sigma: float = 1.0, **kwargs) -> Discovery:
  """Runs a discovery method by name (`METHODS`)."""
  if method not in METHODS:
    raise DataError(f'unknown discovery method {method!r}; expected one of {sorted(METHODS)}')
  return METHODS[method](pair_set, sigma, **kwargs)
