"""NC-Net as a second architecture behind the same outputs: a tiny NC-Net trains, saves and runs through
predict, the mini Tokyo 24/7 and Internet evaluations; an original NC-Net `.pth.tar` converts."""
import argparse
import json
import os

import jax
import numpy as np
import pytest

from benchmarks import planted
from configs.data import demo_train
from data_pipeline import generate
from eval import internet, tokyo247
from segswap_jax import checkpoints
from segswap_jax import convert
from segswap_jax import ncnet
from segswap_jax import predict
from segswap_jax.training import loop
from segswap_jax.training import metrics
from test_eval_place_recognition import TOKYO_QRY, _run, tokyo  # noqa: F401 (fixture: a miniature Tokyo 24/7)
from test_ncnet import drawn, fixture, state_dict  # noqa: F401 (fixtures)
from test_train import tiny_config

# A small NC-Net (NeighConsensus 3, 3 / 8, 1 over a 128-channel small CNN) on the demo's kind of pairs:
# 320 steps of 1 positive on each of the 4 test devices (no in-batch negatives, so the masks rise within
# the test's budget).
NCNET = {'model.arch': 'ncnet', 'model.ncnet_kernel_sizes': (3, 3), 'model.ncnet_channels': (8, 1),
         'model.backbone_widths': (16, 32, 64, 128), 'warmup_steps': 20, 'num_epochs': 2, 'steps_per_epoch': 300,
         'batch_pos': 1, 'batch_neg': 0, 'learning_rate': 1e-3, 'log_every_steps': 20, 'vis_num_pairs': 0}


@pytest.fixture(scope='module')
def demo_pairs(tmp_path_factory):
  """128 + 16 pairs made like the demo's (128 px, large copy-pasted objects)."""
  config = demo_train.get_config()
  config.num_pairs, config.num_validation, config.shard_size, config.num_workers = 128, 16, 32, 1
  return generate.generate(config, str(tmp_path_factory.mktemp('demo_pairs')))


