"""Trains SegSwap on segment-swapping pairs (docs/training.md): pmapped step, Orbax checkpoints, resume.

  python -m segswap_jax.train --config=configs/demo.py --workdir workdirs/demo
  python -m segswap_jax.train --config=configs/coco.py --workdir workdirs/coco \\
      --config.data.data_dir=DATA --config.backbone_checkpoint=ckpt/moco --config.batch_pos=8
  # several hosts: the same command on each, plus
      --coordinator-address=HOST0:1234 --num-processes=2 --process-id=I   (or --jax-distributed-auto)

Config files are found relative to the working directory, else in the installed `configs/`. Running
the same command again resumes from the last checkpoint; SIGTERM saves one and exits with status 143.
What lands in the workdir: `segswap_jax/training/loop.py`.
"""
from __future__ import annotations

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from segswap_jax import cli
from segswap_jax import errors
from segswap_jax import multihost
from segswap_jax.training import loop


def define_flags() -> None:
  """The command line (defined only when run as a program, so importing this module defines none)."""
  config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. configs/demo.py.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exported models.')
  flags.DEFINE_string('coordinator-address', None, 'Multi-host: HOST:PORT of process 0.')
  flags.DEFINE_integer('num-processes', 1, 'Multi-host: number of processes.', lower_bound=1)
  flags.DEFINE_integer('process-id', 0, 'Multi-host: index of this process.', lower_bound=0)
  flags.DEFINE_bool('jax-distributed-auto', False,
                    'Multi-host: let jax.distributed.initialize() detect the cluster (TPU, SLURM, ...).')


@cli.absl_main
def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f'unexpected arguments: {" ".join(argv[1:])}')
  args = flags.FLAGS
  if args.config is None or not args.workdir:
    raise errors.ConfigError('--config and --workdir are required, e.g. '
                             '--config=configs/demo.py --workdir workdirs/demo')
  logging.set_verbosity(logging.WARNING)
  multihost.initialize_distributed(args['coordinator-address'].value, args['num-processes'].value,
                                   args['process-id'].value, auto=args['jax-distributed-auto'].value)
  summary = loop.train_and_evaluate(args.config, args.workdir)
  if jax.process_index() == 0:
    loop.print_summary(summary, args.workdir)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_absl_flags)
