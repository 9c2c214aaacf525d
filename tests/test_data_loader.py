"""Augmentation (TPS composed into the ground truth) and the grain loader (format, seeds, resume, shards)."""
import grain
import numpy as np
import pytest

from data_pipeline import augment
from data_pipeline import builder
from data_pipeline import loader
from segswap_jax.errors import DataError
from segswap_jax import geometry
import test_data_support as support  # noqa: F401
from test_data_support import generated_pairs, small_dataset  # noqa: F401 (fixtures)
from test_data_swap import sift_matches

BATCH_KEYS = {'image_a', 'image_b', 'corr_a', 'corr_b', 'mask_a', 'mask_b', 'pad_b', 'scenes'}


def test_thin_plate_spline_interpolates_and_inverts():
  tps = augment.random_tps(np.random.default_rng(0), grids=(6,))
  grid = np.linspace(-1, 1, 6)
  points = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
  np.testing.assert_allclose(tps(tps.centers), points, atol=1e-9)  # moved point -> grid point
  assert np.abs(tps.centers - points).max() <= 0.5 / 6 + 1e-12  # moves of at most 0.5 / grid
  probe = np.random.default_rng(1).uniform(-1.2, 1.2, (50, 2))
  np.testing.assert_allclose(tps(tps.inverse(probe)), probe, atol=1e-6)


def warped(pair, seed):
  tps = augment.random_tps(np.random.default_rng(seed), grids=(4,))
  image_b = augment.warp_image(pair['image_b'], tps)
  corr_a, corr_b, mask_b = augment.warp_ground_truth(tps, pair['corr_a'], pair['corr_b'],
                                                     pair['mask_b'])
  return image_b, corr_a, corr_b, mask_b


def test_tps_warp_keeps_correspondences_right(generated_pairs):
  one_object = [p for p in generated_pairs if p['num_objects'] == 1]
  errors, moved, content_error, stale_error = [], [], [], []
  for seed, pair in enumerate(one_object):
    image_b, corr_a, corr_b, mask_b = warped(pair, seed)
    size, cells = image_b.shape[0], corr_a.shape[0]
    # 1. The content of B that A's object cells point to is where the warped maps point in B'.
    strong = pair['mask_a'] > 0.5
    inside = strong & np.all((corr_a > 0.05) & (corr_a < 0.95), axis=-1)
    after = geometry.bilinear_sample(image_b.astype(np.float32), corr_a)[inside]
    before = geometry.bilinear_sample(pair['image_b'].astype(np.float32), pair['corr_a'])[inside]
    stale = geometry.bilinear_sample(image_b.astype(np.float32), pair['corr_a'])[inside]
    content_error.append(np.abs(after - before).mean())
    stale_error.append(np.abs(stale - before).mean())
    moved.append(np.abs(corr_a - pair['corr_a'])[inside].max() * size)
    # 2. corr_a' and corr_b' stay inverse to each other on B's object.
    interior = (mask_b > 0.5) & np.all((corr_b > 0.05) & (corr_b < 0.95), axis=-1)
    there_and_back = geometry.bilinear_sample(corr_a, corr_b[interior][None])[0]
    centres = geometry.cell_centers(cells, cells)[interior]
    assert np.abs(there_and_back - centres).max() * cells < 0.25
    # 3. SIFT matches between A and the warped B land within one cell of corr_a'.
    points_a, points_b = sift_matches(pair['image_a'], image_b)
    for point_a, point_b in zip(points_a, points_b):
      col, row = (point_a * cells / size).astype(int)
      if pair['mask_a'][row, col] < 0.5 or not ((8 <= point_a) & (point_a <= size - 8)).all():
        continue
      predicted = geometry.bilinear_sample(corr_a, (point_a / size)[None, None].astype(np.float32))
      errors.append(np.linalg.norm(predicted[0, 0] * size - point_b))
  assert max(moved) > 4.0  # the warp really moved things
  assert np.mean(content_error) < 0.4 * np.mean(stale_error)
  errors = np.array(errors)
  assert len(errors) >= 20
  assert np.mean(errors < 16) >= 0.8 and np.median(errors) < 3.0


