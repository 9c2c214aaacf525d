"""The training loop end to end: exact resume, SIGTERM, 2 processes = 1 process, hard mining, errors.

Runs on a miniature dataset made by the real generator from the bundled photographs (128 px, 8 x 8
cells) with a tiny model, on the 4 emulated CPU devices of conftest.py.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import demo
from data_pipeline import builder
from data_pipeline import generate
from segswap_jax import checkpoints
from segswap_jax import errors
from segswap_jax.training import config as config_lib
from segswap_jax.training import hard_mining
from segswap_jax.training import loop
from segswap_jax.training import metrics as train_logging
from test_data_support import small_config
from test_eval_brueghel import brueghel_dir  # noqa: F401 (fixture: a miniature Brueghel folder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_OVERRIDES = {
    'data.generate_config': '', 'data.image_size': 128, 'data.num_threads': 2,
    'model.size': 'tiny', 'model.block_types': 'I C', 'model.backbone_widths': (8, 8, 16, 16),
    'batch_pos': 2, 'batch_neg': 2, 'warmup_steps': 2, 'steps_per_epoch': 3, 'num_epochs': 3,
    'log_every_steps': 1, 'checkpoint_every_steps': 100, 'eval_batch_size': 2, 'vis_num_pairs': 2,
}


def set_key(config, key, value):
  node = config
  *parents, leaf = key.split('.')
  for parent in parents:
    node = node[parent]
  node[leaf] = value


def tiny_config(dataset_dir, **overrides):
  config = demo.get_config()
  for key, value in {**TINY_OVERRIDES, 'data.data_dir': dataset_dir, **overrides}.items():
    set_key(config, key, value)
  return config


def command_line(dataset_dir, workdir, **overrides):
  values = {**TINY_OVERRIDES, 'data.data_dir': dataset_dir, **overrides}
  return ([sys.executable, '-m', 'segswap_jax.train', '--config=configs/demo.py', f'--workdir={workdir}']
          + [f'--config.{k}={v}' for k, v in values.items()])


@pytest.fixture(scope='module')
def train_dataset(tmp_path_factory):
  """16 train + 4 validation one-object pairs at 128 px."""
  config = small_config(image_size=128, num_pairs=16, num_validation=4, shard_size=8,
                        two_object_fraction=0.0, **{'swap.min_mask_cells': 2.0})
  return generate.generate(config, str(tmp_path_factory.mktemp('train_dataset')))


def final_params(workdir):
  params, _ = checkpoints.load_model(os.path.join(workdir, 'model'))
  return params


def assert_trees_equal(first, second):
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def train_losses(workdir):
  return {r['step']: r['train/loss'] for r in train_logging.read_metrics(workdir) if 'train/loss' in r}


@pytest.fixture(scope='module')
def uninterrupted(train_dataset, tmp_path_factory):
  """8 steps in one go (warm-up 2 + 2 epochs of 3), the reference every resume must reproduce."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  summary = loop.train_and_evaluate(tiny_config(train_dataset), workdir)
  return workdir, summary


def test_a_run_writes_everything_it_promises(uninterrupted):
  workdir, summary = uninterrupted
  assert summary['steps'] == 8
  for name in ('model', 'best', 'checkpoints', 'tensorboard', 'metrics.jsonl', 'predictions.png',
               'summary.json', 'config.json', 'model_config.json'):
    assert os.path.exists(os.path.join(workdir, name)), name
  records = train_logging.read_metrics(workdir)
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == list(range(1, 9))
  keys = set().union(*[r.keys() for r in records if 'train/loss' in r])
  assert {'train/loss', 'train/loss_mask', 'train/loss_corr', 'train/acc_pos', 'train/acc_neg',
          'train/pairs_per_s', 'train/learning_rate', 'train/grad_norm'} <= keys
  # Validation at step 0 (before), at the end of warm-up (2), of each epoch (5, 8).
  val_steps = sorted({r['step'] for r in records if 'val/mask_iou' in r})
  assert val_steps == [0, 2, 5, 8]
  assert summary['before']['num_pairs'] == summary['after']['num_pairs'] == 4
  assert 0.0 <= summary['after']['mask_iou'] <= 1.0
  best = json.load(open(os.path.join(workdir, 'summary.json')))['best']
  assert best['step'] in (2, 5, 8) and best['metric'] == 'mask_iou'
  # Exported checkpoints load like converted ones (every other tool uses them).
  params, config = checkpoints.load_model(os.path.join(workdir, 'model'))
  assert config.backbone == 'small_convnet' and config.feature_dim == 16
  # The learning rate follows warm-up from 0.
  lrs = {r['step']: r['train/learning_rate'] for r in records if 'train/learning_rate' in r}
  assert lrs[1] == 0.0 and lrs[2] == pytest.approx(5e-4) and lrs[3] == pytest.approx(1e-3)


