"""The one command-line convention of every segswap-jax CLI.

  parser = cli.parser('python -m segswap_jax.predict', __doc__,
                      example='python -m segswap_jax.predict --checkpoint CKPT --query q.jpg ...')
  cli.add_checkpoint(parser)
  cli.add_image_size(parser, default=(480, 640))
  ...
  @cli.command
  def main(argv=None) -> int: ...          # `sys.exit(main())` under `if __name__ == '__main__'`

Shared flags have one spelling everywhere: `--image-size HEIGHT WIDTH` (one number for a square only
where the tool says so), `--batch-size`, `--data-dir`, `--checkpoint`, `--out`; multi-word flags use
dashes. A user error (a bad flag value, or any `errors.UserError` raised while running) is one
`error: ...` line on stderr and exit status 2, never a traceback. The old underscore spellings
(`--batch_size`, `--image_size W H`, ...) fail with an error naming the new flag.

Training and data generation are configured with ml_collections files through absl flags
(`--config=configs/demo.py --config.key=value`); `parse_absl_flags` gives their errors the same shape.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

from segswap_jax import errors
from segswap_jax import images
from segswap_jax.model import FEATURE_STRIDE

EXIT_USER_ERROR = 2


def one_line(text: object) -> str:
  """Any message as a single line (newlines and repeated spaces folded)."""
  text = str(text).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':  # KeyError's repr quotes
    text = text[1:-1]
  return ' '.join(text.replace('\\n', ' ').replace("\\'", "'").split())


def print_error(message: object) -> None:
  print(f'error: {one_line(message)}', file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
  """argparse with the convention's errors: one `error:` line, exit 2, old spellings named."""

  def __init__(self, *args, renamed: Optional[Dict[str, str]] = None, **kwargs):
    kwargs.setdefault('formatter_class', argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)
    # Old spelling -> what to say instead (beyond the automatic `--x_y` -> `--x-y`).
    self.renamed = dict(renamed or {})

  def error(self, message: str):
    print_error(message)
    raise SystemExit(EXIT_USER_ERROR)

  def _known_options(self) -> set:
    return {option for action in self._actions for option in action.option_strings}

  def parse_known_args(self, args=None, namespace=None):
    args = list(sys.argv[1:] if args is None else args)
    known = self._known_options()
    for arg in args:
      if not arg.startswith('--') or arg == '--':
        continue
      name = arg.split('=', 1)[0]
      if name in known:
        continue
      if name in self.renamed:
        self.error(f'{name} is no longer accepted: use {self.renamed[name]}')
      dashed = name.replace('_', '-')
      if dashed != name and dashed in known:
        self.error(f'{name} is now spelled {dashed}' + (
            ' (HEIGHT WIDTH: height first)' if dashed == '--image-size' else ''))
    return super().parse_known_args(args, namespace)


def parser(prog: str, doc: Optional[str], example: str, renamed: Optional[Dict[str, str]] = None) -> Parser:
  """A parser whose help is the module docstring's first paragraph and ends with `example`."""
  description = (doc or '').strip().split('\n\n')[0]
  return Parser(prog=prog, description=description, epilog=f'example:\n  {example}', renamed=renamed)


# -- value types (each error names the value; argparse adds the flag) ------------------------------------

def _number_type(convert: Callable[[str], float], accept: Callable[[float], bool], expected: str):
  """An argparse `type` that parses with `convert` and refuses values `accept` rejects."""

  def parse(text: str):
    try:
      value = convert(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}') from None
    if not accept(value):
      raise argparse.ArgumentTypeError(f'expected {expected}, got {text}')
    return value

  parse.__name__ = expected  # argparse names the type in some messages
  return parse


