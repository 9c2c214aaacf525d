"""Nothing is reused unless what determines its numbers is the same: the model's digest and config, and
every setting (resumed Tokyo results, discovery caches); checkpoints are verified; a resumed training
run keeps its settings unless told otherwise."""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

import eval_toy_data as toy
from benchmarks import planted
from eval import place_formats, place_recognition, retrieval, tokyo247
from segswap_jax import checkpoints, discover, errors
from segswap_jax.training import loop
from test_eval_place_recognition import TOKYO_QRY, _run, tokyo  # noqa: F401 (fixture)
from test_train import tiny_config, train_dataset  # noqa: F401 (fixture)


@pytest.fixture(scope='module')
def two_models(tmp_path_factory):
  """Two transformers over one backbone: the constant-output toy and a copy with another head."""
  root = tmp_path_factory.mktemp('models')
  first = toy.constant_output_checkpoint(str(root / 'a'))
  params, config = checkpoints.load_model(first)
  params['transformer']['params']['final_linear']['bias'] = np.array([0.6, 0.1, 1.0], np.float32)
  second = checkpoints.save_model(str(root / 'b'), params, config)
  return first, second


def test_digests_are_written_and_name_the_parts(two_models):
  first, second = two_models
  a, b = checkpoints.stored_digests(first), checkpoints.stored_digests(second)
  assert a['backbone'] == b['backbone'] and a['matcher'] != b['matcher'] and a['params'] != b['params']
  params, _ = checkpoints.load_model(first)
  assert checkpoints.tree_digest(params) == a['params']


def test_parameters_that_do_not_match_their_digest_are_refused(two_models, tmp_path):
  first, second = two_models
  swapped = str(tmp_path / 'swapped')
  shutil.copytree(first, swapped)
  shutil.rmtree(os.path.join(swapped, 'params'))
  shutil.copytree(os.path.join(second, 'params'), os.path.join(swapped, 'params'))   # b's weights, a's digest
  with pytest.raises(errors.CheckpointError, match='do not match the digest'):
    checkpoints.load_model(swapped)


def test_non_finite_parameters_are_refused(two_models, tmp_path):
  params, config = checkpoints.load_model(two_models[0])
  params['transformer']['params']['final_linear']['bias'][0] = np.nan
  with pytest.raises(errors.CheckpointError, match=r"final_linear.*NaN"):
    checkpoints.save_model(str(tmp_path / 'nan'), params, config)


def test_tokyo_results_of_another_model_with_the_same_backbone_are_recomputed(tokyo, two_models, tmp_path,  # noqa: F811
                                                                            capsys):
  first, second = two_models
  out = tmp_path / 'tokyo.json'
  # A run of the first model killed after its results were saved: its per-query file is left behind.
  dataset = place_formats.load_place_dataset(
      {item: os.path.join(tokyo, name) for item, name in tokyo247.LAYOUT.npy_files.items()}, None,
      os.path.join(tokyo, tokyo247.LAYOUT.qry_subdir), os.path.join(tokyo, tokyo247.LAYOUT.db_subdir))
  baseline = retrieval.load_npy(os.path.join(tokyo, 'top100_patchVlad.npy'), 'baseline')
  params, config, digests = checkpoints.load_verified(first)
  settings = place_recognition.Settings(topk=4, batch_size=4, cache_dtype='float32', image_size=(64, 96),
                                        cache_dir=str(tmp_path / 'feature_cache'))
  killed = place_recognition.evaluate(dataset, baseline, 'baseline', params, config, settings, 12,
                                      work_dir=str(out) + '.partial', digests=digests)
  assert os.path.isfile(os.path.join(str(out) + '.partial', 'process_0.npz'))
  # The second model, same backbone (so the same feature cache), resumes into the same --out.
  code, resumed = _run(tokyo247.main, tokyo, second, out, '--cache-dir', str(tmp_path / 'feature_cache'))
  assert code == 0
  assert re.search(r'differs in: [^)]*\bmodel\b', capsys.readouterr().err)
  assert resumed['timing']['db_images_computed'] == 0          # the backbone's features were reused ...
  code, clean = _run(tokyo247.main, tokyo, second, tmp_path / 'clean.json')
  assert [q['scores'] for q in resumed['queries']] == [q['scores'] for q in clean['queries']]   # ... not the scores
  assert [q['scores'] for q in resumed['queries']] != [q['scores'] for q in killed['queries']]


