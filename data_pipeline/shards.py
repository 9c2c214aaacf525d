"""Work shards: pairs made, styled and encoded in fixed index ranges (the unit of parallelism and resume).

Pair `index` of split `split` is a pure function of (config, split, index): its random generator is
seeded with (seed, split code, index), and every draw of the pair (rejected placements, skipped images,
styles) comes from it. So shards can run in any order, on any number of processes, and a killed run
redoes only its missing shards; the dataset is identical either way.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from typing import Dict, List, Tuple

import numpy as np

from data_pipeline import blend
from data_pipeline import builder
from data_pipeline import segments
from data_pipeline import style
from data_pipeline import swap
from segswap_jax.errors import DataError, ImageError

SPLIT_CODES = {'train': 0, 'validation': 1}


def split_sizes(config) -> Dict[str, int]:
  """Number of pairs per split (a split of size 0 is left out)."""
  sizes = {'train': int(config.num_pairs), 'validation': int(config.num_validation)}
  return {split: n for split, n in sizes.items() if n > 0}


def shard_ranges(num_pairs: int, shard_size: int) -> List[Tuple[int, int]]:
  """[start, stop) index ranges of the shards of a split."""
  return [(start, min(start + shard_size, num_pairs)) for start in range(0, num_pairs, shard_size)]


def shard_path(work_dir: str, split: str, shard: int) -> str:
  return os.path.join(work_dir, f'{split}-{shard:05d}.pkl')


def swap_params(config) -> swap.SwapParams:
  """SwapParams of a data config."""
  fields = {f.name for f in dataclasses.fields(swap.SwapParams)}
  values = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in config.swap.to_dict().items() if k in fields}
  return swap.SwapParams(image_size=int(config.image_size), **values)


def empty_stats() -> Dict[str, object]:
  return {'pairs': 0, 'rejected': 0, 'bad_images': {}}


class PairMaker:
  """Source, styliser and parameters of one generation run; makes examples and whole shards."""

  def __init__(self, config):
    self.config = config
    self.params = swap_params(config)
    self.source = segments.make_source(config)
    fallback = [self.source.image_path(i) for i in range(min(len(self.source), 256))]
    self.stylizer = style.make_stylizer(config.style, fallback)

  def draw_pair(self, rng: np.random.Generator, num_objects: int):
    """One attempt at a pair and its scene keys (source of A and its objects, background of B);
    None when the draw is rejected. May raise ImageError."""
    paste = blend.choose_paste(rng, float(self.config.get('poisson_prob', 1.0)),
                               float(self.config.get('copy_feather', 0.0)))
    if num_objects == 1:
      draw = self.source.sample_one(rng)
      if draw is None:
        return None
      background, segment = draw
      pair = swap.one_object_pair(rng, self.source.load_image(segment.image),
                                  self.source.segment_mask(segment),
                                  self.source.load_image(background), self.params, paste)
    else:
      draw = self.source.sample_two(rng)
      if draw is None:
        return None
      background, segment, second = draw
      pair = swap.two_object_pair(rng, self.source.load_image(segment.image),
                                  [self.source.segment_mask(segment), self.source.segment_mask(second)],
                                  self.source.load_image(background), self.params, paste)
    if pair is None:
      return None
    return pair, self.source.scene(segment.image), self.source.scene(background)

  def example(self, split: str, index: int, stats: Dict[str, object]) -> Dict[str, object]:
    """The stored example of pair `index` of `split` (JPEG bytes + ground truth)."""
    rng = np.random.default_rng([int(self.config.seed), SPLIT_CODES[split], int(index)])
    num_objects = 2 if rng.random() < self.config.two_object_fraction else 1
    for _ in range(int(self.config.max_attempts)):
      try:
        drawn = self.draw_pair(rng, num_objects)
        if drawn is None:
          stats['rejected'] += 1
          continue
        pair, scene_a, scene_background = drawn
        styled_a = self.stylizer(pair.image_a, rng)
        styled_b = self.stylizer(pair.image_b, rng)
      except ImageError as e:
        stats['bad_images'][e.path] = e.reason
        continue
      stats['pairs'] += 1
      quality = self.config.jpeg_quality
      return {
          'image_a': builder.encode_jpeg(pair.image_a, quality),
          'image_b': builder.encode_jpeg(pair.image_b, quality),
          'image_a_styled': builder.encode_jpeg(styled_a, quality),
          'image_b_styled': builder.encode_jpeg(styled_b, quality),
          'corr_a': pair.corr_a, 'corr_b': pair.corr_b,
          'mask_a': pair.mask_a, 'mask_b': pair.mask_b,
          'num_objects': int(pair.num_objects), 'source': str(self.config.source),
          'scene_a': scene_a, 'scene_background': scene_background,
      }
    bad = stats['bad_images']
    detail = ''
    if bad:
      example = next(iter(bad))
      detail = f'; unusable images so far: {len(bad)}, e.g. {example}: {bad[example]}'
    raise DataError(f'{split} pair {index}: no valid {num_objects}-object pair after '
                    f'{self.config.max_attempts} draws ({stats["rejected"]} rejected){detail}')

  def make_shard(self, work_dir: str, split: str, shard: int, start: int, stop: int
                 ) -> Dict[str, object]:
    """Makes pairs [start, stop) of `split` and writes them atomically; returns the shard's stats."""
    stats = empty_stats()
    examples = [(index, self.example(split, index, stats)) for index in range(start, stop)]
    path = shard_path(work_dir, split, shard)
    temporary = f'{path}.tmp{os.getpid()}'
    with open(temporary, 'wb') as f:
      pickle.dump({'examples': examples, 'stats': stats}, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(temporary, path)  # A killed run never leaves a half-written shard under the real name.
    return stats


def read_shard(path: str) -> Dict[str, object]:
  with open(path, 'rb') as f:
    return pickle.load(f)
