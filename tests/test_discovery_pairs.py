"""Collection pair scoring without a model: flip handling, pre-filter, input normalisation."""
import jax.numpy as jnp
import numpy as np

from benchmarks import planted
from eval import collection
from segswap_jax import features as features_lib
from segswap_jax import scoring


def _mirrored_run_kept(mirror_a, mirror_b, mode):
  """`choose_flip` when the plain run's masks are all zero, so the mirrored run is always taken."""
  plain = (jnp.zeros_like(mirror_a), jnp.zeros_like(mirror_b))
  return scoring.choose_flip(plain, (jnp.asarray(mirror_a), jnp.asarray(mirror_b)), mode)


def test_corrected_flip_undoes_the_mirror():
  # Ground-truth outputs of (i, j) and of (i, mirror(j)) from the oracle: the corrected flip maps the
  # latter back onto the former exactly.
  c = planted.make_planted_collection(groups=((0, 1),), seed=2)
  pair_set = planted.oracle_pair_set(c)
  out_a, out_b = pair_set.out_a[:1], pair_set.out_b[:1]
  mirror_a = out_a.copy()
  mirror_a[..., 0] = 1.0 - out_a[..., 0]  # i's cells now point into the mirrored j
  mirror_b = out_b[:, :, ::-1].copy()  # j's maps live on the mirrored grid; they still point into i
  flip_a, flip_b = _mirrored_run_kept(mirror_a, mirror_b, 'corrected')
  np.testing.assert_allclose(np.asarray(flip_a), out_a, atol=1e-6)
  np.testing.assert_allclose(np.asarray(flip_b), out_b, atol=1e-6)


def test_reference_flip_quirk():
  rng = np.random.default_rng(0)
  mirror_a = rng.random((2, 3, 4, 3)).astype(np.float32)
  mirror_b = rng.random((2, 3, 4, 3)).astype(np.float32)
  flip_a, flip_b = map(np.asarray, _mirrored_run_kept(mirror_a, mirror_b, 'reference'))
  np.testing.assert_array_equal(flip_a, mirror_a)  # kept as is
  np.testing.assert_allclose(flip_b[..., 0], 1.0 - mirror_b[..., 0])  # x -> 1 - x, not mirrored
  np.testing.assert_array_equal(flip_b[..., 1], mirror_b[..., 1])
  np.testing.assert_array_equal(flip_b[..., 2], mirror_b[:, ::-1, :, 2])  # mask flipped up-down


def test_candidate_pairs_by_hand():
  # Two tight clusters {0, 1} and {2, 3}, plus 4 closest to 3.
  descriptors = np.array([[1, 0, 0], [0.99, 0.14, 0], [0, 1, 0], [0, 0.99, 0.14], [0, 0.9, 0.43]])
  descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
  pairs = collection.candidate_pairs(descriptors, 1)
  np.testing.assert_array_equal(pairs, [[0, 1], [2, 3], [3, 4]])
  assert len(collection.candidate_pairs(descriptors, None)) == 10
  assert len(collection.candidate_pairs(descriptors, 4)) == 10


def test_denormalize_switch_inverts_the_normalisation():
  images = np.array([[[[255, 0, 128]]]], np.uint8)
  standard = np.asarray(features_lib.model_inputs(images, 'imagenet'))[0, 0, 0]
  quirk = np.asarray(features_lib.model_inputs(images, 'denormalized'))[0, 0, 0]
  mean, std = np.array(features_lib.IMAGENET_MEAN), np.array(features_lib.IMAGENET_STD)
  x = np.array([1.0, 0.0, 128 / 255])
  np.testing.assert_allclose(standard, (x - mean) / std, rtol=1e-6)
  np.testing.assert_allclose(quirk, x * std + mean, rtol=1e-6)
