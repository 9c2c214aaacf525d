"""eval.feature_cache: round trip in float16, resume after an interruption, growth, staleness, bad images."""
import functools
import os
import shutil
import threading

import numpy as np
import pytest
import skimage

from eval import feature_cache, place_formats
from segswap_jax import checkpoints
from segswap_jax import images
from segswap_jax.errors import DataError

SKIMAGE_DATA = os.path.join(os.path.dirname(skimage.__file__), 'data')
PHOTOS = ['astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg', 'motorcycle_left.png']


def _pooled_features(batch):
  """A deterministic stand-in backbone: 16x16 average pooling of the image, `(B, 4, 6, 3)`."""
  b, h, w, c = batch.shape
  return batch.reshape(b, h // 16, 16, w // 16, 16, c).mean(axis=(2, 4)).astype(np.float32) / 255.0


@pytest.fixture
def image_dir(tmp_path):
  folder = tmp_path / 'db'
  folder.mkdir()
  for name in PHOTOS:
    shutil.copy(os.path.join(SKIMAGE_DATA, name), folder / name)
  (folder / 'broken.jpg').write_bytes(b'not an image')
  return str(folder)


def _load(folder, name):
  return images.load_image(place_formats.resolve(name, [folder]), (64, 96))


META = {'fingerprint': 'abc', 'image_size': [64, 96], 'feature_shape': [4, 6, 3], 'dtype': 'float16'}


def test_fill_read_round_trip_and_resume(image_dir, tmp_path):
  cache_dir = str(tmp_path / 'cache')
  load = functools.partial(_load, image_dir)
  cache = feature_cache.FeatureCache(cache_dir, META, shard_size=2)
  calls = []

  def failing_after_one_batch(batch):
    if calls:
      raise KeyboardInterrupt  # an interrupted run
    calls.append(len(batch))
    return _pooled_features(batch)

  with pytest.raises(KeyboardInterrupt):
    cache.fill(PHOTOS, load, failing_after_one_batch, batch_size=2)
  # A new process resumes: only the 3 rows not done are computed.
  cache = feature_cache.FeatureCache(cache_dir, META)
  assert cache.fill(PHOTOS, load, _pooled_features, batch_size=2) == 3
  assert cache.fill(PHOTOS, load, _pooled_features, batch_size=2) == 0
  expected = _pooled_features(np.stack([load(n) for n in PHOTOS]))
  got = cache.read(cache.rows(PHOTOS[::-1]))
  assert got.dtype == np.float16
  np.testing.assert_allclose(got.astype(np.float32), expected[::-1], rtol=1e-3, atol=1e-3)
  assert sorted(os.listdir(cache_dir)) == ['done_00000.npy', 'done_00001.npy', 'done_00002.npy',
                                           'features_00000.npy', 'features_00001.npy',
                                           'features_00002.npy', 'index.json']


def test_growth_keeps_rows_and_multi_process_share(image_dir, tmp_path):
  cache_dir = str(tmp_path / 'cache')
  load = functools.partial(_load, image_dir)
  cache = feature_cache.FeatureCache(cache_dir, META, shard_size=4)
  cache.fill(PHOTOS[:2], load, _pooled_features, batch_size=2)
  before = cache.read(cache.rows(PHOTOS[:2]))
  # Two "processes" (threads) on a shared folder: 0 registers, each computes every other missing row.
  meeting = threading.Barrier(2)
  done = [None, None]

  def process(index):
    done[index] = feature_cache.FeatureCache(cache_dir, META).fill(
        PHOTOS, load, _pooled_features, 2, index, 2, barrier=lambda tag: meeting.wait(timeout=60))

  threads = [threading.Thread(target=process, args=(p,)) for p in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert done == [2, 1]
  cache = feature_cache.FeatureCache(cache_dir, META)
  np.testing.assert_array_equal(cache.read(cache.rows(PHOTOS[:2])), before)
  assert cache.is_done(cache.rows(PHOTOS)).all()


def test_stale_cache_is_refused(image_dir, tmp_path):
  cache_dir = str(tmp_path / 'cache')
  feature_cache.FeatureCache(cache_dir, META).fill(PHOTOS[:1], functools.partial(_load, image_dir),
                                                  _pooled_features, 1)
  with pytest.raises(DataError, match=r'stale feature cache .* fingerprint'):
    feature_cache.FeatureCache(cache_dir, dict(META, fingerprint='other'))


def test_unreadable_and_missing_images_name_the_file(image_dir, tmp_path):
  cache = feature_cache.FeatureCache(str(tmp_path / 'cache'), META)
  load = functools.partial(_load, image_dir)
  with pytest.raises(DataError, match=r'broken\.jpg: unreadable or corrupt image'):
    cache.fill(['broken.jpg'], load, _pooled_features, 1)
  with pytest.raises(DataError, match=r'image not found: .*nothere\.jpg'):
    cache.fill(['nothere.jpg'], load, _pooled_features, 1)


def test_resolve_swaps_extension_and_fingerprint_changes_with_values(image_dir):
  assert place_formats.resolve('sub/astronaut.jpg', [image_dir]).endswith('astronaut.png')
  tree = {'a': np.zeros(3, np.float32), 'b': {'c': np.ones((2, 2))}}
  same = {'a': np.zeros(3, np.float32), 'b': {'c': np.ones((2, 2))}}
  changed = {'a': np.zeros(3, np.float32), 'b': {'c': np.full((2, 2), 2.0)}}
  assert checkpoints.tree_digest(tree) == checkpoints.tree_digest(same)
  assert checkpoints.tree_digest(tree) != checkpoints.tree_digest(changed)


def test_candidate_store_on_the_devices_reads_what_the_caches_hold(tmp_path, monkeypatch):
  """The token cache is filled from the feature cache; the device-resident store (forced here with a
  budget, in chunks of 3 rows) serves exactly the rows the host streaming store reads."""
  import jax
  from segswap_jax import inference, model as model_lib
  config = model_lib.model_config('tiny', 'I C')
  config.backbone, config.backbone_widths, config.feature_dim = 'small_convnet', (8, 8, 16, 16), 16
  params = jax.tree.map(np.asarray, model_lib.init_params(config, jax.random.key(0)))
  model = inference.SegSwap(params, config)
  cache = feature_cache.FeatureCache(str(tmp_path / 'features'), {'feature_shape': [2, 3, 16], 'dtype': 'float16',
                                                                 'fingerprint': 'x', 'image_size': [32, 48],
                                                                 'normalization': 'imagenet'})
  names = [f'img{i}.png' for i in range(7)]
  rows = np.random.default_rng(0).standard_normal((7, 2, 3, 16)).astype(np.float32)
  rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
  cache.register(names)
  cache.write(cache.rows(names), rows)
  monkeypatch.setattr(feature_cache, 'UPLOAD_ROWS', 3)
  streamed = feature_cache.CandidateStore(model, cache, names, 'projected', str(tmp_path), batch_size=4)
  resident = feature_cache.CandidateStore(model, cache, names, 'projected', str(tmp_path), batch_size=4,
                                          device_budget_bytes=10 ** 9)
  assert not streamed.on_device and resident.on_device
  assert streamed.computed_tokens == 7 and resident.computed_tokens == 0   # the second reuses the tokens
  assert streamed.bytes_per_image == 2 * 3 * (16 + config.d_model) * 2
  pick = cache.rows([names[5], names[0], names[5], names[2]])
  a, b = streamed.read(pick), resident.read(pick)
  for key in ('features', 'tokens'):
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
  np.testing.assert_allclose(np.asarray(a['tokens'], np.float32),
                             np.asarray(model.tokens(rows[[5, 0, 5, 2]])), atol=2e-3 * 8)
  backbone_only = feature_cache.CandidateStore(model, cache, names, 'backbone', str(tmp_path), batch_size=4)
  np.testing.assert_array_equal(backbone_only.read(pick), rows[[5, 0, 5, 2]].astype(np.float16))
