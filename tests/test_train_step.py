"""The pure train step: pmap vs jit, the A/B role swap, what is trained, the schedule, mined negatives."""
import jax
import ml_collections
import numpy as np
import pytest

from segswap_jax import model as model_lib
from benchmarks import random_batches
from segswap_jax.training import step as train_step_lib


def tiny_model_config(backbone='small_convnet'):
  config = model_lib.model_config('tiny', 'I C')
  config.dropout = config.drop_feat = 0.0
  config.backbone = backbone
  if backbone == 'small_convnet':
    config.backbone_widths = (8, 8, 16, 16)
    config.feature_dim = 16
  return config


def settings(**overrides):
  values = dict(seed=0, batch_pos=3, batch_neg=3, warp_mask=True, eta_corr=8.0, swap_prob=0.5,
                train_backbone=True, learning_rate=1e-3, weight_decay=0.0, grad_clip_norm=0.0,
                warmup_steps=2, lr_decay_steps=(), lr_decay_factor=0.05)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def random_batch(seed, batch=3, size=64):
  return random_batches.random_batch(batch, size, seed)


def init(model_config, config):
  params = model_lib.init_params(model_config, jax.random.PRNGKey(1))
  return train_step_lib.create_train_state(params, config)


def test_pmap_over_devices_equals_jit_when_every_device_sees_the_batch():
  model_config, config = tiny_model_config(), settings()
  state, frozen = init(model_config, config)
  step = train_step_lib.make_train_step(model_config, config, axis_name=None)
  jit_step = jax.jit(step)
  devices = jax.local_devices()[:2]
  p_step = jax.pmap(train_step_lib.make_train_step(model_config, config), axis_name='batch',
                    devices=devices)
  p_state = train_step_lib.replicate(state, devices)
  p_frozen = train_step_lib.replicate(frozen, devices)
  for seed in range(3):
    batch = random_batch(seed)
    state, metrics = jit_step(state, batch, frozen)
    p_state, p_metrics = p_step(p_state, {k: np.stack([v, v]) for k, v in batch.items()}, p_frozen)
    np.testing.assert_allclose(float(metrics['loss']), float(train_step_lib.unreplicate(p_metrics)['loss']),
                               rtol=1e-5)
  mine = train_step_lib.unreplicate(p_state)
  assert int(mine.step) == 3
  # Adam moves every weight by about lr per step whatever its gradient's size, so weights with
  # near-zero gradients differ by rounding-sized amounts times lr: compare well below one step.
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(mine.params)):
    np.testing.assert_allclose(np.asarray(a), b, atol=3e-4)


def test_the_swap_exchanges_the_roles_of_a_and_b_but_not_the_negatives():
  model_config = tiny_model_config()
  batch = random_batch(5)
  swapped = dict(batch, image_a=batch['image_b'], image_b=batch['image_a'], corr_a=batch['corr_b'],
                 corr_b=batch['corr_a'], mask_a=batch['mask_b'], mask_b=batch['mask_a'])
  losses = []
  for swap_prob, data in ((1.0, batch), (0.0, swapped)):
    config = settings(batch_neg=0, swap_prob=swap_prob)
    state, frozen = init(model_config, config)
    _, metrics = jax.jit(train_step_lib.make_train_step(model_config, config, axis_name=None))(
        state, data, frozen)
    losses.append({k: float(v) for k, v in metrics.items()})
  for key in ('loss', 'loss_mask', 'loss_corr', 'acc_pos', 'acc_neg'):
    assert losses[0][key] == pytest.approx(losses[1][key], rel=1e-5)
  # The model treats A and B alike (B's padding stays on B's tokens), so the coin only matters through
  # the negatives, which the reference forms from the un-swapped images: with negatives, the coin
  # leaves the loss as it is, while exchanging A and B in the data changes the negative pairs.
  padded = dict(batch, pad_b=batch['mask_b'] < 0.5)
  results = []
  for swap_prob, data in ((0.0, padded), (1.0, padded), (0.0, dict(swapped, pad_b=padded['pad_b']))):
    config = settings(batch_neg=3, swap_prob=swap_prob)
    state, frozen = init(model_config, config)
    _, metrics = jax.jit(train_step_lib.make_train_step(model_config, config, axis_name=None))(
        state, data, frozen)
    results.append(float(metrics['loss_mask']))
  assert results[0] == pytest.approx(results[1], rel=1e-5)
  assert results[0] != pytest.approx(results[2], rel=1e-4)