def test_a_replaced_checkpoint_at_the_same_path_is_recomputed(two_models, tmp_path, capsys):
  first, second = two_models
  collection = planted.make_planted_collection(groups=((0, 1, 2),), num_images=4, image_size=64, patch_cells=2,
                                               seed=7)
  folder = str(tmp_path / 'photos')
  planted.write_class_folder(collection, folder, ground_truth=False)
  path = str(tmp_path / 'model')
  shutil.copytree(first, path)
  args = ['--checkpoint', path, '--images', folder, '--out', str(tmp_path / 'report'), '--image-size', '64',
          '--max-pairs-per-image', '0', '--node-threshold', '0.5']
  assert discover.main(args) == 0
  shutil.rmtree(path)
  shutil.copytree(second, path)                  # retrained in the same folder
  capsys.readouterr()
  assert discover.main(args) == 0
  assert re.search(r'differs in: [^)]*\bmodel\b', capsys.readouterr().err)
  again = json.load(open(tmp_path / 'report' / 'clusters.json'))
  assert discover.main(args[:4] + ['--out', str(tmp_path / 'fresh')] + args[6:]) == 0
  fresh = json.load(open(tmp_path / 'fresh' / 'clusters.json'))
  assert again['patterns'] == fresh['patterns'] and again['summary']['pairs kept'] == fresh['summary']['pairs kept']


def test_a_resumed_run_with_a_changed_learning_rate_is_refused(train_dataset, tmp_path):  # noqa: F811
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(tiny_config(train_dataset, num_epochs=2, learning_rate=1e-3), workdir)
  before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in ('config.json', 'model_config.json')}
  with pytest.raises(errors.ConfigError, match=r'learning_rate \(0\.001 -> 0\.05\)'):
    loop.train_and_evaluate(tiny_config(train_dataset, num_epochs=2, learning_rate=0.05), workdir)
  assert before == {name: os.path.getmtime(os.path.join(workdir, name)) for name in before}
  assert json.load(open(os.path.join(workdir, 'config.json')))['learning_rate'] == 1e-3


def test_a_failed_first_start_leaves_the_workdir_free(train_dataset, tmp_path):  # noqa: F811
  workdir = str(tmp_path / 'failed')
  with pytest.raises(errors.ConfigError, match='holds 128x128 pairs'):
    loop.train_and_evaluate(tiny_config(train_dataset, **{'data.image_size': 256}), workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'model_config.json'), 'w') as f:   # what an older failed start left
    json.dump({'size': 'small'}, f)
  summary = loop.train_and_evaluate(tiny_config(train_dataset, num_epochs=1), workdir)
  assert summary['steps'] == 2


def test_a_corrupted_training_checkpoint_is_refused(train_dataset, tmp_path):  # noqa: F811
  workdir = str(tmp_path / 'corrupt')
  loop.train_and_evaluate(tiny_config(train_dataset, num_epochs=1), workdir)
  digests_path = os.path.join(workdir, 'checkpoints', 'digests.json')
  digests = json.load(open(digests_path))
  digests['2'] = '0' * 32
  json.dump(digests, open(digests_path, 'w'))
  with pytest.raises(errors.CheckpointError, match=r'checkpoints/2: the train state does not match the digest'):
    loop.train_and_evaluate(tiny_config(train_dataset, num_epochs=2, allow_changes='num_epochs'), workdir)