def test_resume_ends_with_the_same_parameters(train_dataset, uninterrupted, tmp_path):
  workdir = str(tmp_path / 'resumed')
  first = loop.train_and_evaluate(tiny_config(train_dataset, num_epochs=2), workdir)   # 5 steps
  assert first['steps'] == 5
  # Training longer is a change of settings: refused unless named, then recorded with its step.
  with pytest.raises(errors.ConfigError, match=r'num_epochs \(2 -> 3\).*--config.allow_changes=num_epochs'):
    loop.train_and_evaluate(tiny_config(train_dataset), workdir)
  second = loop.train_and_evaluate(tiny_config(train_dataset, allow_changes='num_epochs'), workdir)   # 5 -> 8
  assert second['steps'] == 8
  assert_trees_equal(final_params(workdir), final_params(uninterrupted[0]))
  assert train_losses(workdir) == train_losses(uninterrupted[0])
  with open(os.path.join(workdir, 'config_history.jsonl')) as f:
    history = [json.loads(line) for line in f]
  assert history == [{'step': 5, 'changes': {'num_epochs': {'from': 2, 'to': 3},
                                             'num_train_steps': {'from': 5, 'to': 8}}}]
  assert json.load(open(os.path.join(workdir, 'config.json')))['num_epochs'] == 3


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_identically(train_dataset, uninterrupted,
                                                                       tmp_path):
  workdir = str(tmp_path / 'preempted')

  def send_sigterm_after_the_first_steps():
    deadline = time.time() + 300
    while time.time() < deadline and len(train_losses(workdir)) < 2:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  killer = threading.Thread(target=send_sigterm_after_the_first_steps, daemon=True)
  killer.start()
  with pytest.raises(SystemExit) as stopped:
    loop.train_and_evaluate(tiny_config(train_dataset), workdir)
  killer.join()
  assert stopped.value.code == loop.PREEMPTED_EXIT_CODE
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert saved and 2 <= saved[-1] < 8
  summary = loop.train_and_evaluate(tiny_config(train_dataset), workdir)
  assert summary['steps'] == 8
  assert_trees_equal(final_params(workdir), final_params(uninterrupted[0]))


