"""End to end with a tiny random model: pair scoring and its cache, `discover` and `eval.internet` CLIs."""
import json
import os

import jax
import numpy as np
import pytest

from benchmarks import planted
from eval import collection, discovery, internet
from segswap_jax import checkpoints, discover, errors, inference, scoring
from segswap_jax import model as model_lib

SIZE = 64  # 4 x 4 cells


def error_line(stderr: str) -> str:
  """The CLI's error: exactly one line starting with 'error:' (progress bars aside), and it is the last."""
  lines = [line.strip() for line in stderr.splitlines() if line.strip()]
  assert sum(line.startswith('error:') for line in lines) == 1 and 'Traceback' not in stderr
  return lines[-1]


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  config = model_lib.model_config('tiny')
  params = jax.tree.map(np.asarray, model_lib.init_params(config, jax.random.key(0)))
  return checkpoints.save_model(str(tmp_path_factory.mktemp('ckpt') / 'tiny'), params, config)


@pytest.fixture(scope='module')
def model(checkpoint):
  return inference.SegSwap.load(checkpoint)


@pytest.fixture(scope='module')
def images():
  c = planted.make_planted_collection(groups=((0, 1, 2),), num_images=4, image_size=SIZE, patch_cells=2, seed=4)
  return c


def test_score_pairs_matches_the_model_and_resumes(model, images, tmp_path, capsys):
  pairs = np.array([[0, 1], [0, 2], [1, 3], [2, 3]])
  cache = str(tmp_path / 'cache')
  result = collection.score_pairs(model, images.images, pairs, cache_dir=cache, flip='none', batch_size=2,
                                  chunk_pairs=2, keep_all=True)
  np.testing.assert_array_equal(result.pairs, pairs)
  features = model.features(images.images)
  direct = model.pair(features[pairs[:, 0]], features[pairs[:, 1]])
  np.testing.assert_allclose(result.out_a, np.asarray(direct.out_a), atol=1e-5)
  np.testing.assert_allclose(result.out_b, np.asarray(direct.out_b), atol=1e-5)
  weight = scoring.cycle_weight(direct.out_a, direct.out_b)
  expected = np.asarray(scoring.pair_score(features[pairs[:, 0]], features[pairs[:, 1]], direct.out_a, weight))
  valid = (np.asarray(weight).sum(axis=(1, 2)) >= 0.16) & (np.asarray(
      scoring.cycle_weight(direct.out_b, direct.out_a)).sum(axis=(1, 2)) >= 0.16)
  np.testing.assert_allclose(result.scores[:, 0], np.where(valid, expected, 0.0), rtol=1e-4)
  # Resume: a finished chunk is not recomputed, a missing one is, with the same numbers.
  chunks = collection.cached_chunks(cache)
  assert len(chunks) == 2
  os.remove(chunks[1])
  stamp = os.path.getmtime(chunks[0])
  again = collection.score_pairs(model, images.images, pairs, cache_dir=cache, flip='none', batch_size=2,
                                 chunk_pairs=2, keep_all=True)
  assert os.path.getmtime(chunks[0]) == stamp
  np.testing.assert_allclose(again.out_a, result.out_a)
  # Other settings: the stale chunks are computed again (never reused), and the note says what differed.
  capsys.readouterr()
  flipped = collection.score_pairs(model, images.images, pairs, cache_dir=cache, flip='corrected', batch_size=2,
                                   chunk_pairs=2, keep_all=True)
  assert 'differs in: flip' in capsys.readouterr().err
  fresh = collection.score_pairs(model, images.images, pairs, flip='corrected', batch_size=2, keep_all=True)
  np.testing.assert_allclose(flipped.out_a, fresh.out_a)


def test_flip_keeps_the_better_mirror(model, images):
  pairs = np.array([[0, 1], [1, 2]])
  plain = collection.score_pairs(model, images.images, pairs, flip='none', batch_size=2, keep_all=True)
  flipped = collection.score_pairs(model, images.images, pairs, flip='corrected', batch_size=2, keep_all=True)
  # The mask sum on image i never decreases: the mirrored run is taken only when it is larger.
  assert np.all(flipped.out_a[..., 2].sum(axis=(1, 2)) >= plain.out_a[..., 2].sum(axis=(1, 2)) - 1e-5)