@pytest.mark.parametrize('train_backbone', [False, True])
def test_only_the_trainable_tree_changes(train_backbone):
  model_config, config = tiny_model_config(), settings(train_backbone=train_backbone)
  params = model_lib.init_params(model_config, jax.random.PRNGKey(1))
  state, frozen = train_step_lib.create_train_state(params, config)
  assert ('backbone' in state.params) == train_backbone
  step = jax.jit(train_step_lib.make_train_step(model_config, config, axis_name=None))
  for seed in range(3):
    state, _ = step(state, random_batch(seed), frozen)
  merged = train_step_lib.merge_params(jax.tree.map(np.asarray, state.params), frozen)
  moved = lambda a, b: not np.allclose(np.asarray(a), np.asarray(b))
  assert any(moved(a, b) for a, b in zip(jax.tree.leaves(merged['transformer']),
                                         jax.tree.leaves(params['transformer'])))
  backbone_moved = any(moved(a, b) for a, b in zip(jax.tree.leaves(merged['backbone']),
                                                   jax.tree.leaves(params['backbone'])))
  assert backbone_moved == train_backbone
  assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_batch_norm_statistics_stay_frozen_when_a_resnet_is_fine_tuned():
  model_config = model_lib.model_config('tiny', 'I C')
  params = model_lib.init_params(model_config, jax.random.PRNGKey(1))
  trainable, frozen = train_step_lib.split_params(params, train_backbone=True)
  assert set(trainable['backbone']) == {'params'} and set(frozen['backbone']) == {'batch_stats'}


def test_learning_rate_schedule_hand_values():
  schedule = train_step_lib.learning_rate_schedule(settings(learning_rate=2e-4, warmup_steps=1000,
                                                            lr_decay_steps=(1000 + 50 * 9000,)))
  assert float(schedule(0)) == 0.0
  assert float(schedule(500)) == pytest.approx(1e-4)
  assert float(schedule(1000)) == pytest.approx(2e-4)
  assert float(schedule(1000 + 50 * 9000 - 1)) == pytest.approx(2e-4)
  assert float(schedule(1000 + 50 * 9000 + 1)) == pytest.approx(1e-5)
  flat = train_step_lib.learning_rate_schedule(settings(learning_rate=1e-5, warmup_steps=0))
  assert float(flat(0)) == pytest.approx(1e-5)


def test_mined_negatives_enter_the_loss():
  model_config, config = tiny_model_config(), settings(batch_neg=0, swap_prob=0.0)
  state, frozen = init(model_config, config)
  step = jax.jit(train_step_lib.make_train_step(model_config, config, axis_name=None))
  batch = random_batch(2)
  _, plain = step(state, batch, frozen)
  features = np.random.default_rng(0).standard_normal((2, 4, 4, 16)).astype(np.float32)
  features /= np.linalg.norm(features, axis=-1, keepdims=True)
  # Mined pairs come as indices into the round's pool, which stays on the device in `frozen`.
  pool = np.concatenate([features, features[::-1]])
  _, mined = step(state, dict(batch, hard_index_a=np.array([0, 1], np.int32),
                              hard_index_b=np.array([2, 3], np.int32)), dict(frozen, hard_pool=pool))
  # Same positives, more all-zero targets: the mask loss changes, the correspondence loss does not.
  assert float(mined['loss_corr']) == pytest.approx(float(plain['loss_corr']), rel=1e-6)
  assert float(mined['loss_mask']) != pytest.approx(float(plain['loss_mask']), rel=1e-4)


def test_negatives_of_one_scene_are_left_out_of_the_loss():
  model_config = tiny_model_config()
  batch = random_batch(6)
  results = {}
  # Every pair cut from scene 4 and pasted on scene 9: A_i and B_j share scene 4, no true negative.
  one_scene = dict(batch, scenes=np.tile(np.array([[4, 9]], np.int32), (3, 1)))
  distinct = dict(batch, scenes=np.array([[1, 2], [3, 4], [5, 6]], np.int32))
  for name, batch_neg, drop, data in (('none', 0, True, batch), ('one_scene', 3, True, one_scene),
                                      ('kept', 3, False, one_scene), ('distinct', 3, True, distinct)):
    config = settings(batch_neg=batch_neg, swap_prob=0.0, drop_shared_scene_negatives=drop)
    state, frozen = init(model_config, config)
    _, metrics = jax.jit(train_step_lib.make_train_step(model_config, config, axis_name=None))(
        state, data, frozen)
    results[name] = {k: float(v) for k, v in metrics.items()}
  # All negatives left out = no negatives; kept (switch off) or distinct scenes = negatives count.
  assert results['one_scene']['neg_kept'] == 0.0
  assert results['one_scene']['loss'] == pytest.approx(results['none']['loss'], rel=1e-5)
  assert results['distinct']['neg_kept'] == results['kept']['neg_kept'] == 1.0
  assert results['distinct']['loss'] == pytest.approx(results['kept']['loss'], rel=1e-6)
  assert abs(results['kept']['loss_mask'] - results['none']['loss_mask']) > 1e-4
