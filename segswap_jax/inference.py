"""The inference engine: every jitted forward of a trained model, and the Python API over them.

  model = SegSwap.load('checkpoints/segswap_official')
  feats = model.features(images)            # uint8 (B, H, W, 3) -> (B, H/16, W/16, C), L2-normalised
  out = model.pair(feats[:1], feats[1:2])   # PairOutputs(out_a, out_b), each (B, h, w, 3) = (x, y, mask)
  result = model.score(query_image, target_images)   # retrieval scores and everything behind them

This module is the only place that wraps the model in jitted functions for inference: backbone
features, pair forward, the self-pair query mask, candidate scoring (retrieval, Brueghel, predict),
pairs gathered by index from device-resident features (discovery, the Internet evaluation) and
pool-pair scores (hard mining). They are compiled once per (model config, device set) and shared by
every `SegSwap` built for them (`_compiled`, an LRU cache), and every call runs on padded batches of a
fixed size, so a shape compiles once however many items come.

Why inference jits over a device mesh while training pmaps: inference batches are ragged (100
candidates, a collection's pairs, the last batch of anything), the candidate or pair axis is simply
sharded over the local devices (`NamedSharding` over a 1-D mesh, parameters replicated) and padded to
a multiple of them, and every process works on its own share with its own devices. The train step is
written for one replica and run under `jax.pmap` (as the design card asks), which averages gradients
over every device of every process; it stays free of sharding details (`segswap_jax/training/step.py`).

Shapes: features `(..., h, w, C)` L2-normalised float32, outputs `(..., h, w, 3)` = (x, y, mask), x and y
in [0, 1] of the other image, NHWC.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segswap_jax import checkpoints
from segswap_jax import cli
from segswap_jax import errors
from segswap_jax import features as features_lib
from segswap_jax import model as model_lib
from segswap_jax import scoring


class PairOutputs(NamedTuple):
  """Transformer outputs of a batch of pairs (A, B).

  out_a: `(B, h_a, w_a, 3)`: for each cell of A, (x, y) of its match in B in [0, 1] and the co-seg mask.
  out_b: `(B, h_b, w_b, 3)`: the same for B, pointing into A.
  """
  out_a: jax.Array
  out_b: jax.Array


def balanced_batch_size(num_items: int, requested: int, num_devices: int) -> int:
  """The smallest batch that runs `num_items` in as many calls as `requested` would.

  E.g. 100 candidates asked in batches of 32 (4 calls, 28 padded slots) run as 4 x 25 on one device.
  The result is a multiple of `num_devices`.
  """
  calls = -(-num_items // max(1, requested))
  per_call = -(-num_items // max(calls, 1))
  return -(-per_call // num_devices) * num_devices


def _round_up(value: int, multiple: int) -> int:
  return -(-max(1, value) // multiple) * multiple


def _pad_rows(array, size: int):
  """Pads the leading axis to `size` with copies of the last row (static shapes)."""
  missing = size - array.shape[0]
  if missing <= 0:
    return array
  xp = jnp if isinstance(array, jax.Array) else np
  return xp.concatenate([array, xp.repeat(array[-1:], missing, axis=0)])


# ----------------------------------------------------------------------------------------------------
# The compiled functions of one model config on one device set.
# ----------------------------------------------------------------------------------------------------

class _Functions(NamedTuple):
  replicated: NamedSharding
  sharded: NamedSharding
  features: Callable
  tokens: Callable
  pair: Callable
  query_mask: Callable
  score: Callable
  indexed_pairs: Callable
  pool_scores: Callable


def hoists(config: ml_collections.ConfigDict) -> bool:
  """Whether the matcher has a pair-independent part to run once per image (the transformer's
  projection and first I layer; NC-Net's consensus sees only the pair's correlation)."""
  return model_lib.matcher_key(config) == 'transformer'


@functools.lru_cache(maxsize=16)
def _compiled(config_json: str, devices: Tuple[jax.Device, ...]) -> _Functions:
  config = ml_collections.ConfigDict(json.loads(config_json))
  mesh = Mesh(np.array(devices), ('batch',))
  replicated = NamedSharding(mesh, PartitionSpec())
  sharded = NamedSharding(mesh, PartitionSpec('batch'))
  backbone = model_lib.build_backbone(config)
  matcher = model_lib.build_matcher(config)
  split = hoists(config)

  def apply(matcher_vars, feat_a, feat_b, pad_a=None, pad_b=None):
    return matcher.apply(matcher_vars, feat_a, feat_b, pad_a, pad_b, train=False)

  def prepare(matcher_vars, feat):
    return matcher.apply(matcher_vars, feat, method='prepare')

  def match(matcher_vars, side_a, side_b):
    """Each side: {'features': (B, h, w, C)} and, when the matcher splits, maybe {'tokens': (B, h, w, d)}
    (prepared once per image by the caller); the missing tokens are prepared here."""
    if not split:
      return apply(matcher_vars, side_a['features'], side_b['features'])
    tokens = [side['tokens'].astype(jnp.float32) if 'tokens' in side else prepare(matcher_vars, side['features'])
              for side in (side_a, side_b)]
    return matcher.apply(matcher_vars, *tokens, method='match')

  def features(backbone_vars, images, normalization):
    return features_lib.backbone_features(backbone, backbone_vars, images, normalization)

  def tokens(matcher_vars, feats):
    return prepare(matcher_vars, features_lib.l2_normalize(feats.astype(jnp.float32)))

  def pair(matcher_vars, feat_a, feat_b, pad_a, pad_b):
    return PairOutputs(*apply(matcher_vars, feat_a, feat_b, pad_a, pad_b))

  def query_mask(matcher_vars, query, init_mask):
    side = jax.tree.map(lambda x: x[None], query)
    out_a, out_b = match(matcher_vars, side, side)
    return scoring.consistent_mask(init_mask[None], out_a, out_b)[0]

  def score(matcher_vars, query, mask_q, cell_mask, candidates, valid, with_outputs):
    # Cached features may be float16: back to float32 and unit norm, as the model expects.
    candidates = dict(candidates, features=features_lib.l2_normalize(candidates['features'].astype(jnp.float32)))
    feat_d = candidates['features']
    batch = feat_d.shape[0]
    query = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch,) + x.shape), query)
    feat_qb = query['features']
    out_q, out_d = match(matcher_vars, query, candidates)
    weight = scoring.transported_mask(jnp.broadcast_to(mask_q, (batch,) + mask_q.shape), out_q, out_d)
    result = {'score': jnp.where(valid, scoring.pair_score(feat_qb, feat_d, out_q, weight, cell_mask), -jnp.inf),
              'stats': scoring.correspondence_stats(out_q, weight, cell_mask)}
    if with_outputs:
      result.update(out_query=out_q, out_candidates=out_d, transported_masks=weight)
    return result

  def gather(table, index):
    return jax.tree.map(lambda x: x[index], table)

  def indexed_pairs(matcher_vars, table, mirrored, index_i, index_j, min_mask, flip):
    side_i, side_j = gather(table, index_i), gather(table, index_j)
    feat_i, feat_j = side_i['features'], side_j['features']
    out_a, out_b = match(matcher_vars, side_i, side_j)
    if flip != 'none':
      mirror_a, mirror_b = match(matcher_vars, side_i, gather(mirrored, index_j))
      out_a, out_b = scoring.choose_flip((out_a, out_b), (mirror_a, mirror_b), flip)
    weight_a = scoring.cycle_weight(out_a, out_b)
    weight_b = scoring.cycle_weight(out_b, out_a)
    valid = (jnp.sum(weight_a, axis=(1, 2)) >= min_mask) & (jnp.sum(weight_b, axis=(1, 2)) >= min_mask)
    scores = jnp.stack([scoring.pair_score(feat_i, feat_j, out_a, weight_a),
                        scoring.pair_score(feat_j, feat_i, out_b, weight_b)], axis=-1)
    return out_a, out_b, jnp.where(valid[:, None], scores, 0.0)

  def pool_scores(matcher_vars, table, index_i, index_j):
    as_float = lambda side: dict(side, features=side['features'].astype(jnp.float32))
    out_a, out_b = match(matcher_vars, as_float(gather(table, index_i)), as_float(gather(table, index_j)))
    return jnp.mean(out_a[..., 2], axis=(1, 2)) + jnp.mean(out_b[..., 2], axis=(1, 2))

  return _Functions(
      replicated=replicated, sharded=sharded,
      features=jax.jit(features, static_argnums=2, out_shardings=sharded),
      tokens=jax.jit(tokens),
      pair=jax.jit(pair),
      query_mask=jax.jit(query_mask),
      score=jax.jit(score, static_argnums=6),
      indexed_pairs=jax.jit(indexed_pairs, static_argnums=6),
      pool_scores=jax.jit(pool_scores))


# ----------------------------------------------------------------------------------------------------
# The engine.
# ----------------------------------------------------------------------------------------------------

class SegSwap:
  """A loaded model and its compiled inference functions, sharded over `devices`.

  Args:
    params: `{'backbone': vars, MATCHER: vars}` (host or device arrays; MATCHER = `model.matcher_key(config)`).
    config: the model config.
    checkpoint_dir: where it was loaded from (for messages).
    devices: devices to shard batches over (default: this process's local devices).
  """

  def __init__(self, params: dict, config: ml_collections.ConfigDict, checkpoint_dir: Optional[str] = None,
               devices: Optional[Sequence[jax.Device]] = None, digests: Optional[Dict[str, str]] = None):
    self.config = config
    self._digests = digests
    self.checkpoint_dir = checkpoint_dir
    self.devices = list(devices or jax.local_devices())
    # The compiled functions (shared by every engine of this config and device set) and the parameters
    # replicated on the devices ('backbone', 'matcher'); benchmarks read both for XLA's cost analysis.
    self.functions = _compiled(json.dumps(config.to_dict(), sort_keys=True), tuple(self.devices))
    self.params = params
    self.matcher_key = model_lib.matcher_key(config)
    self.variables = jax.device_put({'backbone': params['backbone'], 'matcher': params[self.matcher_key]},
                                    self.functions.replicated)

  @classmethod
  def load(cls, checkpoint_dir: str, devices: Optional[Sequence[jax.Device]] = None,
           compute_dtype: Optional[str] = None) -> 'SegSwap':
    """A verified checkpoint, in its own compute dtype or `compute_dtype` (docs/performance.md)."""
    params, config, digests = checkpoints.load_verified(checkpoint_dir)
    return cls(params, cli.compute_config(config, compute_dtype), checkpoint_dir, devices, digests)

  @property
  def digests(self) -> Dict[str, str]:
    """Digests of the parameters ('params', 'backbone', 'matcher'): stored with the checkpoint, or
    computed once for parameters given in memory."""
    if self._digests is None:
      self._digests = checkpoints.model_digests(jax.tree.map(np.asarray, self.params))
    return self._digests

  @property
  def fingerprint(self) -> str:
    """What determines this model's outputs: the parameters' digest and the model config; the key of
    every cache and resumable result made with it."""
    return checkpoints.model_fingerprint(self.digests, self.config)

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def batch_size(self, requested: int) -> int:
    """`requested` rounded up to a multiple of the device count (what a call really runs)."""
    return _round_up(requested, self.num_devices)

  def _sharded(self, array):
    return jax.device_put(array, self.functions.sharded)

  def on_all_devices(self, array) -> jax.Array:
    """A copy on every device (for tables that jitted calls gather from by index)."""
    return jax.device_put(array, self.functions.replicated)

  # -- features ----------------------------------------------------------------------------------------
  def features(self, images, normalization: str = 'imagenet', batch_size: int = 8,
               progress: Optional[Callable[[int], None]] = None) -> jax.Array:
    """Images `(N, H, W, 3)` (uint8 RGB; float model inputs with normalization='none') -> L2-normalised
    float32 features `(N, ceil(H/16), ceil(W/16), C)` on the devices, in padded batches of `batch_size`.
    (The reference's Brueghel query crops are 639 px: any size works; the CLIs ask for multiples of 16.)

    `normalization`: 'imagenet' (default), 'denormalized' (the released loaders' quirk) or 'none'
    (`segswap_jax.features`). `progress(n)` is called after each batch with the items it held.
    """
    if normalization not in features_lib.NORMALIZATIONS:
      raise errors.ConfigError(f'normalization must be one of {features_lib.NORMALIZATIONS}, '
                               f'got {normalization!r}')
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < model_lib.FEATURE_STRIDE:
      raise errors.DataError(f'images must be (N, H, W, 3) with H, W >= {model_lib.FEATURE_STRIDE}, got shape '
                             f'{tuple(images.shape)}')
    count = images.shape[0]
    if count == 0:
      raise errors.DataError('no images')
    size = self.batch_size(min(batch_size, count))
    chunks = []
    for start in range(0, count, size):
      batch = images[start:start + size]
      valid = batch.shape[0]
      out = self.functions.features(self.variables['backbone'], self._sharded(_pad_rows(batch, size)), normalization)
      chunks.append(out[:valid] if valid < size else out)
      if progress is not None:
        progress(valid)
    return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)

  # -- pairs -------------------------------------------------------------------------------------------
  def pair(self, feat_a, feat_b, pad_a=None, pad_b=None) -> PairOutputs:
    """Features `(B, h_a, w_a, C)`, `(B, h_b, w_b, C)` (and optional key padding, bool `(B, h, w)`,
    True = ignored) -> PairOutputs (eval mode). The batch is padded to a multiple of the devices."""
    count = feat_a.shape[0]
    size = self.batch_size(count)
    put = lambda x: None if x is None else self._sharded(_pad_rows(x, size))
    out = self.functions.pair(self.variables['matcher'], put(feat_a), put(feat_b), put(pad_a), put(pad_b))
    return PairOutputs(out.out_a[:count], out.out_b[:count]) if size != count else out

  def query_mask(self, feat_q, init_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Self-pair query mask `(h, w)` of query features `(h, w, C)` (init: all ones or a box mask)."""
    if init_mask is None:
      init_mask = np.ones(feat_q.shape[:2], np.float32)
    return np.asarray(self.functions.query_mask(self.variables['matcher'], self._query(feat_q),
                                                jnp.asarray(init_mask, jnp.float32)))

  # -- the pair-independent part ---------------------------------------------------------------------
  @property
  def hoists(self) -> bool:
    """Whether the matcher's pair-independent part can run once per image (`tokens`): the transformer."""
    return hoists(self.config)

  def tokens(self, features, batch_size: int = 32) -> jax.Array:
    """Prepared tokens `(N, h, w, d_model)` float32 of features `(N, h, w, C)` (float16 is fine): the
    transformer's feature projection and first I layer, which see one image alone
    (`CrossTransformer.prepare`). What `cache_format='projected'` stores per database image."""
    if not self.hoists:
      raise errors.ConfigError(f"the {self.matcher_key} matcher has no pair-independent part: use "
                               "cache_format 'backbone'")
    count = features.shape[0]
    size = self.batch_size(min(batch_size, max(count, 1)))
    chunks = []
    for start in range(0, count, size):
      batch = features[start:start + size]
      valid = batch.shape[0]
      out = self.functions.tokens(self.variables['matcher'], self._sharded(_pad_rows(batch, size)))
      chunks.append(out[:valid] if valid < size else out)
    return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)

  def _query(self, feat_q) -> Dict[str, jax.Array]:
    """One query's side of a pair: its features `(h, w, C)` and, when the matcher splits, its tokens
    (prepared here once for all its candidates)."""
    feat_q = jnp.asarray(feat_q, jnp.float32)
    side = {'features': feat_q}
    if self.hoists:
      side['tokens'] = self.functions.tokens(self.variables['matcher'], feat_q[None])[0]
    return side

  # -- retrieval scoring -------------------------------------------------------------------------------
  def score_candidates(self, feat_q, num_candidates: int, read_batch: Callable[[np.ndarray], object],
                       init_mask: Optional[np.ndarray] = None, batch_size: int = 32,
                       outputs: bool = False) -> Dict[str, np.ndarray]:
    """Scores one query against `num_candidates` candidates whose features are read in batches.

    The query's pair-independent part runs once here, not once per candidate.

    Args:
      feat_q: `(h, w, C)` query features.
      num_candidates: how many candidates.
      read_batch: candidate positions `(n,)` -> features `(n, hd, wd, C)` (e.g. from the feature cache),
        or a dict {'features': that, 'tokens': `(n, hd, wd, d_model)`} of candidates whose prepared
        tokens are cached too (`tokens`; cache_format 'projected'); called for the next batch while the
        current one runs on the devices.
      init_mask: optional `(h, w)` initial query mask; when given, only its cells are scored (Brueghel).
      batch_size: candidates per call, rounded up to a multiple of the devices.
      outputs: also return every pair's outputs and transported mask.

    Returns:
      numpy: `score` `(n,)` float32 (docs/reference.md §4), `stats` `(n, 11)`
      (`scoring.correspondence_stats`), `query_mask` `(h, w)`; with `outputs`, `out_query` `(n, h, w, 3)`,
      `out_candidates` `(n, hd, wd, 3)`, `transported_masks` `(n, h, w)`.
    """
    h, w = feat_q.shape[:2]
    query = self._query(feat_q)
    init = np.ones((h, w), np.float32) if init_mask is None else np.asarray(init_mask, np.float32)
    mask_q = self.functions.query_mask(self.variables['matcher'], query, jnp.asarray(init))
    cell_mask = jnp.asarray(init > 0)
    size = self.batch_size(batch_size)
    keys = ('score', 'stats') + (('out_query', 'out_candidates', 'transported_masks') if outputs else ())
    results = {k: [] for k in keys}
    starts = list(range(0, num_candidates, size))
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
      pending = reader.submit(read_batch, np.arange(0, min(size, num_candidates)))
      for i, start in enumerate(starts):
        candidates = pending.result()
        if i + 1 < len(starts):
          nxt = starts[i + 1]
          pending = reader.submit(read_batch, np.arange(nxt, min(nxt + size, num_candidates)))
        if not isinstance(candidates, dict):
          candidates = {'features': candidates}
        valid = np.zeros(size, bool)
        valid[:candidates['features'].shape[0]] = True
        candidates = {k: self._sharded(_pad_rows(v, size)) for k, v in candidates.items()}
        out = self.functions.score(self.variables['matcher'], query, mask_q, cell_mask, candidates,
                                   self._sharded(valid), outputs)
        for k in keys:
          results[k].append(out[k])
    result = {k: np.concatenate([np.asarray(v) for v in chunks])[:num_candidates]
              for k, chunks in results.items()}
    result['query_mask'] = np.asarray(mask_q)
    return result

  def score(self, query_image: np.ndarray, target_images: Sequence[np.ndarray], batch_size: int = 8,
            init_mask: Optional[np.ndarray] = None) -> dict:
    """Retrieval score (docs/reference.md §4) of one query image against target images of one size.

    Returns numpy arrays: `features_query` (h, w, C), `features_targets` (n, h', w', C), `out_query`
    (n, h, w, 3), `out_targets` (n, h', w', 3), `scores` (n,), `query_mask` (h, w),
    `transported_masks` (n, h, w).
    """
    targets = np.asarray(target_images)
    if len(targets) == 0:
      raise errors.DataError('no target images')
    feat_q = self.features(np.asarray(query_image)[None])[0]
    feat_t = self.features(targets, batch_size=batch_size)
    result = self.score_candidates(feat_q, len(targets), lambda positions: feat_t[positions], init_mask,
                                   batch_size=min(batch_size, len(targets)), outputs=True)
    return {'features_query': np.asarray(feat_q), 'features_targets': np.asarray(feat_t),
            'out_query': result['out_query'], 'out_targets': result['out_candidates'],
            'scores': result['score'], 'query_mask': result['query_mask'],
            'transported_masks': result['transported_masks']}

  # -- pairs of a collection, by index ---------------------------------------------------------------
  def indexed_pairs(self, features_all: jax.Array, mirrored: Optional[jax.Array], pairs: np.ndarray,
                    min_mask: float, flip: str = 'none', batch_size: int = 32,
                    tokens_all: Optional[jax.Array] = None, tokens_mirrored: Optional[jax.Array] = None,
                    cache_format: str = 'projected') -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs pairs (i, j) of a collection whose features stay on the devices.

    Args:
      features_all: `(N, h, w, C)` features (`on_all_devices` them once: every call gathers from them).
      mirrored: the features of the horizontally mirrored images (needed unless flip == 'none').
      pairs: `(P, 2)` image indices.
      min_mask: a pair whose cycle-consistent masks (docs/reference.md §5) sum below this on either side
        gets scores 0.
      flip: 'none', 'reference' or 'corrected' (`scoring.choose_flip`).
      tokens_all, tokens_mirrored: the images' prepared tokens (`tokens`), when cached.
      cache_format: 'projected' (default): when the matcher splits, the devices hold every image's
        prepared tokens beside its features (computed here once per image when not given); 'backbone':
        features only (less device memory), the tokens are prepared again in every pair.

    Returns:
      numpy `out_a` `(P, h, w, 3)` (on image i), `out_b` `(P, h, w, 3)` (on image j), `scores` `(P, 2)`
      float64 = (s_ij, s_ji).
    """
    if flip not in scoring.FLIP_MODES:
      raise errors.ConfigError(f'unknown flip mode {flip!r}; expected one of {scoring.FLIP_MODES}')
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    hoist = cache_format == 'projected'
    table = self._table(features_all, tokens_all, hoist)
    mirrored_table = table if flip == 'none' else self._table(mirrored, tokens_mirrored, hoist)
    size = self.batch_size(min(batch_size, max(len(pairs), 1)))
    outs_a, outs_b, scores = [], [], []
    for start in range(0, len(pairs), size):
      batch = pairs[start:start + size]
      valid = len(batch)
      batch = _pad_rows(batch, size)
      out_a, out_b, score = self.functions.indexed_pairs(
          self.variables['matcher'], table, mirrored_table, self._sharded(batch[:, 0]),
          self._sharded(batch[:, 1]), min_mask, flip)
      outs_a.append(np.asarray(out_a)[:valid])
      outs_b.append(np.asarray(out_b)[:valid])
      scores.append(np.asarray(score, np.float64)[:valid])
    if not outs_a:
      h, w = features_all.shape[1:3]
      empty = np.zeros((0, h, w, 3), np.float32)
      return empty, empty, np.zeros((0, 2))
    return np.concatenate(outs_a), np.concatenate(outs_b), np.concatenate(scores)

  def _table(self, features_all, tokens_all=None, hoist: bool = True) -> Dict[str, jax.Array]:
    """A collection on every device, gathered from by index: its features and, when the matcher splits
    (and `hoist`), its tokens (computed here once per image when not given)."""
    table = {'features': self.on_all_devices(features_all)}
    if self.hoists and hoist:
      table['tokens'] = self.on_all_devices(self.tokens(features_all) if tokens_all is None else tokens_all)
    return table

  def pool_scores(self, features_all: jax.Array, pairs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Hard-mining score mean(mask A) + mean(mask B) of pool pairs `(P, 2)` -> `(P,)` float32.

    `features_all` `(N, h, w, C)` (float16 is fine: cast to float32 inside) stays on the devices; each
    image's pair-independent part runs once, not once per pair.
    """
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    table = self._table(features_all)
    size = self.batch_size(batch_size)
    out = []
    for start in range(0, len(pairs), size):
      batch = pairs[start:start + size]
      valid = len(batch)
      batch = _pad_rows(batch, size)
      out.append(np.asarray(self.functions.pool_scores(self.variables['matcher'], table,
                                                 self._sharded(batch[:, 0]), self._sharded(batch[:, 1])))[:valid])
    return np.concatenate(out) if out else np.zeros(0, np.float32)
