"""Batched, sharded candidate scoring of the inference engine equals the reference-style per-pair loop,
and both match the fixture."""
import jax
import numpy as np
import pytest

import eval_toy_data as toy
import reference_fixture as ref
from benchmarks import reference_loop
from segswap_jax import convert
from segswap_jax import inference
from segswap_jax import model as model_lib
from segswap_jax.inference import balanced_batch_size
from segswap_jax.multihost import gather_rows, query_shard


@pytest.fixture(scope='module')
def fixture():
  return ref.load_fixture()


def test_reference_loop_reproduces_fixture_from_its_outputs(fixture):
  """The oracle itself: fed the reference's own outputs it gives the reference's masks and scores."""
  feats = ref.nchw_to_nhwc(fixture['features'])
  self_a, self_b = ref.nchw_to_nhwc(fixture['self_o1'])[0], ref.nchw_to_nhwc(fixture['self_o2'])[0]
  mask_q = reference_loop.consistent_query_mask(np.ones(feats.shape[1:3]), self_a, self_b)
  np.testing.assert_allclose(mask_q, fixture['query_mask'], rtol=1e-5, atol=1e-7)
  ys, xs = np.where(np.ones(feats.shape[1:3]))
  for i in range(2):
    out_q, out_d = ref.nchw_to_nhwc(fixture['o1'])[i], ref.nchw_to_nhwc(fixture['o2'])[i]
    weight = mask_q * out_q[..., 2] * reference_loop._warp(out_d[..., 2], out_q[..., :2])
    np.testing.assert_allclose(weight, fixture['transported_masks'][i], rtol=1e-5, atol=1e-7)
    score = reference_loop.local_match_score(feats[0], feats[i + 1], out_q[..., :2], weight, ys, xs)
    np.testing.assert_allclose(score, fixture['scores'][i], rtol=1e-5)


def test_batched_equals_reference_loop_on_fixture_weights(fixture):
  config = model_lib.model_config('small')
  params, _ = convert.convert_state(ref.regenerate_checkpoint(fixture), config)
  model = inference.SegSwap(params, config)  # 4 emulated devices: 2 valid + 2 padded candidates
  assert model.num_devices == jax.local_device_count() == 4
  feats = np.asarray(model.features(fixture['images']))
  batched = model.score_candidates(feats[0], 2, lambda rows: feats[1 + rows], batch_size=4)
  loop = reference_loop.ReferenceLoopScorer(params, config).score(
      feats[0], list(fixture['images'][1:]), from_images=True)
  np.testing.assert_allclose(batched['score'], loop['score'], rtol=1e-5)
  np.testing.assert_allclose(batched['query_mask'], loop['query_mask'], rtol=1e-5, atol=1e-7)
  # Both against the reference's numbers (model outputs agree with PyTorch to ~1e-5, see test_parity).
  np.testing.assert_allclose(batched['score'], fixture['scores'], rtol=1e-4)
  np.testing.assert_allclose(loop['query_mask'], fixture['query_mask'], atol=1e-4)
  np.testing.assert_allclose(loop['transported_masks'], fixture['transported_masks'], atol=1e-4)


@pytest.fixture(scope='module')
def tiny():
  """A tiny random model on 4 devices, its loop, and 8 photos' features."""
  config = model_lib.model_config('tiny')
  params = toy.random_params(config, seed=3)
  images = np.stack([np.asarray(toy.photo(i).resize((96, 64))) for i in range(8)])
  model = inference.SegSwap(params, config)
  loop = reference_loop.ReferenceLoopScorer(params, config)
  return config, params, model, loop, np.asarray(model.features(images))


def test_batched_equals_loop_with_padding_box_mask_and_float16(tiny):
  config, params, model, loop, feats = tiny
  assert model.batch_size(3) == 4  # 7 candidates = 4 + 3 (+1 padded)
  cached = feats[1:].astype(np.float16)  # the feature cache's dtype
  box = np.zeros(feats.shape[1:3], np.float32)
  box[1:3, 2:5] = 1.0
  for init in (None, box):
    batched = model.score_candidates(feats[0], 7, lambda rows: cached[rows], init_mask=init, batch_size=3)
    expected = loop.score(feats[0], list(cached), init_mask=init)
    assert batched['score'].shape == (7,) and np.isfinite(batched['score']).all()
    np.testing.assert_allclose(batched['score'], expected['score'], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(batched['query_mask'], expected['query_mask'], rtol=1e-5, atol=1e-7)
  # The scores are not all equal (the check above is not vacuous).
  assert np.ptp(batched['score']) > 1e-4
  # One device gives the same numbers as four.
  single = inference.SegSwap(params, config, devices=jax.local_devices()[:1])
  np.testing.assert_allclose(single.score_candidates(feats[0], 7, lambda rows: cached[rows], batch_size=4)['score'],
                             model.score_candidates(feats[0], 7, lambda rows: cached[rows], batch_size=4)['score'],
                             rtol=1e-6)


def test_coarse_location_is_the_unweighted_mean_over_box_cells(tiny):
  _, _, model, loop, feats = tiny
  box = np.zeros(feats.shape[1:3], np.float32)
  box[0:2, 1:4] = 1.0
  stats = model.score_candidates(feats[0], 1, lambda rows: feats[1 + rows], init_mask=box)['stats'][0]
  out_q, _ = loop.pair(feats[0], feats[1])
  np.testing.assert_allclose(stats[:2], out_q[0:2, 1:4, :2].reshape(-1, 2).mean(0), rtol=1e-5)


def test_query_shard_covers_every_query_once():
  shards = [query_shard(10, p, 3) for p in range(3)]
  np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(10))
  local = np.arange(10)[:, None] * 2.0
  np.testing.assert_array_equal(gather_rows(local, 10), local)  # one process: identity


def test_balanced_batch_size():
  assert balanced_batch_size(100, 32, 1) == 25   # 4 calls, no padding
  assert balanced_batch_size(100, 32, 8) == 32   # 4 calls, multiple of 8
  assert balanced_batch_size(1586, 32, 1) == 32  # 50 calls of 32 (14 padded slots)
  assert balanced_batch_size(7, 100, 4) == 8
