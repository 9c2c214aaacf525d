"""NC-Net building blocks against the original PyTorch code's outputs on seeded weights and inputs
(`tests/fixtures/ncnet_seed11.npz`; its `readme` and `rule` say how it was made)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segswap_jax import convert
from segswap_jax import errors
from segswap_jax import ncnet

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'ncnet_seed11.npz')
B, C, HA, WA, HB, WB = 2, 64, 6, 8, 5, 7
CONV_IN_SHAPE = (2, 3, 5, 4, 6, 3)
CONFIGS = {'ncA': ((3, 3, 3), (10, 10, 1)), 'ncB': ((5, 5, 5), (16, 16, 1))}
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def fixture():
  with np.load(FIXTURE) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope='module')
def drawn(fixture):
  """Weights and inputs regenerated from the fixture's rule with numpy alone."""
  rng = np.random.default_rng(int(fixture['seed']))
  weights = {}
  for key, shape, scale, offset in zip(fixture['keys'], fixture['shapes'], fixture['scales'], fixture['offsets']):
    shape = tuple(int(s) for s in str(shape).strip('()').split(',') if s.strip())
    weights[str(key)] = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale) + np.float32(offset)
  inputs = {'feat_a_raw': rng.standard_normal((B, C, HA, WA), dtype=np.float32),
            'feat_b_raw': rng.standard_normal((B, C, HB, WB), dtype=np.float32),
            'conv4d_in': rng.standard_normal(CONV_IN_SHAPE, dtype=np.float32)}
  return weights, inputs


def state_dict(weights, module):
  """The original module's state dict (keys `conv.0.weight`, ...; stored layout) from the drawn weights."""
  return {key[len(module) + 1:]: value for key, value in weights.items() if key.startswith(module + '.')}


def channels_last(corr):
  """(B, 1, hA, wA, hB, wB) -> (B, hA, wA, hB, wB)."""
  return np.asarray(corr)[:, 0]


def consensus(weights, module, impl='4d'):
  kernel_sizes, channels = CONFIGS[module]
  params = convert.ncnet_consensus_params(state_dict(weights, module), kernel_sizes, channels)
  net = ncnet.NeighConsensus(kernel_sizes, channels, symmetric=True, impl=impl)
  return lambda corr: net.apply({'params': params}, jnp.asarray(corr)[..., None])[..., 0]


def test_the_rule_regenerates_every_weight_and_input(fixture, drawn):
  weights, inputs = drawn
  for key, value in weights.items():
    np.testing.assert_array_equal(value, fixture[f'w__{key}'])
  for key, value in inputs.items():
    np.testing.assert_array_equal(value, fixture[key])


def test_features_and_correlation(fixture, drawn):
  _, inputs = drawn
  feat_a = ncnet.feature_l2_norm(jnp.asarray(np.moveaxis(inputs['feat_a_raw'], 1, -1)))
  feat_b = ncnet.feature_l2_norm(jnp.asarray(np.moveaxis(inputs['feat_b_raw'], 1, -1)))
  np.testing.assert_allclose(feat_a, fixture['feat_a_nhwc'], **TOL)
  np.testing.assert_allclose(feat_b, fixture['feat_b_nhwc'], **TOL)
  corr = ncnet.correlation_4d(feat_a, feat_b)
  assert corr.shape == (B, HA, WA, HB, WB)
  np.testing.assert_allclose(corr, channels_last(fixture['corr4d']), **TOL)
  np.testing.assert_allclose(ncnet.mutual_matching(corr), channels_last(fixture['mutual1']), **TOL)
  # With a trailing channel the same numbers come back in the same layout.
  np.testing.assert_allclose(ncnet.mutual_matching(corr[..., None])[..., 0], channels_last(fixture['mutual1']),
                             **TOL)


@pytest.mark.parametrize('module', sorted(CONFIGS))
@pytest.mark.parametrize('impl', ncnet.CONV_IMPLS)
def test_neighbourhood_consensus_from_an_original_state_dict(fixture, drawn, module, impl):
  weights, _ = drawn
  net = consensus(weights, module, impl)
  filtered = net(channels_last(fixture['mutual1']))
  np.testing.assert_allclose(filtered, channels_last(fixture[f'consensus_{module}']), **TOL)
  np.testing.assert_allclose(ncnet.mutual_matching(filtered), channels_last(fixture[f'mutual2_{module}']), **TOL)


