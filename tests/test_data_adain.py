"""AdaIN in JAX against a PyTorch model of the pytorch-AdaIN layout, through the .pth converter."""
import numpy as np
import pytest

from data_pipeline import adain
from data_pipeline import segments
from segswap_jax.errors import DataError
import test_data_support as support


def torch_models(torch):
  """vgg_normalised (all 53 modules) and decoder as nn.Sequential, pytorch-AdaIN's layout, random."""
  nn = torch.nn
  conv = lambda i, o: [nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(i, o, (3, 3)), nn.ReLU()]
  pool = lambda: [nn.MaxPool2d((2, 2), (2, 2), (0, 0), ceil_mode=True)]
  vgg = ([nn.Conv2d(3, 3, (1, 1))] + conv(3, 64) + conv(64, 64) + pool() + conv(64, 128) +
         conv(128, 128) + pool() + conv(128, 256) + conv(256, 256) + conv(256, 256) + conv(256, 256) +
         pool() + conv(256, 512) + conv(512, 512) + conv(512, 512) + conv(512, 512) + pool() +
         conv(512, 512) + conv(512, 512) + conv(512, 512) + conv(512, 512))
  up = lambda: [nn.Upsample(scale_factor=2, mode='nearest')]
  decoder = (conv(512, 256) + up() + conv(256, 256) + conv(256, 256) + conv(256, 256) +
             conv(256, 128) + up() + conv(128, 128) + conv(128, 64) + up() + conv(64, 64) +
             conv(64, 3)[:2])
  torch.manual_seed(0)
  vgg, decoder = nn.Sequential(*vgg), nn.Sequential(*decoder)
  for model in (vgg, decoder):
    for module in model:
      if isinstance(module, nn.Conv2d):  # keep activations O(1) through 10 layers
        fan_in = module.weight[0].numel()
        nn.init.normal_(module.weight, std=np.sqrt(2.0 / fan_in))
        nn.init.uniform_(module.bias, -0.1, 0.1)
  assert len(vgg) == 53
  return vgg.eval(), decoder.eval()


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  torch = pytest.importorskip('torch')
  vgg, decoder = torch_models(torch)
  directory = tmp_path_factory.mktemp('adain')
  torch.save(vgg.state_dict(), directory / 'vgg_normalised.pth')
  torch.save(decoder.state_dict(), directory / 'decoder.pth')
  adain.main(['--vgg', str(directory / 'vgg_normalised.pth'), '--decoder',
              str(directory / 'decoder.pth'), '--out', str(directory / 'adain.npz')])
  return torch, vgg, decoder, str(directory / 'adain.npz')


def test_jax_adain_matches_pytorch(converted):
  torch, vgg, decoder, weights = converted
  params = adain.load_params(weights)
  rng = np.random.default_rng(0)
  content = rng.random((1, 36, 52, 3), dtype=np.float32)  # odd sizes after pooling: ceil mode
  style = rng.random((1, 44, 40, 3), dtype=np.float32)
  to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    encoder = vgg[:31]
    content_t, style_t = encoder(to_torch(content)), encoder(to_torch(style))
    def stats(f):
      return f.mean(dim=(2, 3), keepdim=True), (f.flatten(2).var(dim=2) + 1e-5).sqrt()[..., None, None]
    (cm, cs), (sm, ss) = stats(content_t), stats(style_t)
    alpha = 0.7
    t = (content_t - cm) / cs * ss + sm
    expected = decoder(alpha * t + (1 - alpha) * content_t).clamp(0, 1).numpy().transpose(0, 2, 3, 1)
  features = np.asarray(adain.encode(params, content))
  assert features.shape == (1, 5, 7, 512)
  np.testing.assert_allclose(features, content_t.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  mean, std = adain.mean_std(adain.encode(params, style))
  out = np.asarray(adain.stylize(params, content, mean, std, np.asarray([alpha], np.float32)))
  assert out.shape == expected.shape == (1, 40, 56, 3)
  np.testing.assert_allclose(out, expected, atol=2e-4)


def test_stylizer_end_to_end(converted):
  _, _, _, weights = converted
  image = segments.read_image(support.bundled('chelsea.png'))[:96, :96]
  stylizer = adain.AdaINStylizer(weights, [support.bundled('coffee.png')], content_size=48)
  out = stylizer(image, np.random.default_rng(1))
  assert out.shape == image.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, stylizer(image, np.random.default_rng(1)))


def test_converter_refuses_other_layouts(converted):
  torch, vgg, decoder, _ = converted
  state = {k: v.numpy() for k, v in vgg.state_dict().items()}
  with pytest.raises(DataError, match=r"vgg: not the expected layout \(missing \['29.bias'"):
    adain.convert_state_dicts({k: v for k, v in state.items() if k != '29.bias'},
                              decoder.state_dict())
  with pytest.raises(DataError, match=r"decoder: not the expected layout .*unknown \['99.weight'\]"):
    adain.convert_state_dicts(state, {**decoder.state_dict(), '99.weight': np.zeros(1)})
  with pytest.raises(DataError, match='AdaIN weights .*missing.npz: unreadable'):
    adain.load_params('missing.npz')
