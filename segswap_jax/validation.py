"""Validation during training: held-out synthetic pairs, optional Brueghel mAP, a picture of predictions.

Held-out pairs (the dataset's `validation` split, unaugmented, unstyled) give, over both images of
every pair:
  mask_iou           mean IoU of predicted mask > 0.5 against GT mask > 0.5 (per image, then averaged);
  corr_error_median  median distance in cells (of the other image's feature grid) between predicted and
                     GT correspondence, over every cell whose GT mask is > 0.5 (all pairs pooled);
  corr_error_mean, corr_within_1 (fraction of those cells within one cell).
Each JAX process evaluates its share of the split; the per-image numbers are gathered, so every process
returns the same result.

Any saved model on any pair dataset (a split of `data_pipeline.generate`'s output or an imported one):

  python -m segswap_jax.validation --checkpoint WORKDIR/model --data DATA_DIR [--split validation]
      [--picture preds.png] [--out metrics.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, Optional

import jax
import numpy as np

from data_pipeline import loader as loader_lib
from segswap_jax import losses
from segswap_jax import multihost
from segswap_jax import train_step as train_step_lib
from segswap_jax import visualize
from segswap_jax.model import IMAGENET_MEAN, IMAGENET_STD


def to_uint8(images: np.ndarray) -> np.ndarray:
  """ImageNet-normalised float `(..., H, W, 3)` -> RGB uint8."""
  pixels = images * (np.asarray(IMAGENET_STD) * 255.0) + np.asarray(IMAGENET_MEAN) * 255.0
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


class HeldOutEvaluator:
  """Mask IoU and correspondence error on the validation split, batched over local devices."""

  def __init__(self, dataset_dir: str, model_config, per_device_batch: int = 8,
               num_pairs: int = 0, split: str = 'validation', devices=None):
    self.dataset_dir = dataset_dir
    self.per_device_batch = per_device_batch
    self.num_pairs = num_pairs
    self.split = split
    self.devices = devices or jax.local_devices()
    self._forward = jax.pmap(train_step_lib.make_eval_step(model_config), axis_name='batch',
                             devices=self.devices)

  def _batches(self):
    return loader_lib.make_eval_loader(self.dataset_dir, per_device_batch=self.per_device_batch,
                                       num_devices=len(self.devices), split=self.split)

  def predict(self, params, frozen, num_pairs: int):
    """The first `num_pairs` pairs of this process's share: (batch dict, out_a, out_b), flat `(N, ...)`.

    Collective: every process calls it (one pmap over all devices); the shares have equal lengths.
    """
    kept, outputs = [], []
    for batch in self._batches():
      out_a, out_b = self._forward(params, frozen, batch['image_a'], batch['image_b'])
      flat = lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:])
      out_a, out_b = train_step_lib.local_shards(out_a), train_step_lib.local_shards(out_b)
      kept.append({k: flat(v) for k, v in batch.items()})
      outputs.append((flat(out_a), flat(out_b)))
      if sum(len(b['mask_a']) for b in kept) >= num_pairs:
        break
    batch = {k: np.concatenate([b[k] for b in kept])[:num_pairs] for k in kept[0]}
    out_a = np.concatenate([o[0] for o in outputs])[:num_pairs]
    out_b = np.concatenate([o[1] for o in outputs])[:num_pairs]
    return batch, out_a, out_b

  def evaluate(self, params, frozen) -> Dict[str, float]:
    """`params`, `frozen`: replicated trainable and frozen trees (as the pmapped train step has them)."""
    ious, errors = [], []
    seen = 0
    for batch in self._batches():
      if self.num_pairs and seen >= self._local_limit():
        break
      out_a, out_b = self._forward(params, frozen, batch['image_a'], batch['image_b'])
      out_a, out_b = train_step_lib.local_shards(out_a), train_step_lib.local_shards(out_b)
      keep = batch['mask_a'].shape[0] * batch['mask_a'].shape[1]
      if self.num_pairs:
        keep = min(keep, self._local_limit() - seen)
      seen += keep
      for out, mask, corr in ((out_a, batch['mask_a'], batch['corr_a']),
                              (out_b, batch['mask_b'], batch['corr_b'])):
        out = out.reshape((-1,) + out.shape[2:])[:keep]
        mask = mask.reshape((-1,) + mask.shape[2:])[:keep]
        corr = corr.reshape((-1,) + corr.shape[2:])[:keep]
        ious.append(np.asarray(losses.mask_iou(out[..., 2], mask)))
        error = np.asarray(losses.correspondence_error_cells(out[..., :2], corr))
        errors.append(error[mask > 0.5])
    ious = multihost.concat_over_processes(np.concatenate(ious).astype(np.float64))
    errors = multihost.concat_over_processes(np.concatenate(errors).astype(np.float64))
    return {
        'mask_iou': float(np.mean(ious)),
        'corr_error_median': float(np.median(errors)) if errors.size else float('nan'),
        'corr_error_mean': float(np.mean(errors)) if errors.size else float('nan'),
        'corr_within_1': float(np.mean(errors <= 1.0)) if errors.size else float('nan'),
        'num_pairs': int(len(ious) // 2),
    }

  def _local_limit(self) -> int:
    return -(-self.num_pairs // jax.process_count())

  def draw(self, params, frozen, num_pairs: int, title: str = '') -> np.ndarray:
    """A picture of the first held-out pairs: predicted masks (tinted, outlined at 0.5 in yellow), GT
    masks outlined in light blue, correspondence lines from A's confident cells, mask IoU in the titles. Collective (every process calls it,
    each draws pairs of its own share)."""
    batch, out_a, out_b = self.predict(params, frozen, num_pairs)
    rows = []
    for i in range(len(out_a)):
      iou_a = float(losses.mask_iou(out_a[i, ..., 2], batch['mask_a'][i]))
      iou_b = float(losses.mask_iou(out_b[i, ..., 2], batch['mask_b'][i]))
      rows.append(visualize.draw_pair(
          visualize.enlarge(to_uint8(batch['image_a'][i]), 256),
          visualize.enlarge(to_uint8(batch['image_b'][i]), 256), out_a[i], out_b[i],
          title=f'{title}held-out pair {i}: mask IoU A {iou_a:.2f}, B {iou_b:.2f}',
          gt_mask_a=batch['mask_a'][i], gt_mask_b=batch['mask_b'][i]))
    return visualize.stack_rows(rows)


def brueghel_map(brueghel_dir: str, model_params: dict, model_config, batch_size: int,
                 cache_dir: str, work_dir: str, db_size: int = 640, box_size: int = 64) -> Optional[float]:
  """Brueghel validation mAP (SPEC §6 on `brueghelVal.json`), as the reference selects checkpoints.

  Returns the mAP on process 0, None on the others (`eval.brueghel.evaluate` gathers on process 0).
  """
  import shutil
  from eval import brueghel
  shutil.rmtree(work_dir, ignore_errors=True)  # its per-query results belong to older weights
  results = brueghel.evaluate(brueghel_dir, 'val', model_params, model_config, batch_size,
                              cache_dir=cache_dir, work_dir=work_dir, db_size=db_size, box_size=box_size)
  shutil.rmtree(work_dir, ignore_errors=True)
  if results is None:
    return None
  return float(results['retrieval_map'])


def evaluate_checkpoint(checkpoint: str, data_dir: str, split: str = 'validation', batch_size: int = 8,
                        num_pairs: int = 0, picture: str = '', num_drawn: int = 6) -> Dict[str, float]:
  """Held-out metrics of a saved model on one split of a pair dataset (one process)."""
  from data_pipeline import builder
  from segswap_jax import checkpoints
  params, model_config = checkpoints.load_model(checkpoint)
  dataset_dir = builder.resolve_dataset_dir(data_dir)
  # One device: every pair of the split is evaluated (several devices drop a ragged last batch).
  devices = jax.local_devices()[:1]
  evaluator = HeldOutEvaluator(dataset_dir, model_config, batch_size, num_pairs, split, devices)
  trainable, frozen = train_step_lib.split_params(params, train_backbone=False)
  trainable = train_step_lib.replicate(trainable, devices)
  frozen = train_step_lib.replicate(frozen, devices)
  result = evaluator.evaluate(trainable, frozen)
  if picture:
    visualize.save_png(picture, evaluator.draw(trainable, frozen, num_drawn))
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m segswap_jax.validation',
      description='Mask IoU and correspondence error of a saved model on synthetic pairs with ground truth.')
  parser.add_argument('--checkpoint', required=True, help='model directory (WORKDIR/model, best/, converted)')
  parser.add_argument('--data', required=True, help='pair dataset directory, or the DATA_DIR holding one')
  parser.add_argument('--split', default='validation', help='split to evaluate (default: validation)')
  parser.add_argument('--batch-size', type=int, default=8, help='pairs per device and forward call')
  parser.add_argument('--num-pairs', type=int, default=0, help='evaluate only the first N pairs (0 = all)')
  parser.add_argument('--picture', default='', help='also draw the first pairs into this PNG')
  parser.add_argument('--out', default='', help='also write the metrics to this JSON file')
  args = parser.parse_args(argv)
  from data_pipeline.errors import DataError
  from segswap_jax.checkpoints import CheckpointError
  try:
    result = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.num_pairs,
                                 args.picture)
  except (DataError, CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{args.checkpoint} on {args.data} [{args.split}]: ' + format_result(result))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=2)
  return 0


def format_result(result: Dict[str, float], what: str = 'pairs') -> str:
  """One line: mask IoU and correspondence error."""
  return (f'mask IoU {result["mask_iou"]:.3f}, correspondence error median '
          f'{result["corr_error_median"]:.2f} cells (mean {result["corr_error_mean"]:.2f}, '
          f'{100 * result["corr_within_1"]:.0f}% within 1 cell), {result["num_pairs"]} {what}')


if __name__ == '__main__':
  sys.exit(main())
