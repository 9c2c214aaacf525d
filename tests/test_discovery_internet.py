"""Internet-dataset evaluation: P and J by hand, the on-disk layout, the table, the CLI's errors."""
import json
import os

import numpy as np
import pytest

from benchmarks import planted
from eval import internet
from segswap_jax import errors


def test_precision_jaccard_by_hand():
  pred = np.array([[1, 1, 0], [0, 0, 0]], bool)
  truth = np.array([[1, 0, 0], [0, 0, 1]], bool)
  precision, jaccard = internet.precision_jaccard(pred, truth)
  assert precision == pytest.approx(4 / 6)  # wrong at (0,1) and (1,2)
  assert jaccard == pytest.approx(1 / 3)  # 1 in both, 3 in either
  # Empty ground truth: P only.
  assert internet.precision_jaccard(pred, np.zeros_like(truth)) == (pytest.approx(4 / 6), None)
  with pytest.raises(errors.DataError):
    internet.precision_jaccard(pred, truth[:1])


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """Two classes in the Object Discovery layout: images + GroundTruth/ PNGs; one image without object."""
  root = tmp_path_factory.mktemp('Internet')
  collections = {}
  for name, seed in (('Airplane100', 3), ('Car100', 5)):
    collection = planted.make_planted_collection(groups=((0, 1, 2, 3, 4),), num_images=6, seed=seed)
    planted.write_class_folder(collection, str(root / name))
    collections[name] = collection
  return str(root), collections


def test_layout_listing_and_ground_truth(dataset):
  root, collections = dataset
  class_dir = os.path.join(root, 'Airplane100')
  names = internet.list_images(class_dir)
  assert names == [f'img_{i:02d}.jpg' for i in range(6)]  # GroundTruth/ is not an image
  truth = internet.load_ground_truth(class_dir, names[0])
  assert truth.dtype == bool
  np.testing.assert_array_equal(truth, collections['Airplane100'].pixel_masks()[0])
  assert not internet.load_ground_truth(class_dir, names[5]).any()


def test_evaluate_with_oracle_pairs(dataset):
  root, collections = dataset
  pair_sets = {name: planted.oracle_pair_set(c) for name, c in collections.items()}
  results = internet.evaluate(None, root, classes=['Airplane100', 'Car100'], methods=['reference'],
                              sigmas=['reference', 1.0], pair_sets=pair_sets)
  rows = results['rows']
  assert [(r['method'], r['sigma']) for r in rows] == [('reference', 'reference'), ('reference', 1.0)]
  per_class = rows[0]['classes']
  assert per_class['Airplane100']['sigma'] == 0.8 and per_class['Car100']['sigma'] == 5.0
  for res in per_class.values():
    assert res['num_images'] == 6 and res['num_empty_gt'] == 1
    assert res['P'] == pytest.approx(np.mean([p['P'] for p in res['per_image']]))
    assert res['J'] == pytest.approx(np.mean([p['J'] for p in res['per_image'] if p['J'] is not None]))
    assert res['J'] > 0.8 and res['P'] > 0.95  # the oracle finds the planted patches
  assert rows[0]['average']['P'] == pytest.approx(np.mean([r['P'] for r in per_class.values()]))
  assert 'paper' in results['table'] and '0.928' in results['table']
  json.dumps(results)  # JSON-ready


def test_reference_sigma_only_for_known_classes(dataset):
  root, _ = dataset
  assert internet.class_sigma('Horse100', 'reference') == 1.2
  assert internet.class_sigma('Horse100', 3.0) == 3.0
  with pytest.raises(errors.DataError, match='no reference sigma'):
    internet.class_sigma('Bikes', 'reference')


def test_cli_errors_are_one_line(dataset, tmp_path, capsys):
  root, _ = dataset
  code = internet.main(['--checkpoint', str(tmp_path), '--data-dir', str(tmp_path / 'missing')])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.startswith('error:') and 'missing' in err and '\n' not in err
  code = internet.main(['--checkpoint', str(tmp_path), '--data-dir', root, '--classes', 'Horse100'])
  err = capsys.readouterr().err.strip()
  assert code == 2 and 'Horse100' in err and '\n' not in err
  broken = tmp_path / 'data' / 'Airplane100'
  planted.write_class_folder(planted.make_planted_collection(groups=((0, 1, 2),), seed=1), str(broken))
  os.remove(broken / 'GroundTruth' / 'img_01.png')
  code = internet.main(['--checkpoint', str(tmp_path), '--data-dir', str(tmp_path / 'data'),
                        '--classes', 'Airplane100'])
  err = capsys.readouterr().err.strip()
  assert code == 2 and 'img_01.png' in err and '\n' not in err
