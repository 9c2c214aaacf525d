"""Model properties: every reference size and block string, any feature-map sizes, padding, dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segswap_jax import model as model_lib
from segswap_jax import features as features_lib


def _features(key, shape):
  return features_lib.l2_normalize(jax.random.normal(key, shape))


@pytest.mark.parametrize('size', sorted(model_lib.TRANSFORMER_SIZES))
def test_reference_sizes_and_parameter_counts(size):
  config = model_lib.model_config(size)
  params = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(params['transformer']))
  d, ff, blocks = config.d_model, config.dim_feedforward, config.num_blocks
  layer = 4 * d * d + 4 * d + 2 * d * ff + ff + d + 4 * d  # attention, FFN, two LayerNorms
  num_layers = sum(c != 'N' for c in config.block_types.split())
  assert count == 1024 * d + d + num_layers * layer + 3 * d + 3
  assert config.block_types.split()[-1] == 'N' and len(config.block_types.split()) == 2 * blocks
  if size == 'small':  # docs/reference.md §1: the released transformer has 2,242,051 parameters.
    assert count == 2_242_051


def test_backbone_parameter_count_matches_reference():
  config = model_lib.model_config()
  params = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  # docs/reference.md §1: 8,543,296 backbone parameters (PyTorch's count: BatchNorm running statistics are buffers).
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(params['backbone']['params'])) == 8_543_296
  num_bn_channels = sum(x.shape[0] for x in jax.tree.leaves(params['backbone']['batch_stats'])) // 2
  assert num_bn_channels == 15_296


@pytest.mark.parametrize('block_types', ['I C', 'C I N N', 'I I', 'N C I N'])
def test_any_block_string_and_unequal_sizes(block_types):
  config = model_lib.model_config('tiny', block_types)
  transformer = model_lib.build_matcher(config)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  feat_a, feat_b = _features(k1, (2, 3, 5, 1024)), _features(k2, (2, 4, 2, 1024))
  variables = transformer.init(k3, feat_a, feat_b)
  out_a, out_b = transformer.apply(variables, feat_a, feat_b)
  assert out_a.shape == (2, 3, 5, 3) and out_b.shape == (2, 4, 2, 3)
  assert bool(jnp.all((out_a > 0) & (out_a < 1))) and bool(jnp.all(jnp.isfinite(out_b)))
  # A letter used twice in a block is one shared layer (reference behaviour).
  names = set(variables['params'])
  assert len([n for n in names if n.startswith('block')]) == len(
      {(i, c) for i, pair in enumerate(model_lib.parse_block_types(block_types)) for c in pair if c != 'N'})


def test_bad_block_string_is_rejected():
  with pytest.raises(ValueError, match='block_types'):
    model_lib.model_config('tiny', 'I X')


def test_padded_tokens_do_not_influence_the_rest():
  config = model_lib.model_config('tiny', 'I C I C')
  transformer = model_lib.build_matcher(config)
  k1, k2, k3, k4 = jax.random.split(jax.random.key(2), 4)
  feat_a, feat_b = _features(k1, (1, 4, 4, 1024)), _features(k2, (1, 4, 6, 1024))
  pad_b = jnp.zeros((1, 4, 6), bool).at[:, :, 3:].set(True)
  variables = transformer.init(k3, feat_a, feat_b)
  changed_b = feat_b.at[:, :, 3:].set(_features(k4, (1, 4, 3, 1024)))
  ref_a, ref_b = transformer.apply(variables, feat_a, feat_b, None, pad_b)
  new_a, new_b = transformer.apply(variables, feat_a, changed_b, None, pad_b)
  np.testing.assert_allclose(new_a, ref_a, atol=1e-6)
  np.testing.assert_allclose(new_b[:, :, :3], ref_b[:, :, :3], atol=1e-6)
  unpadded_a, _ = transformer.apply(variables, feat_a, changed_b)
  assert float(jnp.abs(unpadded_a - ref_a).max()) > 1e-4  # without the mask they do matter


def test_dropout_only_when_training():
  config = model_lib.model_config('tiny', 'I C')
  transformer = model_lib.build_matcher(config)
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  feat = _features(k1, (2, 3, 3, 1024))
  variables = transformer.init(k2, feat, feat)
  eval_1 = transformer.apply(variables, feat, feat)
  eval_2 = transformer.apply(variables, feat, feat, train=False)
  np.testing.assert_array_equal(eval_1[0], eval_2[0])
  train_1 = transformer.apply(variables, feat, feat, train=True, rngs={'dropout': k3})
  train_2 = transformer.apply(variables, feat, feat, train=True, rngs={'dropout': jax.random.key(9)})
  assert float(jnp.abs(train_1[0] - eval_1[0]).max()) > 1e-4
  assert float(jnp.abs(train_1[0] - train_2[0]).max()) > 1e-4


def test_position_encoding_hand_values():
  pos = model_lib.sine_position_encoding(2, 3, 8)  # 4 features per axis
  y = 1 / (2 + 1e-6) * 2 * np.pi  # row 0
  x = 3 / (3 + 1e-6) * 2 * np.pi  # column 2
  expected_y = [np.sin(y), np.cos(y), np.sin(y / 100), np.cos(y / 100)]
  expected_x = [np.sin(x), np.cos(x), np.sin(x / 100), np.cos(x / 100)]
  np.testing.assert_allclose(pos[0, 2], expected_y + expected_x, atol=1e-6)


def test_backbone_stride_and_non_square_input():
  config = model_lib.model_config('tiny')
  params = model_lib.init_params(config, jax.random.key(4))
  images = jax.random.uniform(jax.random.key(5), (1, 48, 80, 3)) * 255
  raw = model_lib.build_backbone(config).apply(params['backbone'], features_lib.normalize_images(images))
  assert raw.shape == (1, 3, 5, 1024) and bool(jnp.all(jnp.isfinite(raw)))
