"""The train state, the optimiser and the pure train step (docs/reference.md §2).

The step is written once for one replica, `(state, batch, frozen) -> (state, metrics)`, with an
optional `axis_name` over which gradients and metrics are averaged: `jax.pmap(step, axis_name='batch')`
is how the training loop runs it; with `axis_name=None` it runs under plain `jax.jit` (one device,
tests). Why training pmaps while inference jits over a device mesh: `segswap_jax/inference.py`.

Per replica a batch holds B positive pairs (docs/INTERFACES.md "Training batches"):
  image_a, image_b uint8 `(B, H, W, 3)` RGB, normalised inside the step (a quarter of float32's bytes
  to the device; already-normalised float32 is accepted too); corr_a, corr_b `(B, h, w, 2)`;
  mask_a, mask_b `(B, h, w)`; pad_b bool `(B, h, w)`; optionally scenes int32 `(B, 2)` (scene ids of A
  and of B's background, to leave out in-batch negatives that share one) and mined negatives as
  indices hard_index_a, hard_index_b int32 `(M,)` into `frozen['hard_pool']` `(P, h, w, C)`, the
  round's pool features, which stay on the device (stage 2, `training/hard_mining.py`).
Inside the step: backbone features of the 2B images (under stop_gradient unless the backbone is
trained), the per-batch A/B role swap (one coin for the whole global batch), the in-batch negatives
(A of pair i with B of pair j, the reference's cyclic shifts, un-swapped, no key padding; with
`drop_shared_scene_negatives` those whose images show one scene are left out of the loss), one
matcher call (transformer or NC-Net) over positives and negatives together, the loss of `losses.py`.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from segswap_jax import features as features_lib
from segswap_jax import losses
from segswap_jax import model as model_lib

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training.

  step: int32 `()`; params: the trainable tree (`{MATCHER: {'params'}}`, MATCHER = `model.matcher_key`, plus
  `{'backbone': {'params'}}` when the backbone is trained); opt_state: the optax state; rng: uint32
  `(2,)` raw key, folded with the step for each step's randomness.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def split_params(model_params: dict, train_backbone: bool) -> Tuple[dict, dict]:
  """Model tree `{'backbone': vars, MATCHER: vars}` -> (trainable, frozen); MATCHER is 'transformer' or
  'ncnet' (`model.matcher_key`)."""
  backbone = dict(model_params['backbone'])
  trainable = {k: dict(v) for k, v in model_params.items() if k != 'backbone'}
  if train_backbone:
    trainable['backbone'] = {'params': backbone.pop('params')}
  return trainable, {'backbone': backbone}


def merge_params(trainable: dict, frozen: dict) -> dict:
  """Inverse of `split_params`: the model tree every other tool loads."""
  backbone = dict(frozen['backbone'])
  backbone.update(trainable.get('backbone', {}))
  return {'backbone': backbone, **{k: v for k, v in trainable.items() if k != 'backbone'}}


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_steps`, then `learning_rate`, times `lr_decay_factor` at each
  of `lr_decay_steps` (the reference: x0.05 after epoch 50)."""
  base = optax.piecewise_constant_schedule(
      config.learning_rate,
      {int(step): float(config.lr_decay_factor) for step in config.lr_decay_steps})
  if config.warmup_steps <= 0:
    return base
  warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
  return lambda step: jnp.where(step < config.warmup_steps, warmup(step), base(step))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (PyTorch's: L2 weight decay added to the gradient), optional global-norm clipping."""
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.weight_decay > 0:
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(optax.adam(learning_rate_schedule(config)))
  return optax.chain(*parts)


def create_train_state(model_params: dict, config: ml_collections.ConfigDict) -> Tuple[TrainState, dict]:
  """A fresh state (step 0) from model parameters; returns (state, frozen)."""
  trainable, frozen = split_params(model_params, config.train_backbone)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                     opt_state=make_optimizer(config).init(trainable),
                     rng=jax.random.PRNGKey(config.seed))
  return state, frozen


DROPOUT_RNG_IMPLS = ('threefry', 'rbg', 'unsafe_rbg')


def dropout_key(raw_key: jax.Array, impl: str) -> jax.Array:
  """The dropout key of one step: the threefry `raw_key` itself, or a typed 'rbg' / 'unsafe_rbg' key
  seeded from it. Dropout draws as many random bits as the activations it masks; threefry spends ~25
  FLOP per 32 bits, rbg a fraction of that (and 'unsafe_rbg' does not promise independent splits,
  which dropout never relies on)."""
  if impl == 'threefry':
    return raw_key
  if impl not in DROPOUT_RNG_IMPLS:
    raise ValueError(f'dropout_rng_impl must be one of {DROPOUT_RNG_IMPLS}, got {impl!r}')
  return jax.random.wrap_key_data(jax.random.bits(raw_key, (4,), jnp.uint32), impl=impl)


