"""XLA's persistent compilation cache: a second run of the same shapes loads its executables from disk.

The coco train step takes minutes to compile on an accelerator host, the retrieval scorer tens of
seconds; both are the same program run after run. `enable()` points JAX at a cache folder:

  ''      (default) $SEGSWAP_JAX_COMPILATION_CACHE if set, else ~/.cache/segswap_jax/xla
  'none'  no persistent cache
  a path  that folder
"""
from __future__ import annotations

import os

import jax

ENV_VAR = 'SEGSWAP_JAX_COMPILATION_CACHE'


def cache_dir(setting: str = '') -> str:
  """The folder `setting` names ('' if the cache is off)."""
  setting = setting or os.environ.get(ENV_VAR, '') or os.path.join('~', '.cache', 'segswap_jax', 'xla')
  return '' if setting == 'none' else os.path.abspath(os.path.expanduser(setting))


def enable(setting: str = '') -> str:
  """Turns the persistent cache on at `cache_dir(setting)` (once per process; later calls keep the first
  folder, as JAX does). Returns the folder ('' when off)."""
  folder = cache_dir(setting)
  if not folder or jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir or ''
  os.makedirs(folder, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', folder)
  # Cache every executable that took a noticeable time to build, whatever its size.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return folder
