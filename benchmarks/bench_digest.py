"""What verifying checkpoints costs: the parameters' digest at load, against a predict run's start-up.

`checkpoints.load_model` recomputes the digest of every parameter (BLAKE2b over the bytes) and compares it
with the one written at save. Timed here for the small transformer alone, the ResNet-50 conv4 + small
model (the released checkpoint's size) and ResNet-101 conv4 (the original NC-Net's backbone); and the
start-up of `python -m segswap_jax.predict` on the ResNet-50 + small model (a new process: imports,
loading, verification, compilation, one 64 x 64 pair), of which the digest is a part.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import PIL.Image

from segswap_jax import checkpoints
from segswap_jax import model as model_lib


def _params(config):
  return jax.tree.map(np.asarray, model_lib.init_params(config, jax.random.key(0)))


def _best(fn, repeats=5):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main(quick: bool = False) -> str:
  small = model_lib.model_config('small')
  resnet101 = model_lib.model_config('small', arch='ncnet')
  resnet101.backbone = 'resnet101_conv4'
  rows = ['| model | parameters | MiB | digest (s) | load with verification (s) | load without (s) |',
          '|---|---:|---:|---:|---:|---:|']
  startup = None
  with tempfile.TemporaryDirectory() as root:
    cases = [('small transformer alone', small, 'transformer'), ('ResNet-50 conv4 + small transformer', small, None)]
    if not quick:
      cases.append(('ResNet-101 conv4 + NC-Net 3, 3, 3 / 16, 16, 1', resnet101, None))
    for label, config, part in cases:
      params = _params(config)
      tree = params[part] if part else params
      count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
      size = sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)) / 2 ** 20
      digest_s = _best(lambda: checkpoints.tree_digest(tree))
      load_s = load_plain_s = None
      if part is None:
        directory = checkpoints.save_model(os.path.join(root, label.split()[0]), params, config)
        load_s = _best(lambda: checkpoints.load_model(directory), 3)
        stored = os.path.join(directory, checkpoints.CONFIG_FILE)
        with open(stored) as f:
          text = f.read()
        data = json.loads(text)
        data.pop('digest')
        with open(stored, 'w') as f:
          json.dump(data, f)
        load_plain_s = _best(lambda: checkpoints.load_model(directory), 3)
        with open(stored, 'w') as f:
          f.write(text)
        if startup is None:
          image = os.path.join(root, 'q.png')
          PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
          command = [sys.executable, '-m', 'segswap_jax.predict', '--checkpoint', directory, '--query', image,
                     '--targets', image, '--image-size', '64', '64', '--out', os.path.join(root, 'r.npz')]
          start = time.perf_counter()
          subprocess.run(command, check=True, capture_output=True)
          startup = (time.perf_counter() - start, digest_s)
      rows.append(f'| {label} | {count:,} | {size:.1f} | {digest_s:.3f} | '
                  f'{"" if load_s is None else f"{load_s:.2f}"} | {"" if load_plain_s is None else f"{load_plain_s:.2f}"} |')
  rows += ['', f'`python -m segswap_jax.predict` on the ResNet-50 + small model, one 64 x 64 pair, a new process: '
               f'{startup[0]:.1f} s in all; the digest is {100 * startup[1] / startup[0]:.1f}% of it.']
  return '\n'.join(rows)


if __name__ == '__main__':
  print(main())
