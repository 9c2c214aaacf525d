"""geometry: hand-computed bilinear values, numpy == jax, and agreement with torch's grid_sample."""
import jax.numpy as jnp
import numpy as np
import pytest

from segswap_jax import geometry


def test_cell_centers_hit_exact_values():
  values = np.arange(12, dtype=np.float32).reshape(1, 3, 4, 1)
  xy = geometry.cell_centers(3, 4)[None]
  np.testing.assert_allclose(geometry.bilinear_sample(values, xy), values, atol=1e-6)


def test_hand_computed_midpoint_and_zero_padding():
  values = np.array([[1.0, 3.0], [5.0, 7.0]], np.float32).reshape(1, 2, 2, 1)
  # Centre of the map: mean of the four cells. Left border x=0 (pixel -0.5): half weight on zeros.
  xy = np.array([[[[0.5, 0.5], [0.0, 0.25]]]], np.float32)
  out = geometry.bilinear_sample(values, xy)[0, 0, :, 0]
  np.testing.assert_allclose(out, [4.0, 0.5 * 1.0], atol=1e-6)


def test_numpy_and_jax_agree():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  xy = rng.uniform(-0.2, 1.2, size=(2, 4, 6, 2)).astype(np.float32)
  out_np = geometry.bilinear_sample(values, xy)
  out_jax = geometry.bilinear_sample(jnp.asarray(values), jnp.asarray(xy))
  assert isinstance(out_np, np.ndarray)
  np.testing.assert_allclose(out_np, np.asarray(out_jax), atol=1e-5)


def test_target_cells_round_half_to_even():
  xy = np.array([[0.5, 0.5], [1.0 / 8, 0.0]])  # 0.5 * 4 = 2.0; (1/8) * 4 = 0.5 -> 0
  np.testing.assert_array_equal(geometry.target_cells(xy, 5, 5), [[2, 2], [0, 0]])


def test_matches_torch_grid_sample():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(1)
  values = rng.normal(size=(2, 6, 9, 4)).astype(np.float32)
  xy = rng.uniform(-0.3, 1.3, size=(2, 5, 3, 2)).astype(np.float32)
  ref = torch.nn.functional.grid_sample(
      torch.from_numpy(values).permute(0, 3, 1, 2), torch.from_numpy(geometry.xy_to_grid(xy)),
      mode='bilinear', padding_mode='zeros', align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(geometry.bilinear_sample(values, xy), ref, atol=1e-5)