positive_int = _number_type(int, lambda v: v >= 1, 'a positive integer')
nonnegative_int = _number_type(int, lambda v: v >= 0, 'an integer >= 0')
positive_float = _number_type(float, lambda v: v > 0, 'a positive number')
open_unit_float = _number_type(float, lambda v: 0.0 < v < 1.0, 'a number in (0, 1)')
size16 = _number_type(int, lambda v: v >= FEATURE_STRIDE and v % FEATURE_STRIDE == 0,
                      f'a positive multiple of {FEATURE_STRIDE}')


def output_file(text: str) -> str:
  """An output file path: not an existing directory."""
  if os.path.isdir(text):
    raise argparse.ArgumentTypeError(f'{text} is a directory; give a file name')
  return text


def output_dir(text: str) -> str:
  """An output directory path: not an existing file."""
  if os.path.exists(text) and not os.path.isdir(text):
    raise argparse.ArgumentTypeError(f'{text} is a file; give a directory')
  return text


class _ImageSizeAction(argparse.Action):
  """`--image-size HEIGHT WIDTH` (or `SIDE` where squares are allowed) -> (height, width)."""

  def __init__(self, *args, square: bool = False, **kwargs):
    self.square = square
    super().__init__(*args, **kwargs)

  def __call__(self, parser, namespace, values, option_string=None):
    allowed = '1 or 2 numbers (SIDE, or HEIGHT WIDTH)' if self.square else '2 numbers (HEIGHT WIDTH)'
    if len(values) not in ((1, 2) if self.square else (2,)):
      parser.error(f'{option_string}: expected {allowed}, got {" ".join(values)}')
    try:
      numbers = [int(v) for v in values]
    except ValueError:
      parser.error(f'{option_string}: expected integers, got {" ".join(values)}')
    height, width = numbers if len(numbers) == 2 else numbers * 2
    try:
      images.check_image_size(height, width, option_string)
    except errors.ConfigError as e:
      parser.error(str(e))
    setattr(namespace, self.dest, (height, width))


# -- config values (the keys of ml_collections configs) --------------------------------------------------------

def _check_value(kind: str, value) -> Optional[str]:
  """None when `value` is acceptable for `kind`, else what was expected."""
  number = isinstance(value, (int, float)) and not isinstance(value, bool)
  integer = isinstance(value, int) and not isinstance(value, bool)
  if kind == 'count':
    return None if integer and value >= 1 else 'an integer >= 1'
  if kind == 'count0':
    return None if integer and value >= 0 else 'an integer >= 0'
  if kind == 'positive':
    return None if number and value > 0 else 'a number > 0'
  if kind == 'nonneg':
    return None if number and value >= 0 else 'a number >= 0'
  if kind == 'fraction':
    return None if number and 0.0 <= value <= 1.0 else 'a number in [0, 1]'
  if kind == 'rate':
    return None if number and 0.0 <= value < 1.0 else 'a number in [0, 1)'
  if kind == 'open01':
    return None if number and 0.0 < value <= 1.0 else 'a number in (0, 1]'
  if kind == 'size16':
    return None if integer and value >= FEATURE_STRIDE and value % FEATURE_STRIDE == 0 else (
        f'a positive multiple of {FEATURE_STRIDE}')
  if kind.startswith('counts'):  # counts>=N: a sequence of integers >= N
    low = int(kind[len('counts>='):]) if '>=' in kind else 1
    ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= low
                                                  for v in value)
    return None if ok else f'a list of integers >= {low}'
  if kind.startswith('in:'):
    options = kind[3:].split('|')
    return None if value in options else f'one of {", ".join(options)}'
  raise ValueError(f'unknown check {kind!r}')


def check_config_values(config, rules: Dict[str, str], prefix: str = 'config.') -> None:
  """ConfigError naming the first key of `config` whose value breaks its rule.

  rules: dotted key -> 'count' (integer >= 1), 'count0' (>= 0), 'positive', 'nonneg', 'fraction'
  ([0, 1]), 'rate' ([0, 1)), 'open01' ((0, 1]), 'size16' (positive multiple of 16), 'counts>=N' (a list
  of integers >= N), 'in:a|b' (one of the names).
  """
  for key, kind in rules.items():
    node = config
    for part in key.split('.'):
      node = node[part]
    expected = _check_value(kind, node)
    if expected:
      raise errors.ConfigError(f'{prefix}{key}={node!r}: expected {expected}')


