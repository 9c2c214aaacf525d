"""Stage-2 hard-negative mining (configs/hardmining.py): pools of training images, scored by the model.

The reference (docs/reference.md §2, stage 2) re-draws, every epoch, a pool of 500 augmented training images, scores
all 124,750 pool pairs with the current model in eval mode (mean mask of A + mean mask of B), zeroes
scores <= 0.04, and adds 5 pool pairs per iteration, drawn in proportion to the score, as extra
negatives. Ours does the same in rounds of `hard_mining.round_steps` steps:

  round r (steps [r R, (r + 1) R)):
    pool     `pool_size` training pairs drawn without replacement by (seed, r); of each one image: side
             A or B (p 1/2), stylised or not (p 1/2), a random resized crop (scale 0.08-1, ratio 3/4-4/3)
             back to the training size, a horizontal flip (p 1/2). Pool images come from distinct stored
             pairs, so no pool pair is a true positive.
    features the frozen backbone's, once per round, through the inference engine (float16), kept on
             the devices for the round: for scoring, and for the steps, which gather their negatives
             from it by index (no features cross the host per step);
    scores   every pool pair, eval mode, each process its share on its own devices (the engine gathers
             features by index on the device), gathered; <= zero_below -> 0.
  each step: `num_hard` pairs per device drawn without replacement with probability proportional to
             the score (uniformly when no pair scores above 0), by (seed, step) for the whole global
             batch so any topology draws the same ones; their pool indices go into the batch as
             `hard_index_a` / `hard_index_b` int32 `(D, num_hard)`, the pool itself (`pool`, replicated
             `(D, P, h, w, C)` float16) into the step's constant tree as `hard_pool`.

Differences from the reference, on purpose: rounds have a fixed length (the reference runs
min(#scores > 0.1, 100) iterations and redraws pools with too few hard pairs); the pool images are not
removed from the round's positives (with 200k pairs, a 500-image pool meets a round's 500 positives per
device about 1.25 times per device; the reference removes them). A round's pool and scores are saved in
the workdir (`hard_mining/round_R.npz`), so a resumed run draws exactly the same negatives.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipeline import builder
from segswap_jax import errors
from segswap_jax import inference
from segswap_jax import multihost
from segswap_jax.training import step as step_lib


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """torchvision's RandomResizedCrop (10 tries, then the central crop), bilinear, to `size` x `size`."""
  height, width = image.shape[:2]
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      break
  else:
    h, w = height, width
    top = left = 0
  crop = image[top:top + h, left:left + w]
  return cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)


def pool_image(example: Dict[str, object], rng: np.random.Generator, size: int) -> np.ndarray:
  """One augmented pool image (RGB uint8) from a stored pair."""
  side = 'a' if rng.random() < 0.5 else 'b'
  name = f'image_{side}_styled' if rng.random() < 0.5 else f'image_{side}'
  image = random_resized_crop(builder.decode_jpeg(example[name]), rng, size)
  if rng.random() < 0.5:
    image = image[:, ::-1]
  return np.ascontiguousarray(image)


def pool_pairs(pool_size: int) -> np.ndarray:
  """All unordered pairs (i < j) of a pool, `(P (P - 1) / 2, 2)` int32."""
  first, second = np.triu_indices(pool_size, k=1)
  return np.stack([first, second], axis=1).astype(np.int32)


