"""Conversion of torchvision / MoCo ResNet-50 checkpoints, checked against an independent torch forward."""
import numpy as np
import pytest

from segswap_jax import checkpoints, convert, errors, model as model_lib
import reference_fixture as ref

torch = pytest.importorskip('torch')
F = torch.nn.functional

STAGES = (('layer1', 64, 3), ('layer2', 128, 4), ('layer3', 256, 6), ('layer4', 512, 3))


def torchvision_resnet50_state(seed=0):
  """A random state dict with exactly torchvision's ResNet-50 key layout (fc and layer4 included)."""
  g = torch.Generator().manual_seed(seed)
  state = {}

  def conv(name, cout, cin, k):
    state[f'{name}.weight'] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

  def bn(name, c):
    state[f'{name}.weight'] = 1 + 0.1 * torch.randn(c, generator=g)
    state[f'{name}.bias'] = 0.05 * torch.randn(c, generator=g)
    state[f'{name}.running_mean'] = 0.1 * torch.randn(c, generator=g)
    state[f'{name}.running_var'] = 1 + 0.1 * torch.rand(c, generator=g)
    state[f'{name}.num_batches_tracked'] = torch.tensor(100)

  conv('conv1', 64, 3, 7)
  bn('bn1', 64)
  cin = 64
  for stage, planes, blocks in STAGES:
    for i in range(blocks):
      p = f'{stage}.{i}'
      conv(f'{p}.conv1', planes, cin, 1); bn(f'{p}.bn1', planes)
      conv(f'{p}.conv2', planes, planes, 3); bn(f'{p}.bn2', planes)
      conv(f'{p}.conv3', planes * 4, planes, 1); bn(f'{p}.bn3', planes * 4)
      if i == 0:
        conv(f'{p}.downsample.0', planes * 4, cin, 1); bn(f'{p}.downsample.1', planes * 4)
      cin = planes * 4
  state['fc.weight'] = torch.randn(1000, 2048, generator=g)
  state['fc.bias'] = torch.randn(1000, generator=g)
  return state


def torch_conv4(state, x):
  """torchvision ResNet-50 forward to layer3, written with torch.nn.functional (independent oracle)."""
  def bn(name, y):
    return F.batch_norm(y, state[f'{name}.running_mean'], state[f'{name}.running_var'], state[f'{name}.weight'],
                        state[f'{name}.bias'], training=False, eps=1e-5)
  y = F.relu(bn('bn1', F.conv2d(x, state['conv1.weight'], stride=2, padding=3)))
  y = F.max_pool2d(y, 3, 2, 1)
  for stage, _, blocks in STAGES[:3]:
    for i in range(blocks):
      p, stride = f'{stage}.{i}', (2 if i == 0 and stage != 'layer1' else 1)
      out = F.relu(bn(f'{p}.bn1', F.conv2d(y, state[f'{p}.conv1.weight'])))
      out = F.relu(bn(f'{p}.bn2', F.conv2d(out, state[f'{p}.conv2.weight'], stride=stride, padding=1)))
      out = bn(f'{p}.bn3', F.conv2d(out, state[f'{p}.conv3.weight']))
      identity = bn(f'{p}.downsample.1', F.conv2d(y, state[f'{p}.downsample.0.weight'], stride=stride)) if i == 0 else y
      y = F.relu(out + identity)
  return y


@pytest.mark.parametrize('layout', ['torchvision', 'moco'])
def test_resnet50_checkpoint_matches_torch_forward(layout, tmp_path):
  state = torchvision_resnet50_state()
  if layout == 'moco':  # MoCo-v2 release: {'state_dict': {'module.encoder_q.*'}, 'epoch', ...}, MLP head.
    saved = {'state_dict': {f'module.encoder_q.{k}': v for k, v in state.items() if not k.startswith('fc.')}
             | {'module.encoder_q.fc.0.weight': torch.zeros(2048, 2048), 'module.encoder_q.fc.2.bias': torch.zeros(128)},
             'epoch': 800, 'arch': 'resnet50'}
  else:
    saved = state
  torch.save(saved, tmp_path / 'resnet.pth')
  report = convert.convert_file(str(tmp_path / 'resnet.pth'), str(tmp_path / 'out'), model_lib.model_config('tiny'))
  assert report['kind'] == 'resnet50'
  assert any(k.startswith('layer4.') for k in report['ignored_keys'])
  assert any(k.startswith('fc') for k in report['ignored_keys'])
  params, config = checkpoints.load_model(str(tmp_path / 'out'))
  x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
  expected = torch_conv4(state, x).permute(0, 2, 3, 1).numpy()
  got = model_lib.build_backbone(config).apply(params['backbone'], x.permute(0, 2, 3, 1).numpy())
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_missing_key_and_shape_mismatch_are_named():
  fixture = ref.load_fixture()
  state = ref.regenerate_checkpoint(fixture)
  config = model_lib.model_config()
  broken = {'backbone': dict(state['backbone']), 'encoder': dict(state['encoder'])}
  del broken['backbone']['6.5.bn3.running_var']
  with pytest.raises(errors.CheckpointError, match=r"layer3\.5\.bn3\.running_var"):
    convert.convert_state(broken, config)
  broken = {'backbone': state['backbone'], 'encoder': dict(state['encoder'])}
  broken['encoder']['net.feat_proj.weight'] = np.zeros((128, 1024, 1, 1), np.float32)
  with pytest.raises(errors.CheckpointError, match=r'net\.feat_proj\.weight: shape'):
    convert.convert_state(broken, config)
  with pytest.raises(errors.CheckpointError, match='unexpected key'):  # a 'tiny' model cannot take it
    convert.convert_state(state, model_lib.model_config('small', 'I C I C'))


def test_cli_errors_are_one_line(tmp_path, capsys):
  not_pth = tmp_path / 'notes.pth'
  not_pth.write_text('hello')
  assert convert.main(['--torch-checkpoint', str(not_pth), '--out', str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and 'notes.pth' in err and '\n' not in err
  assert convert.main(['--torch-checkpoint', str(tmp_path / 'missing.pth'), '--out', str(tmp_path / 'o')]) == 2
  assert 'missing.pth' in capsys.readouterr().err
  torch.save({'weights': torch.zeros(3)}, tmp_path / 'other.pth')
  assert convert.main(['--torch-checkpoint', str(tmp_path / 'other.pth'), '--out', str(tmp_path / 'o')]) == 2
  assert 'not a SegSwap' in capsys.readouterr().err