# -- shared flags ------------------------------------------------------------------------------------------

def add_checkpoint(parser: Parser, required: bool = True, help: str = 'model checkpoint directory') -> None:
  parser.add_argument('--checkpoint', required=required, help=help)


def add_data_dir(parser: Parser, help: str, required: bool = True) -> None:
  parser.add_argument('--data-dir', required=required, help=help)


def add_out(parser: Parser, help: str, default: Optional[str] = None, required: bool = False,
            kind: str = 'file') -> None:
  """`--out`: a file (not an existing directory) or, with kind='dir', a directory (not an existing file)."""
  parser.add_argument('--out', default=default, required=required, help=help,
                      type=output_dir if kind == 'dir' else output_file)


def add_batch_size(parser: Parser, default: int, help: str) -> None:
  parser.add_argument('--batch-size', type=positive_int, default=default, help=f'{help} (default {default})')


def add_image_size(parser: Parser, default: Sequence[int], help: str, square: bool = False) -> None:
  """`--image-size HEIGHT WIDTH`; with `square=True` a single SIDE means SIDE x SIDE."""
  shape = 'HEIGHT WIDTH, or SIDE for a square' if square else 'HEIGHT WIDTH'
  parser.add_argument('--image-size', nargs='+', action=_ImageSizeAction, square=square,
                      default=tuple(default), metavar='N',
                      help=f'{help}: {shape}, multiples of {FEATURE_STRIDE} (default {" ".join(map(str, default))})')


def add_compute(parser: Parser, cache_format_default: str = 'backbone') -> None:
  """`--compute-dtype` (the model's compute policy, docs/performance.md) and `--cache-format` (what the
  feature cache keeps per database image)."""
  parser.add_argument('--compute-dtype', choices=('float32', 'bfloat16'), default=None,
                      help="matrix products in this dtype (default: the checkpoint's, float32); bfloat16 "
                           'is for accelerators, within ~2%% of float32 scores')
  parser.add_argument('--cache-format', choices=('backbone', 'projected'), default=cache_format_default,
                      help="'projected' also keeps each image's transformer tokens, so its pair-independent "
                           "part runs once per image, not once per pair; 'backbone' keeps features only "
                           f'(default {cache_format_default})')


def compute_config(config, compute_dtype: Optional[str]):
  """The model config with `--compute-dtype` applied (a copy; None keeps the checkpoint's)."""
  if compute_dtype is None:
    return config
  config = config.copy_and_resolve_references()
  config.compute_dtype = compute_dtype
  return config


def add_multihost(parser: Parser) -> None:
  """The multi-process flags of the evaluation CLIs (the same command on every host)."""
  parser.add_argument('--coordinator-address', default=None, help='multi-host: HOST:PORT of process 0')
  parser.add_argument('--num-processes', type=positive_int, default=1, help='multi-host: number of processes')
  parser.add_argument('--process-id', type=nonnegative_int, default=0, help='multi-host: this process')


# -- running -------------------------------------------------------------------------------------------------

def _is_closed_loop_callback(unraisable) -> bool:
  """Orbax reads through tensorstore futures; when a restore fails (a truncated checkpoint), reads still
  in flight complete after its event loop closed and asyncio reports each as an unraisable
  `RuntimeError('Event loop is closed')`: noise after the one error line, not a second error."""
  error = unraisable.exc_value
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


def _install_quiet_hooks() -> None:
  default = sys.unraisablehook
  if getattr(default, 'segswap_quiet', False):
    return

  def hook(unraisable):
    if not _is_closed_loop_callback(unraisable):
      default(unraisable)

  hook.segswap_quiet = True
  sys.unraisablehook = hook