def make_train_step(model_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                    axis_name: Optional[str] = 'batch') -> Callable[[TrainState, Batch, dict],
                                                                   Tuple[TrainState, Metrics]]:
  """Returns the pure step `(state, batch, frozen) -> (state, metrics)` of one replica."""
  backbone = model_lib.build_backbone(model_config)
  matcher = model_lib.build_matcher(model_config)
  matcher_key = model_lib.matcher_key(model_config)
  optimizer = make_optimizer(config)
  schedule = learning_rate_schedule(config)
  neg_index_a, neg_index_b = losses.in_batch_negatives(config.batch_pos, config.batch_neg)

  def loss_fn(trainable, frozen, batch, rng_swap, rng_dropout):
    params = merge_params(trainable, frozen)
    images = jnp.concatenate([batch['image_a'], batch['image_b']])
    normalization = 'imagenet' if images.dtype == jnp.uint8 else 'none'
    features = features_lib.backbone_features(backbone, params['backbone'], images, normalization)
    if not config.train_backbone:
      features = jax.lax.stop_gradient(features)
    feat_a, feat_b = jnp.split(features, 2)

    # The reference swaps the roles of A and B for the whole batch with probability 1/2.
    swap = jax.random.bernoulli(rng_swap, config.swap_prob)
    pick = lambda first, second: jnp.where(swap, second, first)
    no_pad = jnp.zeros_like(batch['pad_b'])
    x, y = pick(feat_a, feat_b), pick(feat_b, feat_a)
    pad_x, pad_y = pick(no_pad, batch['pad_b']), pick(batch['pad_b'], no_pad)
    targets = losses.PositiveTargets(
        mask_a=pick(batch['mask_a'], batch['mask_b']), mask_b=pick(batch['mask_b'], batch['mask_a']),
        corr_a=pick(batch['corr_a'], batch['corr_b']), corr_b=pick(batch['corr_b'], batch['corr_a']))

    neg_x, neg_y = feat_a[neg_index_a], feat_b[neg_index_b]
    if 'hard_index_a' in batch:
      pool = frozen['hard_pool']
      neg_x = jnp.concatenate([neg_x, pool[batch['hard_index_a']].astype(neg_x.dtype)])
      neg_y = jnp.concatenate([neg_y, pool[batch['hard_index_b']].astype(neg_y.dtype)])
    num_pos, num_neg = x.shape[0], neg_x.shape[0]
    neg_pad = jnp.zeros((num_neg,) + no_pad.shape[1:], bool)
    out_x, out_y = matcher.apply(
        trainable[matcher_key], jnp.concatenate([x, neg_x]), jnp.concatenate([y, neg_y]),
        jnp.concatenate([pad_x, neg_pad]), jnp.concatenate([pad_y, neg_pad]), train=True,
        rngs={'dropout': rng_dropout})
    neg_weights = jnp.ones((num_neg,), jnp.float32)
    if config.get('drop_shared_scene_negatives', False) and 'scenes' in batch:
      in_batch = losses.distinct_scene_weights(batch['scenes'], neg_index_a, neg_index_b)
      neg_weights = neg_weights.at[:in_batch.shape[0]].set(in_batch)
    metrics = losses.segswap_loss(out_x[:num_pos], out_y[:num_pos], targets, out_x[num_pos:],
                                  out_y[num_pos:], warp_mask=config.warp_mask,
                                  eta_corr=config.eta_corr,
                                  corr_cells=config.get('corr_cells', 'peak'),
                                  neg_weights=neg_weights)
    return metrics['loss'], metrics

  def step(state: TrainState, batch: Batch, frozen: dict) -> Tuple[TrainState, Metrics]:
    rng_swap, rng_dropout = jax.random.split(jax.random.fold_in(state.rng, state.step))
    if axis_name is not None:  # the swap coin is shared; dropout differs per device
      rng_dropout = jax.random.fold_in(rng_dropout, jax.lax.axis_index(axis_name))
    rng_dropout = dropout_key(rng_dropout, config.get('dropout_rng_impl', 'threefry'))
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, frozen, batch, rng_swap, rng_dropout)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   learning_rate=schedule(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def replicate(tree: Any, devices=None) -> Any:
  """Copies a host tree onto every local device as pmap expects (leading device axis)."""
  devices = devices or jax.local_devices()
  if not jax.tree.leaves(tree):
    return tree
  stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), tree)
  return jax.pmap(lambda x: x, devices=devices)(stacked)


def local_shards(array: jax.Array) -> np.ndarray:
  """This process's rows `(D_local, ...)` of a pmapped output (all of it with one process)."""
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])


def unreplicate(tree: Any) -> Any:
  """The first local copy of a replicated tree, as host numpy arrays."""
  # A shard of a pmapped array keeps its leading axis, of length 1.
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)