@pytest.mark.parametrize('impl', ncnet.CONV_IMPLS)
def test_lone_conv4d(fixture, drawn, impl):
  weights, inputs = drawn
  x = jnp.asarray(np.moveaxis(inputs['conv4d_in'], 1, -1))                     # (b, d1..d4, c_in)
  kernel = weights['conv4d.weight'].transpose(0, 3, 4, 5, 2, 1)               # stored -> (k1..k4, in, out)
  out = ncnet.conv4d(x, kernel, weights['conv4d.bias'], impl)
  np.testing.assert_allclose(out, np.moveaxis(fixture['conv4d_out'], 1, -1), **TOL)


def test_the_two_conv4d_forms_agree_on_other_shapes():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 4, 5, 3, 6, 2), dtype=np.float32))
  kernel = jnp.asarray(rng.standard_normal((5, 5, 5, 5, 2, 3), dtype=np.float32) * 0.05)
  np.testing.assert_allclose(ncnet.conv4d(x, kernel, impl='4d'), ncnet.conv4d(x, kernel, impl='3d'),
                             rtol=1e-5, atol=1e-5)


def test_maxpool4d_values_and_offsets_per_batch_item(fixture):
  values, (i, j, k, l) = ncnet.maxpool4d(jnp.asarray(channels_last(fixture['maxpool_in'])), 2)
  np.testing.assert_allclose(values, channels_last(fixture['maxpool_val']), **TOL)
  for ours, name in ((i, 'i'), (j, 'j'), (k, 'k'), (l, 'l')):
    assert ours.dtype == jnp.int32
    np.testing.assert_array_equal(ours, channels_last(fixture[f'maxpool_{name}']))
  # The offsets point at the maxima (the original's check, here on both batch items at once).
  source = channels_last(fixture['maxpool_in'])
  grid = np.indices(values.shape)
  picked = source[grid[0], 2 * grid[1] + np.asarray(i), 2 * grid[2] + np.asarray(j), 2 * grid[3] + np.asarray(k),
                  2 * grid[4] + np.asarray(l)]
  np.testing.assert_array_equal(picked, np.asarray(values))
  # The original, called on the whole batch, maxes across it; ours does not.
  assert not np.allclose(np.asarray(values)[:1], channels_last(fixture['maxpool_b2quirk_val']))


def test_relocalised_chain(fixture, drawn):
  weights, _ = drawn
  pooled, _ = ncnet.maxpool4d(jnp.asarray(channels_last(fixture['maxpool_in'])), 2)
  chain = ncnet.mutual_matching(consensus(weights, 'ncA')(ncnet.mutual_matching(pooled)))
  np.testing.assert_allclose(chain, channels_last(fixture['reloc_mutual2_ncA']), **TOL)


def test_symmetric_consensus_does_not_depend_on_the_order_of_the_images(fixture, drawn):
  weights, _ = drawn
  net = consensus(weights, 'ncA')
  corr = channels_last(fixture['mutual1'])
  np.testing.assert_allclose(net(ncnet.swap_ab(jnp.asarray(corr))), ncnet.swap_ab(net(corr)), rtol=1e-5, atol=1e-6)


def test_wrong_ranks_and_mismatching_checkpoints_are_one_line_errors(drawn):
  weights, _ = drawn
  with pytest.raises(errors.DataError, match=r'correlation_4d feat_a: expected a rank-4 array .* got shape \(6, 8, 64\)'):
    ncnet.correlation_4d(jnp.zeros((6, 8, 64)), jnp.zeros((1, 5, 7, 64)))
  with pytest.raises(errors.DataError, match=r'mutual_matching: expected a rank-5 array'):
    ncnet.mutual_matching(jnp.zeros((2, 3, 4, 5)))
  with pytest.raises(errors.DataError, match=r'must divide by k=2'):
    ncnet.maxpool4d(jnp.zeros((1, 3, 4, 4, 4)), 2)
  with pytest.raises(errors.CheckpointError, match=r'conv\.0\.weight has shape \(3, 10, 1, 3, 3, 3\), expected '
                                                   r'\(5, 10, 1, 5, 5, 5\)'):
    convert.ncnet_consensus_params(state_dict(weights, 'ncA'), (5, 5, 5), (10, 10, 1))
  with pytest.raises(errors.CheckpointError, match=r"unexpected key 'conv\.4\.bias'|unexpected key 'conv\.4\.weight'"):
    convert.ncnet_consensus_params(state_dict(weights, 'ncA'), (3, 3), (10, 10))