def test_key_padding_never_removes_every_token():
  mask = np.zeros((4, 4), np.float32)
  assert not augment.key_padding(mask).any()
  mask[1, 2] = 0.7
  np.testing.assert_array_equal(augment.key_padding(mask), mask < 0.5)


def test_train_batches_have_the_interface_format(small_dataset):
  it = loader.make_train_loader(small_dataset, per_device_batch=2, num_devices=2, seed=0)
  batch = next(it)
  assert set(batch) == BATCH_KEYS
  assert batch['image_a'].shape == batch['image_b'].shape == (2, 2, 192, 192, 3)
  assert batch['corr_a'].shape == batch['corr_b'].shape == (2, 2, 12, 12, 2)
  for key in ('mask_a', 'mask_b', 'pad_b'):
    assert batch[key].shape == (2, 2, 12, 12)
  # uint8 to the device (the step normalises): a quarter of float32's bytes.
  assert batch['pad_b'].dtype == bool and batch['image_a'].dtype == batch['image_b'].dtype == np.uint8
  assert batch['image_b'].std() > 20
  assert not (batch['pad_b'] & (batch['mask_b'] >= 0.5)).any()
  # Scene ids: known for generated pairs, and never the same scene for A and B's background.
  assert batch['scenes'].shape == (2, 2, 2) and batch['scenes'].dtype == np.int32
  assert (batch['scenes'] >= 0).all() and (batch['scenes'][..., 0] != batch['scenes'][..., 1]).all()
  with pytest.raises(DataError, match='holds 192x192 pairs, the loader was asked for 256x256'):
    loader.make_train_loader(small_dataset, per_device_batch=2, num_devices=1, image_size=256)
  with pytest.raises(DataError, match='fewer than one global batch of 1 process.es. x 2 x 4'):
    loader.make_train_loader(small_dataset, per_device_batch=4, num_devices=2)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
  for a, b in zip(first, second):
    for key in BATCH_KEYS:
      np.testing.assert_array_equal(a[key], b[key])


def test_same_seed_same_batches_and_exact_resume(small_dataset):
  make = lambda seed, **kw: loader.make_train_loader(small_dataset, per_device_batch=1,
                                                     num_devices=2, seed=seed, **kw)
  # 3 epochs of 3 batches: later epochs reshuffle and redraw the augmentation.
  first, again = take(make(0), 9), take(make(0), 9)
  assert_batches_equal(first, again)
  other = take(make(1), 3)
  assert any(not np.array_equal(a['image_b'], b['image_b']) for a, b in zip(first, other))
  epoch_masks = lambda batches: sorted(m.tobytes() for b in batches for m in b['mask_a'].reshape(-1, 144))
  assert epoch_masks(first[:3]) == epoch_masks(first[3:6])  # each epoch: every pair once
  assert any(not np.array_equal(a['image_b'], b['image_b']) for a, b in zip(first[:3], first[3:6]))

  it = make(0)
  take(it, 4)
  state = it.get_state()
  expected = take(it, 2)
  restored = make(0)
  restored.set_state(state)
  assert_batches_equal(expected, take(restored, 2))


def test_worker_processes_give_the_same_batches_and_resume(small_dataset):
  make = lambda **kw: loader.make_train_loader(small_dataset, per_device_batch=1, num_devices=2,
                                               seed=3, **kw)
  in_process = take(make(), 4)
  it = make(num_workers=2)
  assert_batches_equal(in_process[:2], take(it, 2))
  state = it.get_state()
  restored = make(num_workers=2)
  restored.set_state(state)
  assert_batches_equal(in_process[2:], take(restored, 2))
  it.close()
  restored.close()