def draw_negatives(scores: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
  """`count` pair indices drawn without replacement with probability proportional to `scores`
  (uniformly over all pairs when none is positive; with replacement if too few are)."""
  positive = np.flatnonzero(scores > 0)
  if positive.size == 0:
    return rng.choice(len(scores), size=count, replace=count > len(scores))
  weights = scores[positive] / scores[positive].sum()
  return positive[rng.choice(positive.size, size=count, replace=count > positive.size, p=weights)]


def _shard_of(count: int) -> Tuple[int, int]:
  """[start, stop) of this process's share of `count` items."""
  per_process = -(-count // jax.process_count())
  start = min(count, jax.process_index() * per_process)
  return start, min(count, start + per_process)


class HardNegativeMiner:
  """Hands each train step its mined negatives (see the module doc)."""

  def __init__(self, dataset_dir: str, model_config: ml_collections.ConfigDict,
               config: ml_collections.ConfigDict, workdir: str):
    self.settings = config.hard_mining
    self.seed = int(config.seed)
    self.image_size = int(config.data.image_size)
    self.model_config = model_config
    self.source = builder.data_source(dataset_dir, 'train')
    if self.settings.pool_size < 2 or self.settings.pool_size > len(self.source):
      raise errors.ConfigError(f'config.hard_mining.pool_size={self.settings.pool_size} must be in [2, '
                               f'{len(self.source)}] (the training pairs)')
    self.directory = os.path.join(workdir, 'hard_mining')
    self.pairs = pool_pairs(self.settings.pool_size)
    self._round: Optional[int] = None
    self.pool = None             # (D, P, h, w, C) float16 replicated on the local devices (pmap layout)
    self._scores = None          # (num pairs,)
    self._num_devices = jax.local_device_count()

  def round_of(self, step: int) -> int:
    return step // self.settings.round_steps

  def _pool_indices(self, round_index: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, round_index, 1])
    return np.sort(rng.choice(len(self.source), size=self.settings.pool_size, replace=False))

  def _pool_images(self, round_index: int) -> np.ndarray:
    images = []
    for rank, index in enumerate(self._pool_indices(round_index)):
      rng = np.random.default_rng([self.seed, round_index, 2, rank])
      images.append(pool_image(self.source[int(index)], rng, self.image_size))
    return np.stack(images)

  def _prepare_round(self, round_index: int, params: dict) -> None:
    path = os.path.join(self.directory, f'round_{round_index}.npz')
    model = inference.SegSwap(params, self.model_config)
    features = model.features(self._pool_images(round_index)).astype(jnp.float16)
    self.pool = step_lib.replicate(np.asarray(features))
    if os.path.isfile(path):
      self._scores = np.load(path)['scores']
    else:
      start, stop = _shard_of(len(self.pairs))
      local = model.pool_scores(features, self.pairs[start:stop], self.settings.batch_size)
      scores = multihost.concat_over_processes(local.astype(np.float32))
      scores = np.where(scores > self.settings.zero_below, scores, 0.0).astype(np.float32)
      self._scores = scores
      if jax.process_index() == 0:
        os.makedirs(self.directory, exist_ok=True)
        np.savez(path + '.tmp.npz', scores=scores, pool=self._pool_indices(round_index))
        os.replace(path + '.tmp.npz', path)
    self._round = round_index

  def round_summary(self) -> Dict[str, float]:
    """How hard the current round's pool is: pairs scoring above `min_score`, the best score."""
    return {'hard_pairs_above_min_score': int(np.sum(self._scores > self.settings.min_score)),
            'hard_score_max': float(self._scores.max())}

  def negatives(self, step: int, model_params: Callable[[], dict]) -> Dict[str, np.ndarray]:
    """Mined negatives of `step` for this process's devices: pool indices hard_index_a / hard_index_b
    int32 `(D, num_hard)` into `pool`. `model_params()` gives the current model tree (called only when
    a new round starts)."""
    round_index = self.round_of(step)
    if round_index != self._round:
      self._prepare_round(round_index, model_params())
    per_device = self.settings.num_hard
    global_devices = jax.device_count()
    rng = np.random.default_rng([self.seed, step, 3])
    chosen = draw_negatives(self._scores, global_devices * per_device, rng)
    first = jax.process_index() * self._num_devices * per_device
    mine = self.pairs[chosen[first:first + self._num_devices * per_device]]
    shape = (self._num_devices, per_device)
    return {'hard_index_a': mine[:, 0].astype(np.int32).reshape(shape),
            'hard_index_b': mine[:, 1].astype(np.int32).reshape(shape)}
