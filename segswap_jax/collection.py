"""Scores many pairs of one image collection on the accelerator, for discovery (SPEC §5 step 1).

Backbone features are computed once per image (and once per mirrored image when flips are on) and stay
on the device; pairs then run in fixed-size jitted batches that gather their features by index, run the
transformer (twice with flips), pick the flip, and compute the Internet pair scores, so each batch is
one device call and compiles once. Results of kept pairs go to a resumable on-disk cache in chunks.

Flip handling (`flip`), REFERENCE_EVAL §4 step A: each pair (i, j) also runs on (i, mirror of j); the
mirrored run is used when its mask on i sums higher. Then
  * 'reference': out_a from the mirrored run unchanged; out_b with x -> 1 - x and its mask flipped
    up-down, maps not mirrored back (the released code, geometrically inconsistent; for parity);
  * 'corrected': out_a with x -> 1 - x (its targets expressed in the unmirrored j); out_b mirrored
    left-right as a map (it lives on the mirrored grid), its x (pointing into i) unchanged;
  * 'none': no mirrored runs.
Scores always use the unmirrored features, as the reference does.

Normalisation: standard ImageNet normalisation by default; `denormalize=True` reproduces the released
Internet loader, which feeds x * std + mean (REFERENCE_EVAL §0).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from eval import discovery
from segswap_jax import inference
from segswap_jax import model as model_lib
from segswap_jax import scoring

FLIP_MODES = ('reference', 'corrected', 'none')
META_FILE = 'meta.json'


class CollectionError(ValueError):
  """A collection or cache that cannot be used; the message names the file or setting."""


def _input_images(images, denormalize: bool):
  """uint8 RGB -> backbone input: ImageNet-normalised, or the released loader's x * std + mean."""
  if not denormalize:
    return model_lib.normalize_images(images)
  x = jnp.asarray(images, jnp.float32) / 255.0
  return x * jnp.asarray(model_lib.IMAGENET_STD, jnp.float32) + jnp.asarray(model_lib.IMAGENET_MEAN, jnp.float32)


@functools.partial(jax.jit, static_argnames=('backbone', 'denormalize'))
def _features(backbone_vars, images, backbone, denormalize):
  return model_lib.l2_normalize(backbone.apply(backbone_vars, _input_images(images, denormalize)))


def collection_features(model: inference.SegSwap, images: np.ndarray, batch_size: int = 8,
                        denormalize: bool = False, mirror: bool = False, desc: str = 'features') -> jax.Array:
  """L2-normalised backbone features of every image, `(N, h, w, 1024)` on the device.

  Args:
    images: uint8 `(N, H, W, 3)` RGB, H and W multiples of 16.
    mirror: features of the horizontally mirrored images instead.
  """
  images = np.asarray(images)
  inference.check_image_size(*images.shape[1:3])
  backbone = model_lib.build_backbone(model.config)
  chunks = []
  batch_size = max(1, min(batch_size, len(images)))
  for start in tqdm(range(0, len(images), batch_size), desc=desc, unit='batch', leave=False):
    batch = images[start:start + batch_size]
    valid = len(batch)
    if valid < batch_size:  # static shape: pad with copies of the last image
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - valid, 0)])
    if mirror:
      batch = batch[:, :, ::-1]
    chunks.append(_features(model.params['backbone'], jnp.asarray(batch), backbone, denormalize)[:valid])
  return jnp.concatenate(chunks)


def global_descriptors(features: jax.Array) -> np.ndarray:
  """`(N, h, w, C)` L2-normalised local features -> `(N, C)` mean-pooled, L2-normalised descriptors."""
  return np.asarray(model_lib.l2_normalize(jnp.mean(features, axis=(1, 2))))


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
    raise CollectionError(f'max_pairs_per_image must be >= 1, got {max_pairs_per_image}')
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


def _apply_flip(out, out_mirror, mode: str):
  """Replaces (out_a, out_b) of a pair by the mirrored run's, mapped as `mode` says (see module doc)."""
  out_a, out_b = out_mirror
  if mode == 'reference':
    out_b = jnp.concatenate([1.0 - out_b[..., :1], out_b[..., 1:2], out_b[..., ::-1, :, 2:]], axis=-1)
  else:  # corrected
    out_a = jnp.concatenate([1.0 - out_a[..., :1], out_a[..., 1:]], axis=-1)
    out_b = out_b[:, :, ::-1, :]
  return out_a, out_b