@pytest.fixture(scope='module')
def trained(demo_pairs, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ncnet') / 'workdir')
  return workdir, loop.train_and_evaluate(tiny_config(demo_pairs, **NCNET), workdir)


def test_a_tiny_ncnet_trains(trained):
  workdir, summary = trained
  params, config = checkpoints.load_model(os.path.join(workdir, 'model'))
  assert config.arch == 'ncnet' and list(config.ncnet_kernel_sizes) == [3, 3] and 'ncnet' in params
  assert 'transformer' not in params
  losses = [r['train/loss'] for r in metrics.read_metrics(workdir) if 'train/loss' in r]
  assert summary['steps'] == 320 and len(losses) == 16
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
  before, after = summary['before'], summary['after']
  assert after['mask_iou'] > before['mask_iou'] + 0.05
  assert after['corr_error_median'] < 0.7 * before['corr_error_median']


def test_predict_tokyo_and_internet_run_on_an_ncnet_checkpoint(trained, tokyo, tmp_path, capsys):  # noqa: F811
  model_dir = os.path.join(trained[0], 'model')
  folder = tmp_path / 'photos'
  collection = planted.make_planted_collection(groups=((0, 1, 2),), num_images=4, image_size=64, patch_cells=2,
                                               seed=3)
  names = planted.write_class_folder(collection, str(folder / 'Horse100'))
  images = [str(folder / 'Horse100' / n) for n in names]
  out = tmp_path / 'result.npz'
  assert predict.main(['--checkpoint', model_dir, '--query', images[0], '--targets', *images[1:3],
                       '--image-size', '64', '64', '--out', str(out)]) == 0
  with np.load(out) as result:
    assert result['out_query'].shape == (2, 4, 4, 3) and np.isfinite(result['scores']).all()
  code, tokyo_result = _run(tokyo247.main, tokyo, model_dir, tmp_path / 'tokyo.json')
  assert code == 0 and [q['name'] for q in tokyo_result['queries']] == TOKYO_QRY
  assert all(np.isfinite(q['scores']).all() for q in tokyo_result['queries'])
  results = tmp_path / 'internet.json'
  assert internet.main(['--checkpoint', model_dir, '--data-dir', str(folder), '--classes', 'Horse100',
                        '--image-size', '64', '--batch-size', '4', '--sigma', '1.5', '--out', str(results)]) == 0
  rows = json.loads(results.read_text())['rows']
  assert 0.0 <= rows[0]['classes']['Horse100']['P'] <= 1.0
  capsys.readouterr()


def _original_ncnet_file(path, drawn, kernel_sizes=(3, 3, 3), channels=(10, 10, 1), with_args=True):  # noqa: F811
  """An NC-Net `.pth.tar` as the original code writes it: ResNet-101 to layer3 under
  `FeatureExtraction.model.` (an nn.Sequential: 0 conv1, 1 bn1, 4..6 layer1..3), the fixture's
  NeighConsensus weights (stored layout) under `NeighConsensus.`, and the training args."""
  torch = pytest.importorskip('torch')
  config = convert.ncnet_model_config(kernel_sizes, channels)
  abstract = checkpoints.abstract_params(config)['backbone']
  rng = np.random.default_rng(0)
  state = {}
  index = {'conv1': '0', 'bn1': '1', 'layer1': '4', 'layer2': '5', 'layer3': '6'}
  for path_keys, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    name = convert._backbone_source_name(tuple(k.key for k in path_keys))
    head, _, rest = name.partition('.')
    shape = leaf.shape
    if len(shape) == 4:  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    state[f'FeatureExtraction.model.{index[head]}.{rest}'] = torch.from_numpy(
        np.abs(rng.standard_normal(shape).astype(np.float32)) * 0.01 + (1.0 if name.endswith('running_var') else 0.0))
  weights, _ = drawn
  for key, value in state_dict(weights, 'ncA').items():
    state[f'NeighConsensus.{key}'] = torch.from_numpy(value)
  checkpoint = {'state_dict': state, 'epoch': 5}
  if with_args:
    checkpoint['args'] = argparse.Namespace(ncons_kernel_sizes=list(kernel_sizes), ncons_channels=list(channels),
                                            lr=0.0005)
  torch.save(checkpoint, path)
  return state


def test_an_original_ncnet_checkpoint_converts(drawn, fixture, tmp_path, capsys):  # noqa: F811
  source = str(tmp_path / 'ncnet_pfpascal.pth.tar')
  state = _original_ncnet_file(source, drawn)
  out = str(tmp_path / 'converted')
  assert convert.main(['--torch-checkpoint', source, '--out', out]) == 0
  assert 'converted ncnet checkpoint' in capsys.readouterr().out
  params, config = checkpoints.load_model(out)
  assert config.arch == 'ncnet' and config.backbone == 'resnet101_conv4'
  assert list(config.ncnet_kernel_sizes) == [3, 3, 3] and list(config.ncnet_channels) == [10, 10, 1]
  # The consensus of the converted model computes what the original does on the same correlation.
  net = ncnet.NeighConsensus((3, 3, 3), (10, 10, 1))
  corr = np.asarray(fixture['mutual1'])[:, 0, ..., None]
  filtered = net.apply({'params': params['ncnet']['params']['consensus']}, corr)[..., 0]
  np.testing.assert_allclose(filtered, np.asarray(fixture['consensus_ncA'])[:, 0], rtol=1e-5, atol=1e-5)
  kernel = params['backbone']['params']['layer3_22']['conv3']['kernel']
  np.testing.assert_array_equal(kernel, state['FeatureExtraction.model.6.22.conv3.weight'].numpy().transpose(2, 3, 1, 0))
  # It runs through predict like any model.
  photos = planted.make_planted_collection(groups=((0, 1),), num_images=2, image_size=64, patch_cells=2, seed=1)
  names = planted.write_class_folder(photos, str(tmp_path / 'photos'), ground_truth=False)
  images = [str(tmp_path / 'photos' / n) for n in names]
  assert predict.main(['--checkpoint', out, '--query', images[0], '--targets', images[1], '--image-size', '64',
                       '64', '--out', str(tmp_path / 'r.npz')]) == 0


def test_ncnet_conversion_errors_are_one_line(drawn, tmp_path, capsys):  # noqa: F811
  source = str(tmp_path / 'ncnet.pth.tar')
  _original_ncnet_file(source, drawn)
  assert convert.main(['--torch-checkpoint', source, '--out', str(tmp_path / 'a'),
                       '--ncnet-kernel-sizes', '5', '5', '5']) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err
  assert '--ncnet-kernel-sizes [5, 5, 5] does not match the checkpoint\'s [3, 3, 3]' in err
  bare = str(tmp_path / 'bare.pth.tar')
  _original_ncnet_file(bare, drawn, with_args=False)
  assert convert.main(['--torch-checkpoint', bare, '--out', str(tmp_path / 'b')]) == 2
  assert 'give --ncnet-kernel-sizes and --ncnet-channels' in capsys.readouterr().err
  # Told the layers, a file without args converts; told wrong ones, the shapes are named.
  assert convert.main(['--torch-checkpoint', bare, '--out', str(tmp_path / 'c'), '--ncnet-kernel-sizes', '3', '3',
                       '3', '--ncnet-channels', '16', '16', '1']) == 2
  err = capsys.readouterr().err.strip()
  assert 'NeighConsensus.conv.0.weight has shape (3, 10, 1, 3, 3, 3), expected (3, 16, 1, 3, 3, 3)' in err
  assert convert.main(['--torch-checkpoint', bare, '--out', str(tmp_path / 'd'), '--ncnet-kernel-sizes', '3', '3',
                       '3', '--ncnet-channels', '10', '10', '1']) == 0
