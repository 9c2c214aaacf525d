"""The layering rule (core <- data_pipeline <- eval <- applications) holds, and breaking it is caught.

The contracts live in pyproject.toml (`[tool.importlinter]`); CI runs `lint-imports` too.
"""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('segswap_jax', 'data_pipeline', 'eval', 'configs', 'benchmarks')
LINT = os.path.join(os.path.dirname(sys.executable), 'lint-imports')


def lint(root: str) -> subprocess.CompletedProcess:
  env = {**os.environ, 'PYTHONPATH': root}
  return subprocess.run([LINT, '--no-cache'], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def copy_tree(destination) -> str:
  root = str(destination)
  for package in PACKAGES:
    shutil.copytree(os.path.join(REPO, package), os.path.join(root, package),
                    ignore=shutil.ignore_patterns('__pycache__'))
  shutil.copy(os.path.join(REPO, 'pyproject.toml'), root)
  return root


def test_the_contracts_hold():
  result = lint(REPO)
  assert result.returncode == 0, result.stdout[-3000:]
  assert '0 broken' in result.stdout


@pytest.mark.parametrize('module, back_import, broken', [
    ('segswap_jax/scoring.py', 'from eval import discovery', 'The core imports neither data_pipeline nor eval'),
    ('data_pipeline/augment.py', 'from segswap_jax.training import step', 'applications > eval > data_pipeline'),
    ('eval/retrieval.py', 'from segswap_jax import validation', 'applications > eval > data_pipeline'),
    ('segswap_jax/model.py', 'from segswap_jax import inference', 'Inside segswap_jax'),
])
def test_a_back_import_breaks_a_contract(tmp_path, module, back_import, broken):
  root = copy_tree(tmp_path)
  with open(os.path.join(root, module), 'a') as f:
    f.write(f'\n{back_import}  # a back import\n')
  result = lint(root)
  assert result.returncode != 0
  assert f'{broken}' in result.stdout and 'BROKEN' in result.stdout, result.stdout[-3000:]


def test_every_segswap_jax_module_has_a_layer(tmp_path):
  root = copy_tree(tmp_path)
  with open(os.path.join(root, 'segswap_jax', 'newthing.py'), 'w') as f:
    f.write('"""A module no layer names."""\n')
  result = lint(root)
  assert result.returncode != 0 and 'newthing' in result.stdout + result.stderr
