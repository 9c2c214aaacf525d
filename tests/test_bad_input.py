"""Every CLI refuses bad input the same way: exit status 2, one `error:` line naming the flag, key, value or
file at fault, no traceback, and nothing run."""
import importlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import planted
from segswap_jax import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """Everything the bad invocations point at: good and broken checkpoints, images, folders, files."""
  root = tmp_path_factory.mktemp('world')
  paths = {'root': str(root)}
  paths['ckpt'] = str(root / 'tiny')
  assert convert.main(['--random-init', '--size', 'tiny', '--out', paths['ckpt']]) == 0
  # A checkpoint whose model_config.json says tiny over small parameters.
  paths['small_as_tiny'] = str(root / 'small_as_tiny')
  assert convert.main(['--random-init', '--size', 'small', '--out', paths['small_as_tiny']]) == 0
  shutil.copy(os.path.join(paths['ckpt'], 'model_config.json'), os.path.join(paths['small_as_tiny'], 'model_config.json'))
  # A checkpoint with 4 KiB of its largest data file overwritten, and one with that file truncated.
  for name, damage in (('corrupt', 'overwrite'), ('truncated', 'truncate')):
    paths[name] = str(root / name)
    shutil.copytree(paths['ckpt'], paths[name])
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(paths[name], 'params')) for f in fs]
    largest = max(files, key=os.path.getsize)
    size = os.path.getsize(largest)
    with open(largest, 'r+b') as f:
      if damage == 'overwrite':
        f.seek(size // 2)
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
      else:
        f.truncate(size // 3)
  # A training workdir (its model_config.json is a training one, its model under model/).
  paths['workdir'] = str(root / 'workdir')
  shutil.copytree(paths['ckpt'], os.path.join(paths['workdir'], 'model'))
  shutil.copy(os.path.join(paths['ckpt'], 'model_config.json'), os.path.join(paths['workdir'], 'model_config.json'))
  with open(os.path.join(paths['workdir'], 'model_config.json')) as f:
    text = f.read()
  with open(os.path.join(paths['workdir'], 'model_config.json'), 'w') as f:
    import json
    f.write(json.dumps(json.loads(text)['model']))
  # Images: a folder of 4, one of 2, an empty one, a corrupt file, a plain file, a non-empty folder.
  collection = planted.make_planted_collection(groups=((0, 1, 2),), num_images=4, image_size=64, patch_cells=2,
                                               seed=2)
  names = planted.write_class_folder(collection, str(root / 'photos' / 'Horse100'))
  paths['photos'] = str(root / 'photos' / 'Horse100')
  paths['internet'] = str(root / 'photos')
  paths['image'] = os.path.join(paths['photos'], names[0])
  paths['two'] = str(root / 'two')
  os.makedirs(paths['two'])
  for name in names[:2]:
    shutil.copy(os.path.join(paths['photos'], name), paths['two'])
  paths['empty'] = str(root / 'empty')
  os.makedirs(paths['empty'])
  paths['broken'] = str(root / 'broken.jpg')
  with open(paths['broken'], 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 not really a jpeg')
  paths['file'] = str(root / 'notes.txt')
  with open(paths['file'], 'w') as f:
    f.write('a file')
  paths['nonempty'] = str(root / 'nonempty')
  os.makedirs(paths['nonempty'])
  shutil.copy(paths['file'], paths['nonempty'])
  paths['out_dir'] = str(root / 'outdir')
  os.makedirs(paths['out_dir'])
  paths['missing'] = str(root / 'nowhere')
  return paths


P = ['--checkpoint', '{ckpt}', '--query', '{image}', '--targets', '{image}', '--out', '{root}/r.npz']
D = ['--checkpoint', '{ckpt}', '--images', '{photos}', '--out', '{root}/report']
T = ['--checkpoint', '{ckpt}', '--data-dir', '{missing}']
I = ['--checkpoint', '{ckpt}', '--data-dir', '{internet}', '--classes', 'Horse100', '--out', '{root}/i.json']

# (module, arguments, what the one error line must name)
CASES = [
    # predict
    ('segswap_jax.predict', P + ['--batch-size', '0'], '--batch-size: expected a positive integer, got 0'),
    ('segswap_jax.predict', P + ['--batch-size', '-2'], '--batch-size'),
    ('segswap_jax.predict', P + ['--image-size', '100', '75'], '--image-size 100x75'),
    ('segswap_jax.predict', P + ['--image-size', '480'], 'expected 2 numbers (HEIGHT WIDTH)'),
    ('segswap_jax.predict', ['--checkpoint', '{missing}'] + P[2:], 'no such checkpoint directory'),
    ('segswap_jax.predict', ['--checkpoint', '{file}'] + P[2:], 'a file, not a checkpoint directory'),
    ('segswap_jax.predict', ['--checkpoint', '{workdir}'] + P[2:], 'a training workdir, not a model checkpoint; use'),
    ('segswap_jax.predict', ['--checkpoint', '{small_as_tiny}'] + P[2:], 'has shape'),
    ('segswap_jax.predict', ['--checkpoint', '{corrupt}'] + P[2:], 'corrupt'),
    ('segswap_jax.predict', ['--checkpoint', '{truncated}'] + P[2:], 'truncated'),
    ('segswap_jax.predict', P[:2] + ['--query', '{missing}.jpg'] + P[4:], 'nowhere.jpg: no such image file'),
    ('segswap_jax.predict', P[:2] + ['--query', '{broken}'] + P[4:], 'broken.jpg: unreadable or corrupt image'),
    ('segswap_jax.predict', P[:6] + ['--out', '{out_dir}'], 'outdir is a directory'),
    ('segswap_jax.predict', P + ['--vis', '{out_dir}'], '--vis'),
    ('segswap_jax.predict', P + ['--image_size', '480', '640'], '--image_size is now spelled --image-size'),
    # discover
    ('segswap_jax.discover', D + ['--batch-size', '0'], '--batch-size'),
    ('segswap_jax.discover', D + ['--batch-size', '-2'], '--batch-size'),
    ('segswap_jax.discover', D[:4] + ['--out', '{file}'], 'notes.txt is a file'),
    ('segswap_jax.discover', D + ['--max-patterns', '0'], '--max-patterns'),
    ('segswap_jax.discover', D + ['--node-threshold', '1.5'], '--node-threshold: expected a number in (0, 1), got 1.5'),
    ('segswap_jax.discover', D + ['--sigma', '0'], '--sigma'),
    ('segswap_jax.discover', D + ['--max-pairs-per-image', '-1'], '--max-pairs-per-image'),
    ('segswap_jax.discover', D + ['--image-size', '100'], '--image-size 100x100'),
    ('segswap_jax.discover', D[:2] + ['--images', '{missing}'] + D[4:], 'nowhere: no such folder'),
    ('segswap_jax.discover', D[:2] + ['--images', '{empty}'] + D[4:], 'empty: no images'),
    ('segswap_jax.discover', D[:2] + ['--images', '{two}'] + D[4:], 'needs at least 3'),
    ('segswap_jax.discover', D + ['--max_pairs_per_image', '3'], '--max-pairs-per-image'),
    # validation
    ('segswap_jax.validation', ['--checkpoint', '{ckpt}', '--data-dir', '{missing}', '--num-pairs', '-3'], '--num-pairs'),
    ('segswap_jax.validation', ['--checkpoint', '{ckpt}', '--data-dir', '{missing}', '--batch-size', '0'], '--batch-size'),
    ('segswap_jax.validation', ['--checkpoint', '{ckpt}', '--data-dir', '{missing}'], 'no segswap_pairs dataset'),
    ('segswap_jax.validation', ['--checkpoint', '{ckpt}', '--data', '{missing}'], '--data is no longer accepted: use --data-dir'),
    # Tokyo 24/7, Pitts30k
    ('eval.tokyo247', T + ['--topk', '0'], '--topk'),
    ('eval.tokyo247', T + ['--topk', '-5'], '--topk'),
    ('eval.tokyo247', T + ['--num-queries', '0'], '--num-queries'),
    ('eval.tokyo247', T + ['--image-size', '100', '75'], '--image-size 100x75'),
    ('eval.tokyo247', T + ['--batch-size', '0'], '--batch-size'),
    ('eval.tokyo247', T + ['--image_size', '640', '480'], 'HEIGHT WIDTH: height first'),
    ('eval.tokyo247', T, 'file not found'),
    ('eval.tokyo247', T + ['--dist-threshold', '0'], '--dist-threshold'),
    ('eval.tokyo247', T + ['--num-processes', '2'], '--num-processes > 1 needs --coordinator-address'),
    ('eval.pitts30k', T + ['--topk', '0'], '--topk'),
    ('eval.pitts30k', T + ['--cache-dtype', 'int8'], '--cache-dtype'),
    # Brueghel
    ('eval.brueghel', T + ['--query-box-size', '-4'], '--query-box-size'),
    ('eval.brueghel', T + ['--db-size', '100'], '--db-size: expected a positive multiple of 16, got 100'),
    ('eval.brueghel', T + ['--det-iou', '1.5'], '--det-iou'),
    ('eval.brueghel', T, 'annotations: file not found'),
    ('eval.brueghel', T + ['--split', 'train'], '--split'),
    # Internet
    ('eval.internet', I + ['--batch-size', '0'], '--batch-size'),
    ('eval.internet', I + ['--image-size', '100'], '--image-size 100x100'),
    ('eval.internet', I + ['--image-size', '64', '96'], 'square images'),
    ('eval.internet', I + ['--sigma', '0'], 'sigma must be positive'),
    ('eval.internet', I[:4] + ['--classes', 'Nope'], 'Nope: no such class directory'),
    ('eval.internet', ['--checkpoint', '{ckpt}', '--data-dir', '{missing}'], 'nowhere: no such data directory'),
    ('eval.internet', I + ['--grabcut-rng', 'other'], '--grabcut-rng'),
    # convert
    ('segswap_jax.convert', ['--random-init', '--out', '{nonempty}'], 'not an empty directory'),
    ('segswap_jax.convert', ['--random-init', '--out', '{file}'], 'notes.txt is a file'),
    ('segswap_jax.convert', ['--torch-checkpoint', '{missing}.pth', '--out', '{root}/c1'], 'nowhere.pth: no such file'),
    ('segswap_jax.convert', ['--torch-checkpoint', '{file}', '--out', '{root}/c2'], 'not a readable PyTorch checkpoint'),
    ('segswap_jax.convert', ['--random-init', '--size', 'huge', '--out', '{root}/c3'], '--size'),
    # data tools
    ('data_pipeline.visualize', ['--data-dir', '{missing}', '--tile', '0'], '--tile'),
    ('data_pipeline.visualize', ['--data-dir', '{missing}', '--n', '0'], '--n'),
    ('data_pipeline.visualize', ['--data-dir', '{missing}', '--lines', '-1'], '--lines'),
    ('data_pipeline.visualize', ['--data-dir', '{missing}'], 'no segswap_pairs dataset'),
    ('data_pipeline.import_reference', ['--src', '{missing}', '--data-dir', '{root}/d', '--num-validation', '-1'],
     '--num-validation'),
    ('data_pipeline.import_reference', ['--src', '{missing}', '--data-dir', '{root}/d'], 'nowhere'),
]


def one_error_line(stderr: str) -> str:
  lines = [line for line in stderr.replace('\r', '\n').splitlines() if line.strip() and not line.startswith('note:')
           and '%|' not in line]
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), stderr[-3000:]
  return lines[0]


def test_at_least_fifty_cases():
  assert len(CASES) + len(ABSL_CASES) >= 50


@pytest.mark.parametrize('module, args, expected', CASES, ids=[f'{m.split(".")[-1]}:{" ".join(a[-2:])}'
                                                                for m, a, _ in CASES])
def test_bad_invocation(world, module, args, expected, capsys):
  argv = [a.format(**world) for a in args]
  capsys.readouterr()
  code = importlib.import_module(module).main(argv)
  err = one_error_line(capsys.readouterr().err)
  assert code == 2
  assert expected.format(**world) in err, err


# The absl commands run as programs (their flags exist only then).
ABSL_CASES = [
    ('data_pipeline.generate', ['--config=configs/data/demo.py', '--data-dir={root}/g', '--config.num_workers=-3'],
     'config.num_workers=-3: expected an integer >= 0'),
    ('data_pipeline.generate', ['--config=configs/data/demo.py', '--data-dir={root}/g', '--config.num_validation=-1'],
     'config.num_validation=-1'),
    ('data_pipeline.generate', ['--config=configs/data/demo.py', '--data-dir={root}/g', '--config.image_size=100'],
     'config.image_size=100: expected a positive multiple of 16'),
    ('data_pipeline.generate', ['--config=configs/data/demo.py', '--data_dir={root}/g'], '--data_dir is now spelled --data-dir'),
    ('segswap_jax.train', ['--config=configs/demo.py', '--workdir={root}/w', '--config.steps_per_epoch=0'],
     'config.steps_per_epoch=0: expected an integer >= 1'),
    ('segswap_jax.train', ['--config=configs/demo.py', '--workdir={root}/w', '--config.learning_rate=-1.0'],
     'config.learning_rate=-1.0: expected a number > 0'),
    ('segswap_jax.train', ['--config=configs/demo.py', '--workdir={root}/w', '--config.data.p_tps=2.0'],
     'config.data.p_tps=2.0: expected a number in [0, 1]'),
    ('segswap_jax.train', ['--config=configs/demo.py', '--workdir={root}/w', '--config.batch_neg=70'],
     'in-batch negatives'),
    ('segswap_jax.train', ['--config=configs/demo.py', '--workdir={root}/w', '--config.no_such_key=1'],
     'unknown config key'),
    ('segswap_jax.train', ['--config=configs/nowhere.py', '--workdir={root}/w'], 'cannot load the config file'),
]


@pytest.mark.parametrize('module, args, expected', ABSL_CASES, ids=[f'{m.split(".")[-1]}:{a[-1]}' for m, a, _ in ABSL_CASES])
def test_bad_program_invocation(world, module, args, expected):
  env = {**os.environ, 'PYTHONPATH': REPO}
  result = subprocess.run([sys.executable, '-m', module, *[a.format(**world) for a in args]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  err = one_error_line(result.stderr)
  assert result.returncode == 2 and expected.format(**world) in err, err
  assert not os.path.exists(os.path.join(world['root'], 'w', 'checkpoints'))
