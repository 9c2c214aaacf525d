"""On-disk cache of database backbone features: computed once, reused across queries and runs.

Layout of a cache directory:
  index.json            {"meta": {...}, "shard_size": S, "names": [...]} -- row r of the cache is image
                        names[r]; it lives in shard r // S at position r % S.
  features_00000.npy    `(S, h, w, C)` float16 (or float32), memory-mapped .npy shards.
  done_00000.npy        `(S,)` uint8, 1 once the row's features are on disk.

Why memory-mapped .npy shards (rather than zarr or tensorstore): the access pattern is "read one whole
candidate (h, w, C) at a random row", which is one contiguous read of a .npy row served by the OS page
cache, with no chunk bookkeeping or codec; backbone features barely compress, so zarr's codecs would
buy nothing; shards let the cache grow (a later run with a larger top-K appends rows) without rewriting;
any numpy can read the files. Writes are row-disjoint, so several processes (multi-host, on a shared
filesystem) fill one cache concurrently while only process 0 writes the index.

Staleness: `meta` holds everything that changes the features (the backbone parameters' digest, input
size, normalisation, dtype, feature shape); opening a cache whose meta differs raises DataError.
Resumable: rows are marked done only after their features are flushed, so an interrupted fill recomputes
at most one batch.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Callable, Dict, List, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from segswap_jax.errors import DataError
from segswap_jax.model import FEATURE_STRIDE

INDEX_FILE = 'index.json'


class FeatureCache:
  """Rows of backbone features `(h, w, C)` keyed by image name, stored in memory-mapped .npy shards.

  Args:
    directory: cache folder (created if absent).
    meta: JSON-able dict describing how the features were made; must contain `feature_shape`
      `[h, w, C]` and `dtype` ('float16' or 'float32'). A cache with different meta is refused.
    shard_size: rows per shard file (new caches only).
  """

  def __init__(self, directory: str, meta: Dict, shard_size: int = 1024):
    self.directory = directory
    self.meta = json.loads(json.dumps(meta))  # normalise tuples -> lists, as stored
    self.feature_shape = tuple(self.meta['feature_shape'])
    self.dtype = np.dtype(self.meta['dtype'])
    self._shards: Dict[int, np.memmap] = {}
    self._done: Dict[int, np.memmap] = {}
    os.makedirs(directory, exist_ok=True)
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
      self.reload()
    else:
      self.shard_size = int(shard_size)
      self.names: List[str] = []
      self.row_of: Dict[str, int] = {}

  # -- index --------------------------------------------------------------------------------------
  def reload(self) -> None:
    """Re-reads index.json (after another process registered names) and checks it is not stale."""
    index_path = os.path.join(self.directory, INDEX_FILE)
    if not os.path.exists(index_path):
      raise DataError(f'feature cache index {index_path} not found; with several processes the cache folder '
                      '(--cache-dir) must be on a filesystem that all of them share')
    try:
      with open(index_path) as f:
        index = json.load(f)
      stored_meta, shard_size, names = index['meta'], index['shard_size'], index['names']
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f'feature cache index {index_path} is unreadable ({e}); delete the folder') from None
    if stored_meta != self.meta:
      changed = sorted(k for k in set(stored_meta) | set(self.meta) if stored_meta.get(k) != self.meta.get(k))
      raise DataError(f'stale feature cache {self.directory}: it was built with a different '
                      f'{", ".join(changed)} ({ {k: stored_meta.get(k) for k in changed} }); '
                      'delete it or choose another --cache-dir')
    self.shard_size = int(shard_size)
    self.names = list(names)
    self.row_of = {n: i for i, n in enumerate(self.names)}
    self._shards.clear()
    self._done.clear()

  def register(self, names: Sequence[str]) -> None:
    """Appends names not in the cache yet and writes the index (only one process may call this)."""
    new = [n for n in dict.fromkeys(names) if n not in self.row_of]
    if not new and os.path.exists(os.path.join(self.directory, INDEX_FILE)):
      return
    for name in new:
      self.row_of[name] = len(self.names)
      self.names.append(name)
    for shard in range(self._num_shards()):
      self._shard(shard, create=True)
    tmp = os.path.join(self.directory, INDEX_FILE + '.tmp')
    with open(tmp, 'w') as f:
      json.dump({'meta': self.meta, 'shard_size': self.shard_size, 'names': self.names}, f)
    os.replace(tmp, os.path.join(self.directory, INDEX_FILE))

  def _num_shards(self) -> int:
    return -(-len(self.names) // self.shard_size)

  def _shard(self, shard: int, create: bool = False):
    if shard not in self._shards:
      feat_path = os.path.join(self.directory, f'features_{shard:05d}.npy')
      done_path = os.path.join(self.directory, f'done_{shard:05d}.npy')
      if not os.path.exists(feat_path):
        if not create:
          raise DataError(f'feature cache shard missing: {feat_path}')
        # open_memmap makes a sparse file: disk is used only as rows are written.
        np.lib.format.open_memmap(feat_path, 'w+', self.dtype, (self.shard_size, *self.feature_shape)).flush()
        np.lib.format.open_memmap(done_path, 'w+', np.uint8, (self.shard_size,)).flush()
      try:
        self._shards[shard] = np.load(feat_path, mmap_mode='r+')
        self._done[shard] = np.load(done_path, mmap_mode='r+')
      except (OSError, ValueError) as e:
        raise DataError(f'feature cache shard {feat_path} is unreadable ({e}); delete the folder') from None
    return self._shards[shard], self._done[shard]

  # -- rows ---------------------------------------------------------------------------------------
  def rows(self, names: Sequence[str]) -> np.ndarray:
    try:
      return np.array([self.row_of[n] for n in names], np.int64)
    except KeyError as e:
      raise DataError(f'image {e.args[0]!r} is not in the feature cache {self.directory}') from None

  def is_done(self, rows: np.ndarray) -> np.ndarray:
    out = np.zeros(len(rows), bool)
    for i, row in enumerate(rows):
      _, done = self._shard(int(row) // self.shard_size)
      out[i] = bool(done[int(row) % self.shard_size])
    return out

  def write(self, rows: Sequence[int], features: np.ndarray) -> None:
    """Stores `features` `(n, h, w, C)` at `rows`, then marks them done (features flushed first)."""
    touched = set()
    for row, feat in zip(rows, features):
      shard, pos = divmod(int(row), self.shard_size)
      array, _ = self._shard(shard)
      array[pos] = feat.astype(self.dtype)
      touched.add(shard)
    for shard in touched:
      self._shards[shard].flush()
    for row in rows:
      shard, pos = divmod(int(row), self.shard_size)
      self._done[shard][pos] = 1
    for shard in touched:
      self._done[shard].flush()

  def read(self, rows: Sequence[int]) -> np.ndarray:
    """Features of `rows`, `(n, h, w, C)` in the cache dtype (a copy)."""
    out = np.empty((len(rows), *self.feature_shape), self.dtype)
    for i, row in enumerate(rows):
      shard, pos = divmod(int(row), self.shard_size)
      array, done = self._shard(shard)
      if not done[pos]:
        raise DataError(f'feature cache {self.directory}: row {row} ({self.names[row]!r}) was never computed')
      out[i] = array[pos]
    return out

  # -- filling ------------------------------------------------------------------------------------
  def fill(self, names: Sequence[str], load_fn: Callable[[str], np.ndarray],
           features_fn: Callable[[np.ndarray], np.ndarray], batch_size: int,
           process_index: int = 0, process_count: int = 1,
           barrier: Optional[Callable[[str], None]] = None, num_threads: int = 4,
           description: str = 'database features') -> int:
    """Computes and stores the features of every name in `names` that is not cached yet.

    Multi-process: process 0 registers the names, every process then computes a strided share of the
    missing rows (the folder must be shared by the processes), and all meet at `barrier`.

    Args:
      names: image names (keys), e.g. database list entries.
      load_fn: name -> uint8 `(H, W, 3)` image (raises DataError for unreadable files).
      features_fn: uint8 `(B, H, W, 3)` -> `(B, h, w, C)` features; always called with exactly
        `batch_size` images (the last batch is padded by repeating an image) so it compiles once.
      batch_size: images per features_fn call.
      barrier: callable(tag) that blocks until all processes reach it (None for one process).
      num_threads: image-decoding threads (PIL releases the GIL while decoding and resizing).

    Returns:
      the number of rows this process computed.
    """
    barrier = barrier or (lambda tag: None)
    if process_index == 0:
      self.register(names)
    barrier('feature_cache_registered')
    if process_index != 0:
      self.reload()
    rows = self.rows(names)
    rows = np.unique(rows)
    todo = rows[~self.is_done(rows)][process_index::process_count]
    barrier('feature_cache_planned')
    if len(todo):
      batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
      with concurrent.futures.ThreadPoolExecutor(num_threads) as decoders, \
          concurrent.futures.ThreadPoolExecutor(1) as prefetcher, \
          tqdm(total=len(todo), desc=description, unit='img', disable=process_index != 0) as bar:
        load_batch = lambda b: list(decoders.map(load_fn, [self.names[r] for r in b]))
        pending = prefetcher.submit(load_batch, batches[0])
        for i, batch in enumerate(batches):
          images = pending.result()
          if i + 1 < len(batches):  # decode the next batch while this one runs on the device
            pending = prefetcher.submit(load_batch, batches[i + 1])
          images = np.stack(images + [images[-1]] * (batch_size - len(images)))
          feats = np.asarray(features_fn(images))[:len(batch)]
          if feats.shape[1:] != self.feature_shape:
            raise DataError(f'features of shape {feats.shape[1:]} do not fit the cache {self.feature_shape}')
          self.write(batch, feats)
          bar.update(len(batch))
    barrier('feature_cache_filled')
    if process_count > 1:
      self.reload()
    return len(todo)


def model_feature_cache(root: str, backbone_digest: str, image_hw, normalization: str, dtype: str = 'float16',
                        feature_dim: int = 1024, resize: str = 'PIL bilinear',
                        compute_dtype: str = 'float32') -> FeatureCache:
  """The cache for one backbone, input size and normalisation: `root/<digest[:16]>_<W>x<H>_<norm>_<dtype>`.

  `backbone_digest`: the backbone parameters' digest (`SegSwap.digests['backbone']`, written with the
  checkpoint); `compute_dtype`: the model's (bfloat16 features are other numbers). Different backbones or settings get different folders; the meta check inside catches a
  folder reused by hand.
  """
  height, width = image_hw
  stride = FEATURE_STRIDE
  meta = {
      'fingerprint': backbone_digest,
      'image_size': [height, width],
      'normalization': normalization,
      'resize': resize,
      'dtype': np.dtype(dtype).name,
      'feature_shape': [-(-height // stride), -(-width // stride), feature_dim],
  }
  folder = f'{meta["fingerprint"][:16]}_{width}x{height}_{normalization}_{meta["dtype"]}'
  if compute_dtype != 'float32':  # float32 caches keep the meta and folder they always had
    meta['compute_dtype'] = compute_dtype
    folder += f'_{compute_dtype}'
  return FeatureCache(os.path.join(root, folder), meta)


CACHE_FORMATS = ('backbone', 'projected')
UPLOAD_ROWS = 1024  # rows per host-to-device copy when a candidate store goes to the devices


def token_cache(root: str, model_fingerprint: str, features: FeatureCache, d_model: int) -> FeatureCache:
  """The prepared tokens (`SegSwap.tokens`) of the images of the backbone-feature cache `features`:
  `root/tokens_<fingerprint[:16]>_<W>x<H>_<norm>`, float16 `(h, w, d_model)` rows. Keyed on the whole
  model (the tokens depend on the matcher's weights and the compute policy too)."""
  h, w, _ = features.feature_shape
  meta = dict(features.meta, fingerprint=model_fingerprint, backbone_features=features.meta['fingerprint'],
              dtype='float16', feature_shape=[h, w, int(d_model)])
  height, width = features.meta['image_size']
  folder = f'tokens_{model_fingerprint[:16]}_{width}x{height}_{features.meta["normalization"]}'
  return FeatureCache(os.path.join(root, folder), meta)


class CandidateStore:
  """What the scorer reads per candidate: backbone features (cache_format 'backbone'), plus their prepared
  tokens ('projected': the candidate's pair-independent part is then computed once per image, not
  once per query), from the caches on disk or, when they fit in `device_budget_bytes`, from one copy on
  the devices (no host reads or copies while scoring).

  Args:
    model: the inference engine (`segswap_jax.inference.SegSwap`).
    features: the filled backbone-feature cache.
    names: the images the store must serve.
    cache_format: 'backbone' or 'projected'.
    root: cache root (for the token cache).
    batch_size: images per token call while filling.
    device_budget_bytes: bytes the devices may hold for the store (0: always stream from the host).
  """

  def __init__(self, model, features: FeatureCache, names: Sequence[str], cache_format: str, root: str,
               batch_size: int, device_budget_bytes: int = 0, process_index: int = 0, process_count: int = 1,
               barrier: Optional[Callable[[str], None]] = None):
    if cache_format not in CACHE_FORMATS:
      raise DataError(f'cache format must be one of {CACHE_FORMATS}, got {cache_format!r}')
    self.features = features
    self.tokens = None
    self.computed_tokens = 0
    if cache_format == 'projected':
      self.tokens = token_cache(root, model.fingerprint, features, model.config.d_model)
      read_one = lambda name: features.read(features.rows([name]))[0]
      self.computed_tokens = self.tokens.fill(
          names, read_one, lambda batch: model.tokens(batch, batch_size=len(batch)), batch_size,
          process_index, process_count, barrier, num_threads=1, description='database tokens')
    caches = [features] + ([self.tokens] if self.tokens is not None else [])
    self.bytes_per_image = int(sum(np.prod(c.feature_shape) * c.dtype.itemsize for c in caches))
    self._device = None
    self._token_row = {} if self.tokens is None else {
        int(r): int(t) for r, t in zip(features.rows(names), self.tokens.rows(names))}
    if device_budget_bytes and self.bytes_per_image * len(set(names)) <= device_budget_bytes:
      unique = sorted(set(features.rows(names).tolist()))
      self._position = {row: i for i, row in enumerate(unique)}
      # Uploaded in chunks, so the host never holds more than one chunk (the devices hold the store
      # twice while the chunks are joined: the budget is a fraction of their memory).
      chunks = {'features': [], 'tokens': []}
      for start in range(0, len(unique), UPLOAD_ROWS):
        part = unique[start:start + UPLOAD_ROWS]
        chunks['features'].append(model.on_all_devices(features.read(part)))
        if self.tokens is not None:
          chunks['tokens'].append(model.on_all_devices(self.tokens.read([self._token_row[r] for r in part])))
      self._device = {k: jnp.concatenate(v) for k, v in chunks.items() if v}

  @property
  def on_device(self) -> bool:
    return self._device is not None

  def read(self, rows: np.ndarray):
    """Candidates at feature-cache `rows`: features `(n, h, w, C)`, or {'features', 'tokens'}."""
    rows = np.asarray(rows)
    if self._device is not None:
      index = np.array([self._position[int(r)] for r in rows], np.int32)
      out = {k: v[index] for k, v in self._device.items()}
    else:
      out = {'features': self.features.read(rows)}
      if self.tokens is not None:
        out['tokens'] = self.tokens.read(np.array([self._token_row[int(r)] for r in rows], np.int64))
    return out if self.tokens is not None else out['features']


def device_budget_bytes(fraction: float = 0.4) -> int:
  """`fraction` of the first local device's memory when it reports it (accelerators), else 0 (CPU: the
  host page cache already is the fastest store). 0.4: the store is held twice while it is assembled."""
  import jax
  device = jax.local_devices()[0]
  if device.platform == 'cpu':
    return 0
  stats = device.memory_stats() or {}
  return int(fraction * stats.get('bytes_limit', 0))
