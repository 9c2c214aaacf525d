"""The predict CLI end to end on bundled photographs, and its one-line errors."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import skimage

from segswap_jax import convert, predict
from segswap_jax import images as images_lib

SKIMAGE_DATA = os.path.join(os.path.dirname(skimage.__file__), 'data')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  out = tmp_path_factory.mktemp('ckpt') / 'random_tiny'
  assert convert.main(['--random-init', '--size', 'tiny', '--seed', '3', '--out', str(out)]) == 0
  return str(out)


def test_predict_writes_expected_arrays_and_picture(checkpoint, tmp_path):
  images = [os.path.join(SKIMAGE_DATA, n) for n in ('chelsea.png', 'coffee.png', 'rocket.jpg')]
  out, vis = tmp_path / 'r.npz', tmp_path / 'r.png'
  code = predict.main(['--checkpoint', checkpoint, '--query', images[0], '--targets', *images[1:],
                       '--image-size', '64', '96', '--out', str(out), '--vis', str(vis)])
  assert code == 0
  with np.load(out) as result:
    assert sorted(result.files) == sorted(predict.NPZ_KEYS)
    assert result['features_query'].shape == (4, 6, 1024)
    assert result['features_targets'].shape == (2, 4, 6, 1024)
    assert result['out_query'].shape == (2, 4, 6, 3) and result['out_targets'].shape == (2, 4, 6, 3)
    assert result['scores'].shape == (2,) and np.all(result['scores'] >= 0)
    np.testing.assert_allclose(np.linalg.norm(result['features_query'], axis=-1), 1.0, rtol=1e-5)
  picture = cv2.imread(str(vis))
  assert picture is not None and picture.shape[0] > 2 * 64


def test_score_batching_does_not_change_results(checkpoint):
  from segswap_jax import inference
  model = inference.SegSwap.load(checkpoint)
  names = ('astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg', 'motorcycle_left.png')
  images = np.stack([images_lib.load_image(os.path.join(SKIMAGE_DATA, n), (48, 64)) for n in names])
  one = model.score(images[0], images[1:], batch_size=1)
  three = model.score(images[0], images[1:], batch_size=3)  # 3 + padded 1
  np.testing.assert_allclose(one['scores'], three['scores'], rtol=1e-5)
  np.testing.assert_allclose(one['out_query'], three['out_query'], atol=1e-6)


def _run(*args):
  proc = subprocess.run([sys.executable, '-m', 'segswap_jax.predict', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  return proc.returncode, proc.stderr.strip()


def test_user_errors_give_one_line_and_nonzero_exit(checkpoint, tmp_path):
  good = os.path.join(SKIMAGE_DATA, 'chelsea.png')
  corrupt = tmp_path / 'broken.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  not_ckpt = tmp_path / 'empty_dir'
  not_ckpt.mkdir()
  cases = [
      (['--checkpoint', checkpoint, '--query', str(corrupt), '--targets', good], 'broken.jpg'),
      (['--checkpoint', checkpoint, '--query', good, '--targets', str(tmp_path / 'nope.png')], 'nope.png'),
      (['--checkpoint', str(not_ckpt), '--query', good, '--targets', good], 'not a segswap-jax checkpoint'),
      (['--checkpoint', good, '--query', good, '--targets', good], 'not a checkpoint directory'),
      (['--checkpoint', checkpoint, '--query', good, '--targets', good, '--image-size', '50', '64'], 'multiples of 16'),
  ]
  for args, expected in cases:
    code, err = _run(*args, '--out', str(tmp_path / 'x.npz'))
    assert code == 2, err
    assert err.startswith('error: ') and expected in err and '\n' not in err, err
