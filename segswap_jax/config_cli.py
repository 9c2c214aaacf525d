"""Command-line parsing for the ml_collections-configured CLIs (train, data generation).

absl reports a bad flag value on one line, but an unknown `--config.key` or a missing config file
escapes as a traceback from inside ml_collections. `parse_flags` turns all of them into one line
naming the flag, and exit status 2:

  app.run(main, flags_parser=config_cli.parse_flags)
"""
from __future__ import annotations

import sys
from typing import List

from absl import flags


def _one_line(error: BaseException) -> str:
  text = str(error).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':  # KeyError's repr quotes
    text = text[1:-1]
  text = text.replace('\\n', ' ').replace("\\'", "'")
  return ' '.join(text.split())


def parse_flags(argv: List[str]) -> List[str]:
  """absl's parse with every configuration error reduced to `error: ...` on stderr, exit 2."""
  try:
    remaining = flags.FLAGS(argv)
    for name in flags.FLAGS:  # a config file that failed to load only raises when used
      value = flags.FLAGS[name].value
      if type(value).__name__ == '_ErrorConfig':
        getattr(value, 'anything')
    return remaining
  except flags.Error as e:
    print(f'error: {_one_line(e)}', file=sys.stderr)
  except (AttributeError, KeyError) as e:   # ml_collections: an unknown key
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    print(f'error: unknown config key in {" ".join(overrides) or "the command line"}: {_one_line(e)}',
          file=sys.stderr)
  except (OSError, ValueError, TypeError) as e:  # the config file itself
    cause = e.__cause__ or e
    print(f'error: cannot load the config file: {_one_line(cause)}', file=sys.stderr)
  sys.exit(2)
