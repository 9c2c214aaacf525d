"""Parity with the reference PyTorch model on seeded weights (docs/reference.md §8): the project's proof of fidelity.

The fixture's weights are regenerated from their rule, written as a reference-layout `.pth`, converted
with the user-facing converter, loaded from the Orbax checkpoint and run through the public API.
"""
import numpy as np
import pytest

from segswap_jax import checkpoints, convert, inference, model as model_lib
from segswap_jax import features as features_lib
import reference_fixture as ref

ATOL = 1e-4


@pytest.fixture(scope='module')
def fixture():
  return ref.load_fixture()


@pytest.fixture(scope='module')
def converted(fixture, tmp_path_factory):
  torch = pytest.importorskip('torch')
  state = ref.regenerate_checkpoint(fixture)
  pth = tmp_path_factory.mktemp('pth') / 'seeded.pth'
  torch.save({part: {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()} for part, sd in state.items()}
             | {'optimiser': {'state': {}, 'param_groups': []}}, str(pth))
  out = tmp_path_factory.mktemp('ckpt') / 'model'
  assert convert.main(['--torch-checkpoint', str(pth), '--out', str(out)]) == 0
  return inference.SegSwap.load(str(out))


@pytest.fixture(scope='module')
def outputs(fixture, converted):
  images = fixture['images']
  raw = model_lib.build_backbone(converted.config).apply(
      converted.params['backbone'], features_lib.normalize_images(images))
  features = converted.features(images)
  query, targets = features[:1], features[1:]
  self_pair = converted.pair(query, query)
  pairs = converted.pair(np.repeat(query, len(targets), 0), targets)
  return {'backbone_raw': raw, 'features': features, 'self': self_pair, 'pairs': pairs}


def test_backbone_and_features(fixture, outputs):
  np.testing.assert_allclose(outputs['backbone_raw'], ref.nchw_to_nhwc(fixture['backbone_raw']), atol=ATOL)
  np.testing.assert_allclose(outputs['features'], ref.nchw_to_nhwc(fixture['features']), atol=ATOL)


def test_transformer_outputs(fixture, outputs):
  np.testing.assert_allclose(outputs['self'].out_a, ref.nchw_to_nhwc(fixture['self_o1']), atol=ATOL)
  np.testing.assert_allclose(outputs['self'].out_b, ref.nchw_to_nhwc(fixture['self_o2']), atol=ATOL)
  np.testing.assert_allclose(outputs['pairs'].out_a, ref.nchw_to_nhwc(fixture['o1']), atol=ATOL)
  np.testing.assert_allclose(outputs['pairs'].out_b, ref.nchw_to_nhwc(fixture['o2']), atol=ATOL)


def test_masks_and_scores(fixture, converted):
  result = converted.score(fixture['images'][0], fixture['images'][1:])
  np.testing.assert_allclose(result['query_mask'], fixture['query_mask'], atol=ATOL)
  np.testing.assert_allclose(result['transported_masks'], fixture['transported_masks'], atol=ATOL)
  np.testing.assert_allclose(result['scores'], fixture['scores'], rtol=1e-4)


def test_scoring_alone_matches_reference_to_1e5(fixture):
  """scoring.py on the reference's own outputs: the score computation in isolation, tighter tolerance."""
  from segswap_jax import scoring
  f = {k: ref.nchw_to_nhwc(fixture[k]) for k in ('features', 'self_o1', 'self_o2', 'o1', 'o2')}
  result = scoring.retrieval_scores(f['features'][0], f['features'][1:], f['self_o1'][0], f['self_o2'][0],
                                    f['o1'], f['o2'])
  np.testing.assert_allclose(result['query_mask'], fixture['query_mask'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result['transported_masks'], fixture['transported_masks'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(result['scores'], fixture['scores'], rtol=1e-5)


def test_checkpoint_roundtrip_keeps_config(converted, tmp_path):
  params, config = checkpoints.load_model(converted.checkpoint_dir)
  assert config.block_types == 'I C I C I N' and config.d_model == 256
  np.testing.assert_array_equal(params['transformer']['params']['final_linear']['bias'],
                                converted.params['transformer']['params']['final_linear']['bias'])
