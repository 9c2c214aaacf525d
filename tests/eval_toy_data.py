"""Shared helpers of the eval tests: a tiny random model and miniature datasets in the real on-disk formats.

Images are the real photographs bundled with scikit-image; positions and baseline rankings are made up
so that the expected recalls can be worked out by hand in the tests.
"""
import os

import jax
import numpy as np
import scipy.io
import skimage
from PIL import Image

from segswap_jax import checkpoints
from segswap_jax import model as model_lib

SKIMAGE_DATA = os.path.join(os.path.dirname(skimage.__file__), 'data')
PHOTOS = ['astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg', 'motorcycle_left.png',
          'motorcycle_right.png', 'hubble_deep_field.jpg', 'retina.jpg', 'ihc.png']


def photo(index: int) -> Image.Image:
  return Image.open(os.path.join(SKIMAGE_DATA, PHOTOS[index % len(PHOTOS)])).convert('RGB')


def random_params(config, seed: int = 0) -> dict:
  """Random parameters of `config` without running Flax init (seconds, not tens of seconds, on CPU).

  He-normal convolution kernels, Glorot-normal dense kernels, small random biases, identity BatchNorm.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, shape_dtype):
    name = jax.tree_util.keystr(path)
    shape = shape_dtype.shape
    if name.endswith("['kernel']"):
      fan_in = int(np.prod(shape[:-1]))
      fan_out = shape[-1]
      std = np.sqrt(2.0 / fan_in) if len(shape) == 4 else np.sqrt(2.0 / (fan_in + fan_out))
      return (rng.standard_normal(shape) * std).astype(np.float32)
    if name.endswith("['scale']") or name.endswith("['var']"):
      return np.ones(shape, np.float32)
    if name.endswith("['mean']") or '_bn' in name or "['bn" in name:  # BatchNorm shift and mean
      return np.zeros(shape, np.float32)
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, checkpoints.abstract_params(config))


def tiny_checkpoint(directory: str, seed: int = 0) -> str:
  """A saved tiny random model (model_config('tiny')), loadable with `checkpoints.load_model`."""
  config = model_lib.model_config('tiny')
  return checkpoints.save_model(directory, random_params(config, seed), config)


def save_photo(path: str, index: int, size_wh) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  photo(index).resize(size_wh, Image.BILINEAR).save(path)


def write_db_struct(path: str, db_names, db_utm, qry_names, qry_utm, which_set: str = 'test') -> None:
  """A NetVLAD dbStruct .mat (fields in NetVLAD's order), written with scipy.io.savemat."""
  def cell(names):
    out = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
      out[i, 0] = n
    return out

  scipy.io.savemat(path, {'dbStruct': {
      'whichSet': which_set,
      'dbImageFns': cell(db_names),
      'utmDb': np.asarray(db_utm, np.float64).T,
      'qImageFns': cell(qry_names),
      'utmQ': np.asarray(qry_utm, np.float64).T,
      'numImages': float(len(db_names)),
      'numQueries': float(len(qry_names)),
      'posDistThr': 25.0,
      'posDistSqThr': 625.0,
      'nonTrivPosDistSqThr': 100.0,
  }})
