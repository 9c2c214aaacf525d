"""The SegSwap NC-Net matcher: the transformer's outputs from NC-Net scores, on hand-checkable cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segswap_jax import features as features_lib
from segswap_jax import geometry
from segswap_jax import losses
from segswap_jax import model as model_lib
from segswap_jax import ncnet


def unit_features(key, shape):
  return features_lib.l2_normalize(jax.random.normal(key, shape))


def identity_consensus(matcher, feat_a, feat_b, sharpness=200.0):
  """Parameters with a 1x1x1x1 consensus of weight 1 (the scores are the mutual-matched correlation) and
  a sharp soft-argmax, so the outputs point at each cell's best mutual match."""
  params = matcher.init(jax.random.key(0), feat_a, feat_b)['params']
  params = jax.tree.map(np.asarray, params)
  params['consensus']['conv_0'] = {'kernel': np.ones((1, 1, 1, 1, 1, 1), np.float32),
                                   'bias': np.zeros((1,), np.float32)}
  params['inverse_temperature'] = np.float32(sharpness)  # softplus(200) = 200
  return {'params': params}


@pytest.mark.parametrize('relocalization', [0, 2])
def test_outputs_have_the_transformer_layout(relocalization):
  config = model_lib.model_config('tiny', arch='ncnet')
  config.ncnet_relocalization = relocalization
  matcher = model_lib.build_matcher(config)
  feat_a = unit_features(jax.random.key(1), (2, 6, 4, 32))
  feat_b = unit_features(jax.random.key(2), (2, 3, 5, 32))
  variables = matcher.init(jax.random.key(0), feat_a, feat_b)
  out_a, out_b = matcher.apply(variables, feat_a, feat_b)
  assert out_a.shape == (2, 6, 4, 3) and out_b.shape == (2, 3, 5, 3)
  for out in (out_a, out_b):
    assert np.all(np.asarray(out) > 0) and np.all(np.asarray(out) < 1) and np.isfinite(out).all()


def test_soft_argmax_points_at_the_matching_cell():
  matcher = ncnet.NCNetMatcher(kernel_sizes=(1,), channels=(1,))
  feat_a = unit_features(jax.random.key(3), (1, 4, 5, 64))
  feat_b = jnp.roll(feat_a, 1, axis=2)           # B's column c + 1 shows A's column c (wrapping)
  variables = identity_consensus(matcher, feat_a, feat_b)
  out_a, out_b = matcher.apply(variables, feat_a, feat_b)
  centres = geometry.cell_centers(4, 5)
  expected_a = centres.copy()
  expected_a[..., 0] = (np.arange(5)[None] + 1) % 5 * 0.2 + 0.1
  np.testing.assert_allclose(np.asarray(out_a)[0, ..., :2], expected_a, atol=1e-3)
  expected_b = centres.copy()
  expected_b[..., 0] = (np.arange(5)[None] - 1) % 5 * 0.2 + 0.1
  np.testing.assert_allclose(np.asarray(out_b)[0, ..., :2], expected_b, atol=1e-3)


def test_relocalisation_lands_within_a_cell_of_the_match():
  matcher = ncnet.NCNetMatcher(kernel_sizes=(1,), channels=(1,), relocalization=2)
  feat_a = unit_features(jax.random.key(4), (1, 6, 8, 64))
  variables = identity_consensus(matcher, feat_a, feat_a)
  out_a, _ = matcher.apply(variables, feat_a, feat_a)
  error = np.asarray(losses.correspondence_error_cells(out_a[..., :2], jnp.asarray(geometry.cell_centers(6, 8))[None]))
  # Each 2x2 box of A takes its box's best fine match: at most one cell off along each axis.
  assert error.max() <= np.sqrt(2) + 1e-3 and np.mean(error < 1e-3) >= 0.25 - 1e-6


def test_padded_cells_are_never_matched():
  matcher = ncnet.NCNetMatcher(kernel_sizes=(1,), channels=(1,))
  feat_a = unit_features(jax.random.key(5), (1, 4, 4, 64))
  pad_b = np.ones((1, 4, 4), bool)
  pad_b[0, 2:, 2:] = False                      # only B's bottom-right quarter is left
  variables = identity_consensus(matcher, feat_a, feat_a)
  out_a, _ = matcher.apply(variables, feat_a, feat_a, None, jnp.asarray(pad_b))
  xy = np.asarray(out_a)[0, ..., :2]
  assert np.all(xy >= 0.5 - 1e-6)               # every match lies in the unpadded quarter


def test_gradients_are_finite_through_the_loss():
  config = model_lib.model_config('tiny', arch='ncnet')
  matcher = model_lib.build_matcher(config)
  feat = unit_features(jax.random.key(6), (2, 4, 4, 16))
  variables = matcher.init(jax.random.key(0), feat, feat[::-1])
  mask = (np.arange(16).reshape(4, 4) < 6).astype(np.float32)[None].repeat(2, 0)
  targets = losses.PositiveTargets(mask, mask, jnp.asarray(geometry.cell_centers(4, 4))[None].repeat(2, 0),
                                   jnp.asarray(geometry.cell_centers(4, 4))[None].repeat(2, 0))

  def loss(params):
    out_a, out_b = matcher.apply({'params': params}, feat, feat[::-1])
    return losses.segswap_loss(out_a, out_b, targets, out_a[:1], out_b[:1])['loss']

  grads = jax.grad(loss)(variables['params'])
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads['consensus']))
