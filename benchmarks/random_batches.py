"""Random arrays in the training step's per-replica batch format, for benchmarks and tests."""
from typing import Dict

import numpy as np

from segswap_jax import model as model_lib


def random_batch(batch_pos: int, image_size: int, seed: int = 0) -> Dict[str, np.ndarray]:
  """Random arrays in the per-replica batch format of `segswap_jax/training/step.py`: uint8 images
  `(B, S, S, 3)` (as the loader gives), correspondences in [0, 1], binary masks (B's is A's mirrored),
  no padding."""
  rng = np.random.default_rng(seed)
  cells = image_size // model_lib.FEATURE_STRIDE
  mask = (rng.random((batch_pos, cells, cells)) > 0.5).astype(np.float32)
  return {
      'image_a': rng.integers(0, 256, (batch_pos, image_size, image_size, 3), dtype=np.uint8),
      'image_b': rng.integers(0, 256, (batch_pos, image_size, image_size, 3), dtype=np.uint8),
      'corr_a': rng.random((batch_pos, cells, cells, 2)).astype(np.float32),
      'corr_b': rng.random((batch_pos, cells, cells, 2)).astype(np.float32),
      'mask_a': mask, 'mask_b': mask[:, ::-1].copy(),
      'pad_b': np.zeros((batch_pos, cells, cells), bool),
  }

