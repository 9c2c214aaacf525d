"""One CLI convention: every command's --help has an example, a bad --image-size and an old flag spelling
are one `error:` line with exit status 2 (no model, no data needed)."""
import importlib
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argparse commands: module -> the arguments that are required besides the one under test.
ARGPARSE_COMMANDS = {
    'segswap_jax.predict': ['--checkpoint', 'C', '--query', 'q.jpg', '--targets', 't.jpg', '--out', 'o.npz'],
    'segswap_jax.discover': ['--checkpoint', 'C', '--images', 'I', '--out', 'O'],
    'segswap_jax.validation': ['--checkpoint', 'C', '--data-dir', 'D'],
    'segswap_jax.convert': ['--random-init', '--out', 'O'],
    'eval.tokyo247': ['--checkpoint', 'C', '--data-dir', 'D'],
    'eval.pitts30k': ['--checkpoint', 'C', '--data-dir', 'D'],
    'eval.brueghel': ['--checkpoint', 'C', '--data-dir', 'D'],
    'eval.internet': ['--checkpoint', 'C', '--data-dir', 'D'],
    'data_pipeline.visualize': ['--data-dir', 'D'],
    'data_pipeline.import_reference': ['--src', 'S', '--data-dir', 'D'],
    'data_pipeline.adain': ['--vgg', 'V', '--decoder', 'D', '--out', 'O'],
}
IMAGE_SIZE_COMMANDS = ('segswap_jax.predict', 'segswap_jax.discover', 'eval.tokyo247', 'eval.pitts30k',
                       'eval.internet')
ABSL_COMMANDS = {
    'segswap_jax.train': ['--config=configs/demo.py', '--workdir=W'],
    'data_pipeline.generate': ['--config=configs/data/demo.py', '--data-dir=D'],
}


def one_error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in stderr, stderr
  return lines[0]


@pytest.mark.parametrize('module', sorted(ARGPARSE_COMMANDS))
def test_help_has_an_example(module, capsys):
  main = importlib.import_module(module).main
  assert main(['--help']) == 0
  out = capsys.readouterr().out
  assert f'python -m {module}' in out and 'example:' in out


@pytest.mark.parametrize('module', IMAGE_SIZE_COMMANDS)
@pytest.mark.parametrize('value', [['100', '75'], ['480', '-640'], ['480', 'x'], ['480', '640', '16']])
def test_bad_image_size_is_one_line(module, value, capsys):
  main = importlib.import_module(module).main
  assert main(ARGPARSE_COMMANDS[module] + ['--image-size', *value]) == 2
  err = one_error_line(capsys.readouterr().err)
  assert '--image-size' in err


def test_one_number_is_a_square_only_where_documented(capsys):
  from segswap_jax import discover, predict
  assert predict.main(ARGPARSE_COMMANDS['segswap_jax.predict'] + ['--image-size', '480']) == 2
  assert 'expected 2 numbers (HEIGHT WIDTH)' in one_error_line(capsys.readouterr().err)
  parser_help = discover.main(['--help'])
  assert parser_help == 0 and 'SIDE for a square' in capsys.readouterr().out


@pytest.mark.parametrize('module, old, new', [
    ('eval.tokyo247', '--image_size', '--image-size'),
    ('eval.tokyo247', '--batch_size', '--batch-size'),
    ('eval.brueghel', '--data_dir', '--data-dir'),
    ('segswap_jax.discover', '--max_pairs_per_image', '--max-pairs-per-image'),
    ('eval.internet', '--cache_dir', '--cache-dir'),
    ('segswap_jax.validation', '--data', '--data-dir'),
])
def test_old_spellings_name_the_new_flag(module, old, new, capsys):
  main = importlib.import_module(module).main
  assert main([old, '1']) == 2
  err = one_error_line(capsys.readouterr().err)
  assert old in err and new in err


def _run(module, args):
  env = {**os.environ, 'PYTHONPATH': REPO}
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize('module', sorted(ABSL_COMMANDS))
def test_absl_commands_follow_the_convention(module, tmp_path):
  helped = _run(module, ['--help'])
  assert helped.returncode == 0 and f'python -m {module} --config=configs/' in helped.stdout
  old = {'segswap_jax.train': '--num_processes=2', 'data_pipeline.generate': '--data_dir=D'}[module]
  result = _run(module, ABSL_COMMANDS[module] + [old])
  err = one_error_line(result.stderr)
  assert result.returncode == 2 and old.split('=')[0] in err and old.split('=')[0].replace('_', '-') in err


def test_config_files_are_found_from_any_directory(tmp_path):
  """`--config=configs/demo.py` names the project's file even when run from elsewhere."""
  env = {**os.environ, 'PYTHONPATH': REPO}
  result = subprocess.run([sys.executable, '-m', 'segswap_jax.train', '--config=configs/demo.py',
                           f'--workdir={tmp_path / "w"}', '--config.no_such_key=1'], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=300)
  err = one_error_line(result.stderr)
  assert result.returncode == 2 and 'unknown config key' in err and 'no_such_key' in err
