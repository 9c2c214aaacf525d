"""Import of pairs stored in the reference's on-disk format."""
import os

import numpy as np
import pytest

from data_pipeline import builder
from data_pipeline import import_reference
from segswap_jax.errors import DataError
from test_data_support import generated_pairs  # noqa: F401 (fixture)


def write_reference_folder(directory, pairs):
  """Our pairs in the reference layout: {i}_a.jpg ... and {i}_a.npy (3, h, w) = (x, y, mask)."""
  os.makedirs(directory, exist_ok=True)
  for i, pair in enumerate(pairs):
    for suffix, name in (('a', 'image_a'), ('as', 'image_a_styled'), ('b', 'image_b'),
                         ('bs', 'image_b_styled')):
      with open(os.path.join(directory, f'{i}_{suffix}.jpg'), 'wb') as f:
        f.write(builder.encode_jpeg(pair[name], 75))
    for side in ('a', 'b'):
      maps = np.concatenate([pair[f'corr_{side}'].transpose(2, 0, 1), pair[f'mask_{side}'][None]])
      np.save(os.path.join(directory, f'{i}_{side}.npy'), maps.astype(np.float32))


def test_import_keeps_bytes_and_maps_and_skips_bad_pairs(generated_pairs, tmp_path, capsys):
  one, two = str(tmp_path / 'pairs_1obj'), str(tmp_path / 'pairs_2obj')
  write_reference_folder(one, generated_pairs[:4])
  write_reference_folder(two, generated_pairs[4:])
  os.remove(os.path.join(one, '2_bs.jpg'))                          # incomplete pair
  with open(os.path.join(two, '1_b.npy'), 'wb') as f:               # corrupt map
    f.write(b'not numpy')
  path = import_reference.import_reference([one, two], str(tmp_path / 'data'), num_validation=2)
  info = builder.load_builder(path).info
  assert path.endswith(os.path.join('segswap_pairs', 'reference', builder.VERSION))
  assert info.splits['train'].num_examples == 4 and info.splits['validation'].num_examples == 2
  assert info.metadata['image_size'] == 256 and len(info.metadata['skipped_pairs']) == 2
  assert 'warning: 2 pair(s) skipped' in capsys.readouterr().err
  kept = [(one, 0), (one, 1), (one, 3), (two, 0), (two, 2), (two, 3)]
  originals = [generated_pairs[i] for i in (0, 1, 3, 4, 6, 7)]
  stored = []
  for split in ('train', 'validation'):
    source = builder.data_source(path, split)
    stored += [source[i] for i in range(len(source))]
  # TFDS orders examples by key hash; match them up by B's JPEG bytes (A repeats across pairs).
  by_image = {example['image_b']: example for example in stored}
  assert len(by_image) == 6
  for (directory, index), original in zip(kept, originals):
    with open(os.path.join(directory, f'{index}_b.jpg'), 'rb') as f:
      example = by_image[f.read()]
    for suffix, name in (('a', 'image_a'), ('as', 'image_a_styled'), ('bs', 'image_b_styled')):
      with open(os.path.join(directory, f'{index}_{suffix}.jpg'), 'rb') as f:
        assert example[name] == f.read()
    for key in ('corr_a', 'corr_b', 'mask_a', 'mask_b'):
      np.testing.assert_array_equal(example[key], original[key])
    assert example['num_objects'] == original['num_objects'] and example['source'] == b'reference'


def test_import_errors(tmp_path):
  with pytest.raises(DataError, match='reference folder not found'):
    import_reference.import_reference([str(tmp_path / 'nowhere')], str(tmp_path))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match=r'no reference pairs \(\{i\}_a.npy ...\) in'):
    import_reference.import_reference([str(tmp_path / 'empty')], str(tmp_path))