def test_two_shards_cover_every_pair_once_per_epoch(small_dataset):
  everything = builder.data_source(small_dataset, 'train')
  expected = sorted(everything[i]['mask_a'].tobytes() for i in range(len(everything)))
  seen = []
  for index in range(2):
    shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
    batches = list(loader.make_train_loader(small_dataset, per_device_batch=1, num_devices=1,
                                            seed=5, num_epochs=1, shard_options=shard))
    assert len(batches) == 3
    seen += [b['mask_a'][0, 0].tobytes() for b in batches]
  assert sorted(seen) == expected
  # Default: one JAX process here, so ShardByJaxProcess gives it everything.
  assert len(list(loader.make_train_loader(small_dataset, per_device_batch=1, num_devices=1,
                                           num_epochs=1))) == 6


def test_process_shares_form_the_single_process_batches(small_dataset):
  """2 processes x 1 device read exactly the rows of the 1 process x 2 devices batches."""
  whole = list(loader.make_train_loader(small_dataset, per_device_batch=1, num_devices=2, seed=3,
                                        num_epochs=2))
  shares = [list(loader.make_train_loader(
      small_dataset, per_device_batch=1, num_devices=1, seed=3, num_epochs=2,
      shard_options=grain.sharding.ShardOptions(shard_index=p, shard_count=2, drop_remainder=True)))
            for p in range(2)]
  assert len(whole) == len(shares[0]) == len(shares[1]) == 6
  for step, batch in enumerate(whole):
    for process in range(2):
      for key in BATCH_KEYS:
        np.testing.assert_array_equal(batch[key][process], shares[process][step][key][0])


def test_eval_loader_is_one_unaugmented_pass(small_dataset):
  source = builder.data_source(small_dataset, 'validation')
  batches = list(loader.make_eval_loader(small_dataset, per_device_batch=1, num_devices=1,
                                         style_variants=True))
  assert len(batches) == 2
  for index, batch in enumerate(batches):
    stored = source[index]
    assert not batch['pad_b'].any()
    np.testing.assert_array_equal(batch['corr_a'][0, 0], stored['corr_a'])
    name_b = 'image_b_styled' if index % 4 in (2, 3) else 'image_b'
    name_a = 'image_a_styled' if index % 4 in (1, 3) else 'image_a'
    np.testing.assert_array_equal(batch['image_a'][0, 0], builder.decode_jpeg(stored[name_a]))
    np.testing.assert_array_equal(batch['image_b'][0, 0], builder.decode_jpeg(stored[name_b]))


_PROCESS_SCRIPT = '''
import hashlib, sys
import jax
jax.distributed.initialize('127.0.0.1:{port}', 2, int(sys.argv[1]))
from data_pipeline import loader
batches = loader.make_train_loader({path!r}, per_device_batch=1, num_devices=1, seed=0, num_epochs=1)
print('HASHES', jax.process_index(), jax.process_count(),
      ' '.join(hashlib.sha1(b['mask_a'].tobytes()).hexdigest() for b in batches))
'''


def test_two_jax_processes_split_the_pairs(small_dataset, tmp_path):
  """Real 2-process JAX: the default ShardByJaxProcess gives each process a disjoint half."""
  import hashlib
  import os
  import socket
  import subprocess
  import sys
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  script = tmp_path / 'shard.py'
  script.write_text(_PROCESS_SCRIPT.format(port=port, path=small_dataset))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': repo}
  processes = [subprocess.Popen([sys.executable, str(script), str(i)], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
  outputs = [p.communicate(timeout=120) for p in processes]
  seen = {}
  for (out, err), process in zip(outputs, processes):
    assert process.returncode == 0, err[-2000:]
    line = next(l for l in out.splitlines() if l.startswith('HASHES'))
    _, index, count, *hashes = line.split()
    assert count == '2'
    seen[int(index)] = hashes
  assert len(seen[0]) == len(seen[1]) == 3
  source = builder.data_source(small_dataset, 'train')
  expected = sorted(hashlib.sha1(source[i]['mask_a'].tobytes()).hexdigest() for i in range(6))
  assert sorted(seen[0] + seen[1]) == expected
