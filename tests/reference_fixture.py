"""The reference parity fixture (`tests/fixtures/official_forward_seed7.npz`) and its weight rule."""
import os

import numpy as np

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
FIXTURE_PATH = os.path.join(FIXTURE_DIR, 'official_forward_seed7.npz')


def load_fixture(path: str = FIXTURE_PATH) -> dict:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.moveaxis(x, -3, -1)


def regenerate_checkpoint(fixture: dict) -> dict:
  """Rebuilds the reference-layout checkpoint dict {'backbone': ..., 'encoder': ...} of the fixture.

  docs/reference.md §8: rng = default_rng(seed); for each key in order, w = standard_normal(shape) * scale + offset.
  BatchNorm `num_batches_tracked` entries are added as the reference state dict has them.
  """
  rng = np.random.default_rng(int(fixture['seed']))
  checkpoint = {'backbone': {}, 'encoder': {}}
  for key, shape, scale, offset in zip(fixture['keys'], fixture['shapes'], fixture['scales'], fixture['offsets']):
    shape = tuple(int(s) for s in str(shape).strip('()').split(',') if s.strip())
    value = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale) + np.float32(offset)
    part, name = str(key).split('.', 1)
    checkpoint[part][name] = value
    if name.endswith('running_var'):
      checkpoint[part][name.replace('running_var', 'num_batches_tracked')] = np.array(0, np.int64)
  return checkpoint
