"""Scoring one query against many candidates at once: jitted, batched, sharded over local devices.

One compiled function scores a fixed-size batch of candidates from their (cached) backbone features:
transformer on (Q, D_i) for the whole batch, the retrieval weight and the SPEC §4 score as a segment
max (`segswap_jax.scoring`), no Python loop over cells. The candidate axis is split over the local
devices (jit with a NamedSharding over a 1-D mesh); the last batch is padded and carries a validity mask,
so everything compiles once per input size. Queries are spread over processes by the callers
(`query_shard`, `gather_rows`): each process scores its own queries on its own devices.

Shapes: features `(..., h, w, C)` L2-normalised, outputs `(..., h, w, 3)` = (x, y, mask), NHWC.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eval.retrieval import DataError
from segswap_jax import geometry
from segswap_jax import model as model_lib
from segswap_jax import scoring
from segswap_jax import multihost


def backbone_features(backbone, backbone_vars, images, denormalize: bool = False):
  """uint8 `(B, H, W, 3)` -> L2-normalised `(B, H/16, W/16, C)`.

  `denormalize=True` reproduces the released Tokyo/Pitts/Internet candidate loader, which feeds
  x * std + mean (the inverse of the ImageNet normalisation) to the backbone (REFERENCE_EVAL §0).
  """
  if denormalize:
    x = jnp.asarray(images, jnp.float32) / 255.0
    x = x * jnp.asarray(model_lib.IMAGENET_STD, jnp.float32) + jnp.asarray(model_lib.IMAGENET_MEAN, jnp.float32)
  else:
    x = model_lib.normalize_images(images)
  return model_lib.l2_normalize(backbone.apply(backbone_vars, x))


def correspondence_stats(out_q, weight, cell_mask):
  """Summaries of where the scored query cells land in each candidate (for Brueghel boxes).

  Args:
    out_q: `(B, h, w, 3)` query-side outputs; weight: `(B, h, w)`; cell_mask: bool `(h, w)`.

  Returns:
    `(B, 11)` float32 columns: [coarse x, coarse y (unweighted mean of the predicted x, y over the
    scored cells, the reference's `coarse_pred`), weight sum, weighted means of source x, y and of
    target x, y, weighted covariances cov(src x, tgt x), cov(src y, tgt y), variances var(src x),
    var(src y)]; source = the cell centres in [0, 1] of the query image.
  """
  h, w = cell_mask.shape
  cells = cell_mask.astype(jnp.float32)
  src = jnp.asarray(geometry.cell_centers(h, w))  # (h, w, 2)
  tgt = out_q[..., :2]
  coarse = jnp.sum(tgt * cells[..., None], axis=(1, 2)) / jnp.maximum(jnp.sum(cells), 1.0)
  wgt = weight * cells
  total = jnp.sum(wgt, axis=(1, 2))
  norm = jnp.maximum(total, 1e-12)[:, None]
  mean_src = jnp.einsum('bhw,hwc->bc', wgt, src) / norm
  mean_tgt = jnp.einsum('bhw,bhwc->bc', wgt, tgt) / norm
  dsrc = src[None] - mean_src[:, None, None]
  dtgt = tgt - mean_tgt[:, None, None]
  cov = jnp.einsum('bhw,bhwc->bc', wgt, dsrc * dtgt) / norm
  var = jnp.einsum('bhw,bhwc->bc', wgt, dsrc * dsrc) / norm
  return jnp.concatenate([coarse, total[:, None], mean_src, mean_tgt, cov, var], axis=1)


def balanced_batch_size(num_candidates: int, requested: int, num_devices: int) -> int:
  """The smallest batch that scores `num_candidates` in as many calls as `requested` would.

  E.g. 100 candidates asked in batches of 32 (4 calls, 28 padded slots) run as 4 x 25 on one device.
  The result is a multiple of `num_devices`.
  """
  calls = -(-num_candidates // max(1, requested))
  per_call = -(-num_candidates // calls)
  return -(-per_call // num_devices) * num_devices


@functools.lru_cache(maxsize=8)
def _compiled_functions(config_json: str, devices: Tuple[jax.Device, ...]) -> Dict:
  """The jitted functions of one model config on one device set, shared by every CandidateScorer built
  for them (so a second scorer, e.g. a second evaluation in the same process, compiles nothing)."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  mesh = Mesh(np.array(devices), ('candidates',))
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P('candidates'))
  backbone = model_lib.build_backbone(config)
  transformer = model_lib.build_transformer(config)

  def features(backbone_vars, images, denormalize):
    return backbone_features(backbone, backbone_vars, images, denormalize)

  def query_mask(transformer_vars, feat_q, init_mask):
    out_a, out_b = transformer.apply(transformer_vars, feat_q[None], feat_q[None], train=False)
    return scoring.consistent_mask(init_mask[None], out_a, out_b)[0]

  def score(transformer_vars, feat_q, mask_q, cell_mask, feat_d, valid):
    # Cached features may be float16: back to float32 and unit norm, as the model expects.
    feat_d = model_lib.l2_normalize(feat_d.astype(jnp.float32))
    batch = feat_d.shape[0]
    feat_qb = jnp.broadcast_to(feat_q, (batch,) + feat_q.shape)
    out_q, out_d = transformer.apply(transformer_vars, feat_qb, feat_d, train=False)
    weight = scoring.transported_mask(jnp.broadcast_to(mask_q, (batch,) + mask_q.shape), out_q, out_d)
    scores = scoring.pair_score(feat_qb, feat_d, out_q, weight, cell_mask)
    return {'score': jnp.where(valid, scores, -jnp.inf),
            'stats': correspondence_stats(out_q, weight, cell_mask)}

  return {
      'sharded': sharded,
      'replicated': replicated,
      'features': jax.jit(features, static_argnums=2, out_shardings=sharded),
      'query_mask': jax.jit(query_mask),
      'score': jax.jit(score, in_shardings=(replicated,) * 4 + (sharded,) * 2, out_shardings=sharded),
  }