def test_discover_cli_writes_a_report(checkpoint, images, tmp_path, capsys):
  folder = tmp_path / 'photos'
  planted.write_class_folder(images, str(folder), ground_truth=False)
  out = tmp_path / 'report'
  code = discover.main(['--checkpoint', checkpoint, '--images', str(folder), '--out', str(out),
                        '--image-size', str(SIZE), '--max-pairs-per-image', '2', '--batch-size', '4',
                        '--node-threshold', '0.6'])
  assert code == 0, capsys.readouterr().err
  assert os.path.isfile(out / 'index.html')
  with open(out / 'clusters.json') as f:
    data = json.load(f)
  assert data['summary']['images'] == 4 and data['summary']['pairs run'] <= 6
  assert data['summary']['node threshold'] == 0.6
  for cluster in data['patterns']:
    assert os.path.isfile(out / cluster['picture'])
  assert 'pattern' in capsys.readouterr().out


def test_report_of_oracle_patterns(tmp_path):
  # The report on a known answer: two planted groups -> two patterns listing exactly their images.
  c = planted.make_planted_collection(groups=((0, 1, 2, 3, 4), (3, 4, 5, 6, 7)), seed=0)
  folder = tmp_path / 'photos'
  names = planted.write_class_folder(c, str(folder), ground_truth=False)
  result = discovery.discover(planted.oracle_pair_set(c), 'patterns', sigma=1.0)
  data = discover.write_report(str(tmp_path / 'report'), str(folder), names, result, {'images': 8})
  listed = sorted(sorted(i['image'] for i in p['instances']) for p in data['patterns'])
  assert listed == [names[0:5], names[3:8]]
  html = (tmp_path / 'report' / 'index.html').read_text()
  assert 'Pattern 1' in html and 'Pattern 2' in html and 'pattern_02.png' in html
  box = data['patterns'][0]['instances'][0]['box']
  assert 0 <= box[0] < box[2] <= 240 and 0 <= box[1] < box[3] <= 240


@pytest.mark.parametrize('case', ['empty', 'single', 'unreadable', 'missing', 'threshold'])
def test_discover_cli_errors(case, tmp_path, capsys):
  folder = tmp_path / 'photos'
  folder.mkdir()
  c = planted.make_planted_collection(groups=((0, 1, 2),), image_size=SIZE, patch_cells=2, seed=1)
  if case == 'single':
    planted.write_class_folder(planted.PlantedCollection(c.images[:1], [], 2), str(folder), ground_truth=False)
  if case == 'unreadable':
    planted.write_class_folder(c, str(folder), ground_truth=False)
    (folder / 'broken.jpg').write_bytes(b'not a jpeg at all')
  if case == 'threshold':
    planted.write_class_folder(c, str(folder), ground_truth=False)
  target = str(folder if case != 'missing' else tmp_path / 'nowhere')
  code = discover.main(['--checkpoint', str(tmp_path / 'no_checkpoint'), '--images', target,
                        '--out', str(tmp_path / 'r'), '--image-size', str(SIZE),
                        '--node-threshold', '1.5' if case == 'threshold' else '0.85'])
  err = error_line(capsys.readouterr().err)
  assert code == 2 and err.startswith('error:')
  expected = {'empty': 'no images', 'single': 'at least 3', 'unreadable': 'broken.jpg',
              'missing': 'no such folder', 'threshold': '--node-threshold: expected a number in (0, 1), got 1.5'}[case]
  assert expected in err


def test_internet_cli_end_to_end(checkpoint, tmp_path, capsys):
  c = planted.make_planted_collection(groups=((0, 1, 2),), num_images=4, image_size=SIZE, patch_cells=2, seed=6)
  planted.write_class_folder(c, str(tmp_path / 'data' / 'Horse100'))
  out = tmp_path / 'results.json'
  args = ['--checkpoint', checkpoint, '--data-dir', str(tmp_path / 'data'), '--classes', 'Horse100',
          '--image-size', str(SIZE), '--batch-size', '4', '--sigma', 'reference', '1.5', '--out', str(out)]
  assert internet.main(args) == 0, capsys.readouterr().err
  with open(out) as f:
    results = json.load(f)
  assert [r['sigma'] for r in results['rows']] == ['reference', 1.5]
  res = results['rows'][0]['classes']['Horse100']
  assert res['sigma'] == 1.2 and 0.0 <= res['P'] <= 1.0 and res['num_images'] == 4
  assert 'Horse100' in capsys.readouterr().out
  # The cached pairs are reused: a second run computes nothing (no new chunk files, same numbers).
  chunks = collection.cached_chunks(str(tmp_path / 'results.pairs' / 'Horse100'))
  stamps = [os.path.getmtime(p) for p in chunks]
  assert internet.main(args) == 0
  assert [os.path.getmtime(p) for p in chunks] == stamps