def command(function: Callable[[Optional[List[str]]], Optional[int]]) -> Callable[[Optional[List[str]]], int]:
  """Wraps a CLI's `main(argv) -> int`: a UserError becomes `error: ...` and 2; argparse's exits
  (`--help`, a bad flag) become return values, so tests can call `main([...])` directly."""

  @functools.wraps(function)
  def wrapper(argv: Optional[List[str]] = None) -> int:
    _install_quiet_hooks()
    try:
      return int(function(argv) or 0)
    except errors.UserError as e:
      print_error(e)
      return EXIT_USER_ERROR
    except SystemExit as e:
      return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USER_ERROR)

  return wrapper


# -- absl + ml_collections (train, data generation) ------------------------------------------------------------

def resolve_config_path(path: str) -> str:
  """A config file path as given, else relative to the folder holding the `segswap_jax` package (the
  checkout, or site-packages after `pip install .`, where `configs/` is installed beside it)."""
  if os.path.isfile(path) or os.path.isabs(path):
    return path
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  candidate = os.path.join(root, path)
  return candidate if os.path.isfile(candidate) else path


def _resolve_config_flag(arg: str) -> str:
  """`--config=configs/x.py[:variant]` with the file resolved by `resolve_config_path`."""
  if not arg.startswith('--config='):
    return arg
  value = arg[len('--config='):]
  path, sep, variant = value.partition(':')
  return f'--config={resolve_config_path(path)}{sep}{variant}'


def parse_absl_flags(argv: List[str]) -> List[str]:
  """absl's parse with every flag or configuration error reduced to one `error:` line, exit 2.

  `app.run(main, flags_parser=cli.parse_absl_flags)`. An unknown `--config.key` or a missing config file
  would otherwise escape as a traceback from inside ml_collections.
  """
  from absl import flags
  resolved = [argv[0]]
  for arg in argv[1:]:
    if len(resolved) > 1 and resolved[-1] == '--config':  # the `--config PATH` form
      path, sep, variant = arg.partition(':')
      arg = f'{resolve_config_path(path)}{sep}{variant}'
    resolved.append(_resolve_config_flag(arg))
  argv = resolved
  known = set(flags.FLAGS)
  for arg in argv[1:]:
    if arg.startswith('--') and not arg.startswith('--config'):
      name = arg[2:].split('=', 1)[0]
      dashed = name.replace('_', '-')
      if name not in known and dashed != name and dashed in known:
        print_error(f'--{name} is now spelled --{dashed}')
        sys.exit(EXIT_USER_ERROR)
  try:
    try:
      remaining = flags.FLAGS(argv)
    except SystemExit as e:  # absl's --help exits with status 1; help is not an error here
      if any(a in ('--help', '-h', '-?', '--helpshort', '--helpfull') for a in argv[1:]):
        sys.exit(0)
      raise
    for name in flags.FLAGS:  # a config file that failed to load only raises when used
      value = flags.FLAGS[name].value
      if type(value).__name__ == '_ErrorConfig':
        getattr(value, 'anything')
    return remaining
  except flags.Error as e:
    print_error(e)
  except (AttributeError, KeyError) as e:   # ml_collections: an unknown key
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    print_error(f'unknown config key in {" ".join(overrides) or "the command line"}: {one_line(e)}')
  except (OSError, ValueError, TypeError) as e:  # the config file itself
    print_error(f'cannot load the config file: {one_line(e.__cause__ or e)}')
  sys.exit(EXIT_USER_ERROR)


def absl_main(function: Callable[[List[str]], None]) -> Callable[[List[str]], None]:
  """Wraps an absl `main(argv)`: a UserError becomes `error: ...` and exit status 2."""

  @functools.wraps(function)
  def wrapper(argv: List[str]) -> None:
    _install_quiet_hooks()
    try:
      function(argv)
    except errors.UserError as e:
      print_error(e)
      sys.exit(EXIT_USER_ERROR)

  return wrapper
