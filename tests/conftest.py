"""Test-wide settings: 4 emulated CPU devices (pmap paths), float32 matmuls at full precision."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('SEGSWAP_JAX_COMPILATION_CACHE', 'none')  # tests compile afresh

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
