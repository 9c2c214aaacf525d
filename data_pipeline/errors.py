"""Errors of the data pipeline: user mistakes get one clear line, never a traceback."""


class DataError(ValueError):
  """Bad input to the data pipeline (missing file, corrupt annotation, empty folder, ...).

  The message names the file, key or value at fault; CLIs print it on one line and exit non-zero.
  """


class ImageReadError(DataError):
  """One image cannot be used (unreadable, corrupt, too small).

  During generation such an image is skipped with a warning and counted; it only becomes fatal when
  no usable image is left.
  """

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: {reason}')
    self.path = path
    self.reason = reason

  def __reduce__(self):  # Crosses process boundaries intact.
    return (ImageReadError, (self.path, self.reason))
