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


def constant_output_checkpoint(directory: str, seed: int = 0) -> str:
  """A tiny random model whose transformer outputs are constant (x, y, mask) for every cell.

  Every query cell then points at one target cell t and gets one weight w, so a candidate scores
  w * max_c <f_q(c), f_d(t)>: an exact copy of the query scores w (the most any candidate can), other
  photographs less. That makes the re-ranked order, hence its recall, predictable by hand.
  """
  config = model_lib.model_config('tiny')
  params = random_params(config, seed)
  head = params['transformer']['params']['final_linear']
  head['kernel'] = np.zeros_like(head['kernel'])
  head['bias'] = np.array([0.3, -0.2, 2.0], np.float32)
  return checkpoints.save_model(directory, params, config)


# The miniature place-recognition benchmark: 3 queries, 24 database images in 2 places of 12.
PLACE_QUERY_PHOTOS = (0, 1, 2)
PLACE_QRY_UTM = np.array([[0.0, 10.0], [1000.0, 0.0], [5000.0, 0.0]])
PLACE_DB_UTM = np.array([[1000.0 * (i // 12), 0.0] for i in range(24)])
PLACE_BASELINE_ORDER = ([13, 14, 5, 15], [2, 20, 3, 4], [0, 1, 2, 3])  # first entries of each row


def place_db_photo(i: int) -> int:
  """Database image i shows a photograph of its own, except the copies of queries 0 (db 5) and 1 (db 20)."""
  return {5: 0, 20: 1}.get(i, 3 + i % 6)


def baseline_scores() -> np.ndarray:
  """(3, 24) float32 scores whose descending order starts with PLACE_BASELINE_ORDER, then by index."""
  scores = np.zeros((3, 24), np.float32)
  for q, head in enumerate(PLACE_BASELINE_ORDER):
    order = list(head) + [i for i in range(24) if i not in head]
    scores[q, order] = np.arange(100, 100 - len(order), -1, dtype=np.float32)
  return scores


def build_place_dataset(root: str, qry_dir: str, db_dir: str, qry_names, db_names, size_wh=(96, 64)) -> None:
  """Writes the images of the miniature benchmark (PNG files, whatever extension the lists say)."""
  for q, name in enumerate(qry_names):
    save_photo(os.path.join(root, qry_dir, os.path.splitext(name)[0] + '.png'), PLACE_QUERY_PHOTOS[q], size_wh)
  for i, name in enumerate(db_names):
    save_photo(os.path.join(root, db_dir, os.path.splitext(name)[0] + '.png'), place_db_photo(i), size_wh)