class CandidateScorer:
  """A query against batches of candidates, with the candidate axis sharded over local devices.

  Args:
    params: `{'backbone': ..., 'transformer': ...}` model parameters.
    config: the model config.
    batch_size: candidates per compiled call; rounded up to a multiple of the local device count.
    devices: devices to shard over (default: this process's local devices).
  """

  def __init__(self, params: Dict, config: ml_collections.ConfigDict, batch_size: int = 32,
               devices: Optional[Sequence[jax.Device]] = None):
    self.devices = list(devices or jax.local_devices())
    n = len(self.devices)
    self.batch_size = -(-max(1, batch_size) // n) * n
    self.config = config
    functions = _compiled_functions(json.dumps(config.to_dict(), sort_keys=True), tuple(self.devices))
    self.sharded, replicated = functions['sharded'], functions['replicated']
    self._features, self._query_mask, self._score = functions['features'], functions['query_mask'], functions['score']
    self._backbone_vars = jax.device_put(params['backbone'], replicated)
    self._transformer_vars = jax.device_put(params['transformer'], replicated)

  # -- features -----------------------------------------------------------------------------------
  def features(self, images: np.ndarray, denormalize: bool = False) -> np.ndarray:
    """uint8 `(B, H, W, 3)` -> float32 `(B, h, w, C)`; B is padded to a multiple of the device count."""
    images = np.asarray(images)
    count = len(images)
    pad = -count % len(self.devices)
    if pad:
      images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
    out = self._features(self._backbone_vars, jax.device_put(images, self.sharded), denormalize)
    return np.asarray(out)[:count]

  # -- scoring ------------------------------------------------------------------------------------
  def query_mask(self, feat_q: np.ndarray, init_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Self-pair query mask `(h, w)` of query features `(h, w, C)` (init: all ones or a box mask)."""
    if init_mask is None:
      init_mask = np.ones(feat_q.shape[:2], np.float32)
    return np.asarray(self._query_mask(self._transformer_vars, feat_q, np.asarray(init_mask, np.float32)))

  def score(self, feat_q: np.ndarray, num_candidates: int, read_batch: Callable[[np.ndarray], np.ndarray],
            init_mask: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Scores one query against `num_candidates` candidates read in batches.

    Args:
      feat_q: `(h, w, C)` query features.
      num_candidates: how many candidates.
      read_batch: candidate positions `(n,)` -> features `(n, hd, wd, C)` (e.g. from the cache);
        called for the next batch while the current one runs on the devices.
      init_mask: optional `(h, w)` initial query mask; when given, only its cells are scored (Brueghel).

    Returns:
      `score` `(num_candidates,)` float32, `stats` `(num_candidates, 11)` (`correspondence_stats`),
      `query_mask` `(h, w)`.
    """
    h, w = feat_q.shape[:2]
    init = np.ones((h, w), np.float32) if init_mask is None else np.asarray(init_mask, np.float32)
    mask_q = self._query_mask(self._transformer_vars, feat_q, init)
    cell_mask = init > 0
    outputs = []
    starts = list(range(0, num_candidates, self.batch_size))
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
      pending = reader.submit(read_batch, np.arange(0, min(self.batch_size, num_candidates)))
      for i, start in enumerate(starts):
        feats = pending.result()
        if i + 1 < len(starts):
          nxt = starts[i + 1]
          pending = reader.submit(read_batch, np.arange(nxt, min(nxt + self.batch_size, num_candidates)))
        valid = np.zeros(self.batch_size, bool)
        valid[:len(feats)] = True
        if len(feats) < self.batch_size:  # static shapes: pad the last batch
          feats = np.concatenate([feats, np.zeros((self.batch_size - len(feats),) + feats.shape[1:], feats.dtype)])
        outputs.append(self._score(self._transformer_vars, feat_q, mask_q, cell_mask,
                                   jax.device_put(feats, self.sharded), jax.device_put(valid, self.sharded)))
    result = {k: np.concatenate([np.asarray(o[k]) for o in outputs])[:num_candidates] for k in ('score', 'stats')}
    result['query_mask'] = np.asarray(mask_q)
    return result


# -- spreading queries over processes ------------------------------------------------------------------

def query_shard(num_queries: int, process_index: Optional[int] = None,
                process_count: Optional[int] = None) -> np.ndarray:
  """The queries this process scores: every process_count-th, starting at its index."""
  pid = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return np.arange(pid, num_queries, count)


def gather_rows(local: np.ndarray, num_queries: int) -> np.ndarray:
  """Reassembles per-query rows scored by `query_shard` on every process (every process gets all).

  Args:
    local: `(len(query_shard(num_queries)), ...)` this process's rows, in its query order.
  Returns:
    `(num_queries, ...)` rows in query order.
  """
  count = jax.process_count()
  if count == 1:
    return local
  gathered = multihost.concat_over_processes(local)   # process 0's rows, then process 1's, ...
  out = np.empty((num_queries,) + local.shape[1:], local.dtype)
  out[np.concatenate([query_shard(num_queries, pid, count) for pid in range(count)])] = gathered
  return out


def initialize_distributed(coordinator_address: Optional[str], num_processes: int, process_id: int) -> None:
  """Joins a multi-process run (the same command on every host, one process id each); no-op for one."""
  if num_processes > 1:
    if not coordinator_address:
      raise DataError('--num_processes > 1 needs --coordinator_address HOST:PORT')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