@functools.partial(jax.jit, static_argnames=('transformer', 'flip'))
def _pair_batch(transformer_vars, features, mirrored, index_i, index_j, min_mask, transformer, flip):
  """One batch of pairs: outputs `(B, h, w, 3)` on each side and scores `(B, 2)` = (s_ij, s_ji)."""
  feat_i = features[index_i]
  feat_j = features[index_j]
  out_a, out_b = transformer.apply(transformer_vars, feat_i, feat_j, train=False)
  if flip != 'none':
    mirror_a, mirror_b = transformer.apply(transformer_vars, feat_i, mirrored[index_j], train=False)
    use = jnp.sum(mirror_a[..., 2], axis=(1, 2)) > jnp.sum(out_a[..., 2], axis=(1, 2))
    flip_a, flip_b = _apply_flip((out_a, out_b), (mirror_a, mirror_b), flip)
    out_a = jnp.where(use[:, None, None, None], flip_a, out_a)
    out_b = jnp.where(use[:, None, None, None], flip_b, out_b)
  weight_a = scoring.cycle_weight(out_a, out_b)
  weight_b = scoring.cycle_weight(out_b, out_a)
  valid = (jnp.sum(weight_a, axis=(1, 2)) >= min_mask) & (jnp.sum(weight_b, axis=(1, 2)) >= min_mask)
  scores = jnp.stack([scoring.pair_score(feat_i, feat_j, out_a, weight_a),
                      scoring.pair_score(feat_j, feat_i, out_b, weight_b)], axis=-1)
  return out_a, out_b, jnp.where(valid[:, None], scores, 0.0)


def _fingerprint(settings: dict) -> dict:
  text = json.dumps(settings, sort_keys=True)
  return dict(settings, fingerprint=hashlib.sha1(text.encode()).hexdigest())


def _open_cache(cache_dir: str, settings: dict) -> None:
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, META_FILE)
  meta = _fingerprint(settings)
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored.get('fingerprint') != meta['fingerprint']:
      differing = sorted(k for k in settings if stored.get(k) != settings[k])
      raise CollectionError(f'{cache_dir}: cache was written with other settings ({", ".join(differing)}); '
                            'use a new --cache_dir or delete this one')
  else:
    with open(path, 'w') as f:
      json.dump(meta, f, indent=1)


def score_pairs(model: inference.SegSwap, images: np.ndarray, pairs: np.ndarray,
                cache_dir: Optional[str] = None, flip: str = 'reference', denormalize: bool = False,
                batch_size: int = 32, chunk_pairs: int = 1024, keep_all: bool = False,
                cache_key: Optional[dict] = None, desc: str = 'pairs', features: Optional[jax.Array] = None,
                mirrored: Optional[jax.Array] = None) -> discovery.PairSet:
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
    cache_key: extra settings that identify the run in the cache (e.g. checkpoint, image names).
    features, mirrored: precomputed `collection_features` of the images (and of their mirrors), to
      avoid computing them twice; computed here when needed and not given.
  """
  if flip not in FLIP_MODES:
    raise CollectionError(f'unknown flip mode {flip!r}; expected one of {FLIP_MODES}')
  images = np.asarray(images)
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  n = len(images)
  h, w = images.shape[1] // model_lib.FEATURE_STRIDE, images.shape[2] // model_lib.FEATURE_STRIDE
  threshold = discovery.keep_threshold((h, w))
  chunk_pairs = max(batch_size, chunk_pairs // batch_size * batch_size)
  bounds = [(s, min(s + chunk_pairs, len(pairs))) for s in range(0, len(pairs), chunk_pairs)]
  if cache_dir:
    pair_hash = hashlib.sha1(pairs.tobytes()).hexdigest()
    _open_cache(cache_dir, dict(cache_key or {}, flip=flip, denormalize=denormalize, keep_all=keep_all,
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
    transformer = model_lib.build_transformer(model.config)
    progress = tqdm(total=sum(e - s for s, e in todo), desc=desc, unit='pair')
    for start, end in todo:
      outs_a, outs_b, scores = [], [], []
      for lo in range(start, end, batch_size):
        batch = pairs[lo:min(lo + batch_size, end)]
        valid = len(batch)
        if valid < batch_size:
          batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - valid, 0)])
        out_a, out_b, score = _pair_batch(model.params['transformer'], features, mirrored,
                                          jnp.asarray(batch[:, 0]), jnp.asarray(batch[:, 1]),
                                          threshold, transformer, flip)
        outs_a.append(np.asarray(out_a)[:valid])
        outs_b.append(np.asarray(out_b)[:valid])
        scores.append(np.asarray(score, np.float64)[:valid])
        progress.update(valid)
      scores = np.concatenate(scores)
      kept = np.ones(len(scores), bool) if keep_all else scores.max(axis=1) > threshold
      result = dict(pair_index=np.arange(start, end)[kept], out_a=np.concatenate(outs_a)[kept],
                    out_b=np.concatenate(outs_b)[kept], scores=scores[kept], all_scores=scores)
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
        raise CollectionError(f'{chunk_path(start, end)}: unreadable cache chunk ({e}); delete it') from e
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
