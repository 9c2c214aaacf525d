"""Generation into TFDS: format, determinism, resume, skipped images, clear errors."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from data_pipeline import builder
from data_pipeline import generate
from data_pipeline import shards
from segswap_jax.errors import ConfigError, DataError
import test_data_support as support
from test_data_support import small_dataset  # noqa: F401 (fixture)

FEATURES = {'image_a', 'image_b', 'image_a_styled', 'image_b_styled', 'corr_a', 'corr_b', 'mask_a',
            'mask_b', 'num_objects', 'source', 'scene_a', 'scene_background'}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_all(path, split):
  source = builder.data_source(path, split)
  return [source[i] for i in range(len(source))]


def assert_same_examples(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert set(a) == set(b) == FEATURES
    for key in FEATURES:
      if isinstance(a[key], np.ndarray):
        np.testing.assert_array_equal(a[key], b[key])
      else:
        assert a[key] == b[key], key


@pytest.fixture(scope='module')
def reference_run(small_dataset):
  """An uninterrupted run, in this process."""
  return small_dataset


def test_dataset_has_the_documented_features(reference_run):
  info = builder.load_builder(reference_run).info
  assert reference_run.endswith(os.path.join('segswap_pairs', 'bundled', builder.VERSION))
  assert set(info.features.keys()) == FEATURES
  assert info.splits['train'].num_examples == 6 and info.splits['validation'].num_examples == 2
  assert info.metadata['image_size'] == 192
  decoded = builder.data_source(reference_run, 'train', raw_images=False)[0]
  assert decoded['image_b'].shape == (192, 192, 3) and decoded['image_b'].dtype == np.uint8
  for example in read_all(reference_run, 'train') + read_all(reference_run, 'validation'):
    assert example['corr_a'].shape == (12, 12, 2) and example['corr_a'].dtype == np.float32
    assert example['mask_b'].shape == (12, 12) and example['mask_b'].dtype == np.float32
    assert example['num_objects'] in (1, 2) and example['source'] == b'bundled'
    assert builder.decode_jpeg(example['image_a_styled']).shape == (192, 192, 3)
    # Scene keys: bundled file names (the stereo motorcycle's right view is its left one's scene).
    assert example['scene_a'].endswith((b'.png', b'.jpg')) and example['scene_background']
    assert example['scene_a'] != example['scene_background']
    assert b'_right' not in example['scene_a'] + example['scene_background']
  # Held-out pairs differ from the training pairs.
  train_images = {e['image_b'] for e in read_all(reference_run, 'train')}
  assert not train_images & {e['image_b'] for e in read_all(reference_run, 'validation')}


def test_killed_run_resumes_to_the_identical_dataset(reference_run, tmp_path):
  config = support.small_config(keep_work=True, num_workers=2)
  data_dir = str(tmp_path)
  # What a run killed mid-way leaves behind: one finished shard and a half-written one.
  work_dir = os.path.join(data_dir, 'segswap_pairs_work', 'bundled')
  generate._check_work_dir(work_dir, generate.fingerprint(config))
  shards.PairMaker(config).make_shard(work_dir, 'train', 0, 0, 3)
  finished = shards.shard_path(work_dir, 'train', 0)
  stamp = os.stat(finished).st_mtime_ns
  with open(shards.shard_path(work_dir, 'train', 1) + '.tmp999', 'wb') as f:
    f.write(b'\x80\x05 truncated pickle')
  path = generate.generate(config, data_dir)  # two worker processes make the missing shards
  assert os.stat(finished).st_mtime_ns == stamp  # kept, not redone
  for split in ('train', 'validation'):
    assert_same_examples(read_all(reference_run, split), read_all(path, split))
  assert generate.generate(config, data_dir) == path  # finished: nothing to do
  with pytest.raises(DataError, match='made with another config'):
    generate.generate(support.small_config(seed=1), data_dir)


def test_corrupt_and_small_images_are_skipped_and_counted(tmp_path, capfd):
  folder = tmp_path / 'images'
  support.write_image_folder(str(folder))
  (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG')
  cv2.imwrite(str(folder / 'thumb.png'), np.zeros((40, 40, 3), np.uint8))
  config = support.small_config(source='folder', source_dir=str(folder), num_pairs=10)
  path = generate.generate(config, str(tmp_path / 'data'))
  skipped = builder.load_builder(path).info.metadata['skipped_images']
  assert skipped == {str(folder / 'broken.jpg'): 'unreadable or corrupt image (OSError)',
                     str(folder / 'thumb.png'): 'too small (40x40 px; need at least 64 px on the '
                                                'short side)'}
  assert len(read_all(path, 'train')) == 10
  err = capfd.readouterr().err
  assert f'warning: skipped image {folder / "broken.jpg"}: unreadable or corrupt image' in err
  assert '2 unusable image(s) were skipped' in err


def test_generation_from_coco(tmp_path):
  root = support.write_mini_coco(str(tmp_path / 'coco'))
  config = support.small_config(source='coco', source_dir=root, num_pairs=4, num_validation=0)
  path = generate.generate(config, str(tmp_path / 'data'))
  examples = read_all(path, 'train')
  assert path.endswith(os.path.join('segswap_pairs', 'coco', builder.VERSION))
  assert {e['source'] for e in examples} == {b'coco'} and len(examples) == 4
  assert {e['num_objects'] for e in examples} == {1, 2}
  assert list(builder.load_builder(path).info.splits) == ['train']


def test_bad_config_values_are_refused(tmp_path):
  with pytest.raises(ConfigError, match=r'config.image_size=100: expected a positive multiple of 16'):
    generate.generate(support.small_config(image_size=100), str(tmp_path))
  with pytest.raises(ConfigError, match=r'config.num_workers=-3: expected an integer >= 0'):
    generate.generate(support.small_config(num_workers=-3), str(tmp_path))
  with pytest.raises(DataError, match='source "folder" needs --config.source_dir'):
    generate.generate(support.small_config(source='folder'), str(tmp_path))


def test_cli_prints_one_clear_line_for_user_errors(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'data_pipeline.generate', '--config=configs/data/unsup.py',
       f'--data-dir={tmp_path}', f'--config.source_dir={tmp_path / "nowhere"}'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == f'error: image folder not found: {tmp_path / "nowhere"}'
  assert 'Traceback' not in result.stderr
