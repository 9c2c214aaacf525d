"""The one error base of segswap-jax: a user's mistake is a `UserError`, never a traceback.

Every CLI turns a `UserError` into one `error: ...` line on stderr and exit status 2
(`segswap_jax.cli`). The message names the file, key or value at fault and, where it helps, what to do.
Subclasses exist only where a caller has to tell the cases apart:

  DataError        input data: dataset files, annotations, lists, caches, image folders
  ImageError       one image file that cannot be used (some callers skip it and go on)
  CheckpointError  a model checkpoint or a PyTorch file that cannot be read or does not fit the model
  ConfigError      a setting: a flag, a config key, a workdir holding another run
"""
from __future__ import annotations


class UserError(ValueError):
  """A mistake in what the user asked for or gave; the message says which and why (one line)."""


class DataError(UserError):
  """Bad or inconsistent input data (missing file, corrupt annotation, empty folder, stale cache)."""


class ImageError(DataError):
  """One image that cannot be used (unreadable, corrupt, too small); `path` names it.

  During data generation such an image is skipped with a warning and counted; it only becomes fatal
  when no usable image is left.
  """

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = path
    self.reason = reason

  def __reduce__(self):  # crosses process boundaries (generation workers) intact
    return (type(self), (self.path, self.reason))


class CheckpointError(UserError):
  """A checkpoint (ours or a PyTorch file) that cannot be read or does not match the model."""


class ConfigError(UserError):
  """A setting that cannot be used: a flag value, a config key, a workdir that holds another run."""
