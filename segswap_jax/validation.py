"""Mask IoU and correspondence error of a saved model on synthetic pairs with ground truth.

  python -m segswap_jax.validation --checkpoint WORKDIR/model --data-dir DATA_DIR [--split validation]
      [--picture preds.png] [--out metrics.json]

The numbers are those the training loop reports (`segswap_jax/training/validation.py`): mean mask IoU
at 0.5, and the median / mean correspondence error in cells over the ground-truth object cells.
"""
from __future__ import annotations

import json
import sys

from segswap_jax import cli
from segswap_jax.training import validation

EXAMPLE = ('python -m segswap_jax.validation --checkpoint workdirs/demo/model --data-dir workdirs/demo/data '
           '--picture preds.png')


@cli.command
def main(argv=None) -> int:
  parser = cli.parser('python -m segswap_jax.validation', __doc__, EXAMPLE, renamed={'--data': '--data-dir'})
  cli.add_checkpoint(parser, help='model directory (WORKDIR/model, best/, or a converted checkpoint)')
  cli.add_data_dir(parser, 'pair dataset directory, or the DATA_DIR holding one')
  parser.add_argument('--split', default='validation', help='split to evaluate (default: validation)')
  cli.add_batch_size(parser, 8, 'pairs per forward call')
  parser.add_argument('--num-pairs', type=cli.nonnegative_int, default=0,
                      help='evaluate only the first N pairs (0 = all)')
  parser.add_argument('--picture', default='', help='also draw the first pairs into this PNG')
  cli.add_out(parser, 'also write the metrics to this JSON file', default='')
  parser.add_argument('--compute-dtype', choices=('float32', 'bfloat16'), default=None,
                      help="evaluate in this dtype (default: the checkpoint's, float32)")
  args = parser.parse_args(argv)
  result = validation.evaluate_checkpoint(args.checkpoint, args.data_dir, args.split, args.batch_size,
                                          args.num_pairs, args.picture, compute_dtype=args.compute_dtype)
  print(f'{args.checkpoint} on {args.data_dir} [{args.split}]: ' + validation.format_result(result))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
