"""Scores many pairs of one image collection, for discovery (docs/reference.md §7 "Pairs").

Backbone features are computed once per image (and once per mirrored image when flips are on) and stay
on the devices; pairs then run in fixed-size batches of the inference engine that gather their features
by index, run the transformer (twice with flips), pick the flip (`scoring.choose_flip`), and compute the
Internet pair scores (`SegSwap.indexed_pairs`). Results of kept pairs go to a resumable on-disk cache in
chunks.

Flip modes: 'reference' (the released code, for parity), 'corrected' (geometrically right), 'none'.
Scores always use the unmirrored features, as the reference does.

Normalisation: standard ImageNet normalisation by default; `denormalize=True` reproduces the released
Internet loader, which feeds x * std + mean (docs/reference.md §10).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from eval import discovery
from segswap_jax import errors
from segswap_jax import features as features_lib
from segswap_jax import images as images_lib
from segswap_jax import inference
from segswap_jax import model as model_lib
from segswap_jax import scoring

FLIP_MODES = scoring.FLIP_MODES
META_FILE = 'meta.json'


def collection_features(model: inference.SegSwap, images: np.ndarray, batch_size: int = 8,
                        denormalize: bool = False, mirror: bool = False, desc: str = 'features') -> jax.Array:
  """L2-normalised backbone features of every image, `(N, h, w, C)` on the devices.

  Args:
    images: uint8 `(N, H, W, 3)` RGB, H and W multiples of 16.
    mirror: features of the horizontally mirrored images instead.
  """
  images = np.asarray(images)
  if mirror:
    images = np.ascontiguousarray(images[:, :, ::-1])
  with tqdm(total=len(images), desc=desc, unit='image', leave=False) as progress:
    return model.features(images, 'denormalized' if denormalize else 'imagenet', batch_size,
                          progress=progress.update)


def global_descriptors(features: jax.Array) -> np.ndarray:
  """`(N, h, w, C)` L2-normalised local features -> `(N, C)` mean-pooled, L2-normalised descriptors."""
  return np.asarray(features_lib.l2_normalize(jnp.mean(features, axis=(1, 2))))


def candidate_pairs(descriptors: np.ndarray, max_pairs_per_image: Optional[int]) -> np.ndarray:
  """Pairs (i < j) worth running: each image with its `max_pairs_per_image` most similar images.

  Cosine similarity of the global descriptors; the union over images of their top-K neighbours, so the
  transformer runs O(N K) pairs instead of N (N - 1) / 2. `None` (or K >= N - 1) gives every pair.

  Returns:
    `(P, 2)` int64, sorted.
  """
  n = len(descriptors)
  if max_pairs_per_image is None or max_pairs_per_image >= n - 1:
    i, j = np.triu_indices(n, k=1)
    return np.stack([i, j], axis=1).astype(np.int64)
  if max_pairs_per_image < 1:
    raise errors.ConfigError(f'max_pairs_per_image must be >= 1, got {max_pairs_per_image}')
  pairs = []
  for start in range(0, n, 1024):  # similarity rows in blocks: never an N x N matrix at once
    similarity = descriptors[start:start + 1024] @ descriptors.T
    rows = np.arange(start, start + len(similarity))
    similarity[rows - start, rows] = -np.inf
    neighbours = np.argpartition(-similarity, max_pairs_per_image - 1, axis=1)[:, :max_pairs_per_image]
    pairs.append(np.stack([np.repeat(rows, max_pairs_per_image), neighbours.reshape(-1)], axis=1))
  pairs = np.concatenate(pairs)
  pairs = np.unique(np.sort(pairs, axis=1), axis=0)
  return pairs.astype(np.int64)


def _fingerprint(settings: dict) -> dict:
  text = json.dumps(settings, sort_keys=True)
  return dict(settings, fingerprint=hashlib.sha1(text.encode()).hexdigest())


def _open_cache(cache_dir: str, settings: dict) -> None:
  """Makes `cache_dir` the cache of `settings`: chunks written with other settings (another model, other
  images, flips, ...) are removed, saying what differed, so they are computed again and never reused."""
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, META_FILE)
  meta = _fingerprint(settings)
  if os.path.exists(path):
    try:
      with open(path) as f:
        stored = json.load(f)
    except (OSError, ValueError):
      stored = {}
    if stored.get('fingerprint') == meta['fingerprint']:
      return
    differing = sorted(k for k in set(settings) | set(stored) - {'fingerprint'} if stored.get(k) != settings.get(k))
    print(f'note: {cache_dir} holds pair outputs of another run (differs in: {", ".join(differing)}); '
          'computing them again', file=sys.stderr, flush=True)
    for chunk in cached_chunks(cache_dir):
      os.remove(chunk)
  temporary = path + '.tmp'
  with open(temporary, 'w') as f:
    json.dump(meta, f, indent=1)
  os.replace(temporary, path)


def score_pairs(model: inference.SegSwap, images: np.ndarray, pairs: np.ndarray,
                cache_dir: Optional[str] = None, flip: str = 'reference', denormalize: bool = False,
                batch_size: int = 32, chunk_pairs: int = 1024, keep_all: bool = False,
                cache_key: Optional[dict] = None, desc: str = 'pairs', features: Optional[jax.Array] = None,
                mirrored: Optional[jax.Array] = None, cache_format: str = 'projected') -> discovery.PairSet:
  """Runs the model on `pairs` of `images` and returns the kept pairs as a `discovery.PairSet`.

  Args:
    model: a loaded `SegSwap`.
    images: uint8 `(N, H, W, 3)` RGB, all of one size (multiples of 16).
    pairs: `(P, 2)` image indices (i < j).
    cache_dir: where chunk results are stored (`chunk_<start>_<end>.npz` with the kept pairs' outputs);
      a rerun skips finished chunks. `meta.json` records the settings; a mismatch is an error.
    flip: 'reference', 'corrected' or 'none' (module doc).
    denormalize: feed x * std + mean like the released Internet loader (default: standard).
    keep_all: keep every pair (not only those whose best score passes `discovery.keep_threshold`).
    cache_key: extra settings that identify the run in the cache (e.g. the image names); the model's
      fingerprint (its parameters' digest and config) is always part of the key, so outputs of another
      model are never reused.
    features, mirrored: precomputed `collection_features` of the images (and of their mirrors), to
      avoid computing them twice; computed here when needed and not given.
    cache_format: 'projected' keeps each image's transformer tokens on the devices (its pair-independent
      part runs once per image), 'backbone' only its features (less memory, recomputed per pair).
      The same outputs either way (to float rounding).
  """
  if flip not in FLIP_MODES:
    raise errors.ConfigError(f'unknown flip mode {flip!r}; expected one of {FLIP_MODES}')
  images = np.asarray(images)
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  n = len(images)
  images_lib.check_image_size(*images.shape[1:3])
  h, w = images.shape[1] // model_lib.FEATURE_STRIDE, images.shape[2] // model_lib.FEATURE_STRIDE
  threshold = discovery.keep_threshold((h, w))
  chunk_pairs = max(batch_size, chunk_pairs // batch_size * batch_size)
  bounds = [(s, min(s + chunk_pairs, len(pairs))) for s in range(0, len(pairs), chunk_pairs)]
  if cache_dir:
    pair_hash = hashlib.sha1(pairs.tobytes()).hexdigest()
    _open_cache(cache_dir, dict(cache_key or {}, model=model.fingerprint, flip=flip, denormalize=denormalize,
                                keep_all=keep_all,
                                image_shape=list(images.shape), pairs=pair_hash, chunk_pairs=chunk_pairs))

  def chunk_path(start, end):
    return os.path.join(cache_dir, f'chunk_{start:08d}_{end:08d}.npz') if cache_dir else None

  todo = [b for b in bounds if not (cache_dir and os.path.exists(chunk_path(*b)))]
  results = {}
  if todo:
    if features is None:
      features = collection_features(model, images, denormalize=denormalize)
    if flip == 'none':
      mirrored = features
    elif mirrored is None:
      mirrored = collection_features(model, images, denormalize=denormalize, mirror=True, desc='mirrored')
    features = model.on_all_devices(features)
    mirrored = features if flip == 'none' else model.on_all_devices(mirrored)
    progress = tqdm(total=sum(e - s for s, e in todo), desc=desc, unit='pair')
    for start, end in todo:
      out_a, out_b, scores = model.indexed_pairs(features, mirrored, pairs[start:end], threshold, flip,
                                                 batch_size, cache_format=cache_format)
      progress.update(end - start)
      kept = np.ones(len(scores), bool) if keep_all else scores.max(axis=1) > threshold
      result = dict(pair_index=np.arange(start, end)[kept], out_a=out_a[kept], out_b=out_b[kept],
                    scores=scores[kept], all_scores=scores)
      if cache_dir:
        temporary = chunk_path(start, end) + '.tmp.npz'
        np.savez(temporary, **result)
        os.replace(temporary, chunk_path(start, end))  # a killed run never leaves a half-written chunk
      results[start] = result
    progress.close()
  for start, end in bounds:
    if start not in results:
      try:
        with np.load(chunk_path(start, end)) as stored:
          results[start] = {k: stored[k] for k in stored.files}
      except (OSError, ValueError, KeyError) as e:
        raise errors.DataError(f'{chunk_path(start, end)}: unreadable cache chunk ({e}); delete it') from e
  ordered = [results[s] for s, _ in bounds]
  index = np.concatenate([r['pair_index'] for r in ordered]) if ordered else np.zeros(0, np.int64)
  if len(index) == 0:
    empty = np.zeros((0, h, w, 3), np.float32)
    return discovery.make_pair_set(n, np.zeros((0, 2)), empty, empty, np.zeros((0, 2)))
  return discovery.make_pair_set(n, pairs[index], np.concatenate([r['out_a'] for r in ordered]),
                                 np.concatenate([r['out_b'] for r in ordered]),
                                 np.concatenate([r['scores'] for r in ordered]))


def cached_chunks(cache_dir: str) -> Sequence[str]:
  """Finished chunk files of a cache directory, in order."""
  return sorted(glob.glob(os.path.join(cache_dir, 'chunk_*_*.npz')))