def test_initialising_from_an_exported_model(train_dataset, uninterrupted, tmp_path):
  config = tiny_config(train_dataset, init_checkpoint=os.path.join(uninterrupted[0], 'model'))
  model_config = config_lib.build_model_config(config)
  assert_trees_equal(loop.initial_model_params(config, model_config), final_params(uninterrupted[0]))
  other = tiny_config(train_dataset, init_checkpoint=os.path.join(uninterrupted[0], 'model'),
                      **{'model.block_types': 'I C I N'})
  with pytest.raises(errors.ConfigError, match='other settings'):
    loop.initial_model_params(other, config_lib.build_model_config(other))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_of_two_devices_match_one_process_of_four(train_dataset, uninterrupted, tmp_path):
  workdir = str(tmp_path / 'two_processes')
  port = _free_port()
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2', 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': REPO}
  processes = [subprocess.Popen(
      command_line(train_dataset, workdir, num_epochs=2) + [
          f'--coordinator-address=127.0.0.1:{port}', '--num-processes=2', f'--process-id={i}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for (out, err), process in zip(outputs, processes):
    assert process.returncode == 0, err[-3000:]
  assert 'held-out pairs after 5 steps' in outputs[0][0]
  assert 'held-out pairs after' not in outputs[1][0]  # only process 0 reports
  two = train_losses(workdir)
  one = train_losses(uninterrupted[0])
  assert sorted(two) == [1, 2, 3, 4, 5]
  for step in two:
    assert two[step] == pytest.approx(one[step], abs=1e-5)


def test_hard_negative_miner(train_dataset, tmp_path):
  config = tiny_config(train_dataset, train_backbone=False,
                       **{'hard_mining.enabled': True, 'hard_mining.pool_size': 4,
                          'hard_mining.round_steps': 3, 'hard_mining.num_hard': 2,
                          'hard_mining.batch_size': 2})
  model_config = config_lib.build_model_config(config)
  params = loop.initial_model_params(config, model_config)
  current = lambda: params
  miner = hard_mining.HardNegativeMiner(train_dataset, model_config, config, str(tmp_path))
  first = miner.negatives(0, current)
  assert first['hard_index_a'].shape == (jax.local_device_count(), 2) and first['hard_index_a'].dtype == np.int32
  # The pool stays on every device: (D, P, h, w, C) float16, unit features, one copy per device.
  pool = miner.pool
  assert pool.shape == (jax.local_device_count(), 4, 8, 8, 16) and pool.dtype == np.float16
  assert len(pool.addressable_shards) == jax.local_device_count()
  np.testing.assert_allclose(np.linalg.norm(np.asarray(pool[0], np.float32), axis=-1), 1.0, atol=2e-3)
  pairs = {tuple(p) for p in hard_mining.pool_pairs(4).tolist()}
  drawn = np.stack([first['hard_index_a'], first['hard_index_b']], -1).reshape(-1, 2)
  assert all(tuple(p) in pairs for p in drawn.tolist())   # each negative is a pool pair (i < j)
  stored = np.load(os.path.join(str(tmp_path), 'hard_mining', 'round_0.npz'))
  assert stored['scores'].shape == (6,) and len(stored['pool']) == 4   # 4 pool images, 6 pairs
  assert np.all((stored['scores'] == 0) | (stored['scores'] > 0.04))
  # A fresh miner (a resumed run) reads the round's scores back and draws the same negatives.
  again = hard_mining.HardNegativeMiner(train_dataset, model_config, config, str(tmp_path))
  for key in first:
    np.testing.assert_array_equal(again.negatives(0, current)[key], first[key])
  np.testing.assert_array_equal(np.asarray(again.pool), np.asarray(pool))
  later = [again.negatives(step, current) for step in (1, 2)]
  assert any(not np.array_equal(n['hard_index_a'], first['hard_index_a']) or
             not np.array_equal(n['hard_index_b'], first['hard_index_b']) for n in later)


def test_draw_negatives_follows_the_scores():
  rng = np.random.default_rng(0)
  scores = np.array([0.0, 1.0, 3.0, 0.0])
  counts = np.bincount([hard_mining.draw_negatives(scores, 1, rng)[0] for _ in range(4000)], minlength=4)
  assert counts[0] == counts[3] == 0
  assert counts[2] / counts[1] == pytest.approx(3.0, rel=0.15)
  both = hard_mining.draw_negatives(scores, 2, rng)
  assert sorted(both.tolist()) == [1, 2]   # without replacement
  assert len(hard_mining.draw_negatives(np.zeros(5), 3, rng)) == 3   # uniform fallback
  assert hard_mining.pool_pairs(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]


def test_a_short_hard_mining_run(train_dataset, tmp_path):
  config = tiny_config(train_dataset, train_backbone=False, num_epochs=2, warmup_steps=0,
                       **{'hard_mining.enabled': True, 'hard_mining.pool_size': 4,
                          'hard_mining.round_steps': 2, 'hard_mining.num_hard': 1,
                          'hard_mining.batch_size': 2}, profile_steps=(1, 1))
  summary = loop.train_and_evaluate(config, str(tmp_path / 'stage2'))
  assert summary['steps'] == 3
  # The profiler hook: a trace of step 1 (what TensorBoard's profile plugin reads).
  traces = [f for _, _, files in os.walk(str(tmp_path / 'stage2' / 'profile')) for f in files]
  assert any(f.endswith('.xplane.pb') for f in traces), traces
  assert sorted(os.listdir(str(tmp_path / 'stage2' / 'hard_mining'))) == ['round_0.npz', 'round_1.npz']
  rounds = [r for r in train_logging.read_metrics(str(tmp_path / 'stage2')) if 'mining/hard_score_max' in r]
  assert [r['step'] for r in rounds] == [0, 2]


def test_a_workdir_of_another_model_is_refused_and_left_alone(train_dataset, uninterrupted):
  workdir = uninterrupted[0]
  before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
  with pytest.raises(errors.ConfigError, match=r'another model \(differs in: d_model, size\)'):
    loop.train_and_evaluate(tiny_config(train_dataset, **{'model.size': 'small'}), workdir)
  after = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
  assert before == after


def test_a_dataset_with_wrong_feature_shapes_is_refused(train_dataset, tmp_path):
  source = builder.data_source(train_dataset, 'train')
  examples = []
  for index in range(2):
    example = dict(source[index])
    example['mask_a'] = np.zeros((5, 5), np.float32)   # 128 px pairs need 8 x 8 maps
    example['source'] = 'bundled'
    examples.append((index, example))
  data_dir = str(tmp_path / 'broken')
  builder.write_dataset(data_dir, 'bundled', {'train': lambda: iter(examples),
                                              'validation': lambda: iter(examples)}, {'image_size': 128})
  with pytest.raises(errors.DataError, match=r'feature mask_a has shape \(5, 5\), expected \(8, 8\)'):
    loop.train_and_evaluate(tiny_config(data_dir), str(tmp_path / 'workdir'))
  with pytest.raises(errors.ConfigError, match='holds 128x128 pairs, the config trains at 256'):
    loop.train_and_evaluate(tiny_config(train_dataset, **{'data.image_size': 256}), str(tmp_path / 'w2'))
  assert not os.path.exists(str(tmp_path / 'w2' / 'checkpoints'))


def test_cli_errors_are_one_line(train_dataset, tmp_path):
  env = {**os.environ, 'PYTHONPATH': REPO}
  for extra, expected in ((['--config.no_such_key=1'], 'unknown config key'),
                          (['--config.batch_neg=7'], 'in-batch negatives')):
    result = subprocess.run(command_line(train_dataset, str(tmp_path / 'w')) + extra, cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert 'Traceback' not in result.stderr


def test_brueghel_validation_picks_the_best_checkpoint(train_dataset, brueghel_dir, tmp_path):
  from eval import brueghel
  workdir = str(tmp_path / 'with_brueghel')
  config = tiny_config(train_dataset, num_epochs=2, brueghel_dir=str(brueghel_dir), brueghel_db_size=128,
                       brueghel_box_size=32, brueghel_batch_size=2)
  summary = loop.train_and_evaluate(config, workdir)
  records = [r for r in train_logging.read_metrics(workdir) if 'val/brueghel_map' in r]
  assert [r['step'] for r in records] == [0, 2, 5]
  assert summary['best']['metric'] == 'brueghel_map'
  best_step = summary['best']['step']
  assert summary['best']['value'] == max(r['val/brueghel_map'] for r in records if r['step'] > 0)
  # The kept model scores what validation said, when evaluated on its own.
  params, model_config = checkpoints.load_model(os.path.join(workdir, 'best'))
  again = brueghel.evaluate(str(brueghel_dir), 'val', params, model_config, 2,
                            cache_dir=str(tmp_path / 'cache'), work_dir=str(tmp_path / 'partial'),
                            db_size=128, box_size=32)
  expected = next(r['val/brueghel_map'] for r in records if r['step'] == best_step)
  assert again['retrieval_map'] == pytest.approx(expected, abs=1e-6)


def test_the_compilation_cache_folder(tmp_path):
  """'' = $SEGSWAP_JAX_COMPILATION_CACHE or ~/.cache/segswap_jax/xla, 'none' = off, a path = that folder
  (set in a fresh process: JAX keeps the first folder of a process)."""
  from segswap_jax import compilation_cache
  assert compilation_cache.cache_dir('none') == ''
  assert compilation_cache.cache_dir(str(tmp_path / 'c')) == str(tmp_path / 'c')
  script = ('import jax; from segswap_jax import compilation_cache as c; '
            f'print(c.enable({str(tmp_path / "xla")!r})); print(jax.config.jax_compilation_cache_dir)')
  env = dict(os.environ, SEGSWAP_JAX_COMPILATION_CACHE='none')
  out = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == [str(tmp_path / 'xla')] * 2 and os.path.isdir(str(tmp_path / 'xla'))
