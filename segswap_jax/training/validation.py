"""Validation of a model: held-out synthetic pairs, optional Brueghel mAP, a picture of predictions.

Held-out pairs (a split of a pair dataset, unaugmented, unstyled) give, over both images of every pair:
  mask_iou           mean IoU of predicted mask > 0.5 against GT mask > 0.5 (per image, then averaged);
  corr_error_median  median distance in cells (of the other image's feature grid) between predicted and
                     GT correspondence, over every cell whose GT mask is > 0.5 (all pairs pooled);
  corr_error_mean, corr_within_1 (fraction of those cells within one cell).
The forward passes run through the inference engine (`segswap_jax.inference`). Each JAX process
evaluates its share of the split on its own devices; the per-image numbers are gathered, so every
process returns the same result. `python -m segswap_jax.validation` runs it on any saved model.
"""
from __future__ import annotations

import shutil
from typing import Dict, Optional

import jax
import numpy as np

from data_pipeline import builder
from data_pipeline import loader as loader_lib
from segswap_jax import checkpoints
from segswap_jax import cli
from segswap_jax import inference
from segswap_jax import losses
from segswap_jax import multihost
from segswap_jax import visualize


def _flat(array: np.ndarray) -> np.ndarray:
  """`(D, B, ...)` loader arrays -> `(D * B, ...)`."""
  return np.asarray(array).reshape((-1,) + np.shape(array)[2:])


class HeldOutEvaluator:
  """Mask IoU and correspondence error on one split of a pair dataset.

  Args:
    dataset_dir: the pair dataset.
    model_config: the model config of the parameters `evaluate` and `draw` get.
    batch_size: pairs per forward call (on all local devices together).
    num_pairs: evaluate only the first N pairs (0 = all).
    split: which split.
  """

  def __init__(self, dataset_dir: str, model_config, batch_size: int = 8, num_pairs: int = 0,
               split: str = 'validation'):
    self.dataset_dir = dataset_dir
    self.model_config = model_config
    self.batch_size = batch_size
    self.num_pairs = num_pairs
    self.split = split

  def _batches(self):
    # One "device" axis of the whole batch: the engine pads and shards it, so no pair is dropped.
    return loader_lib.make_eval_loader(self.dataset_dir, per_device_batch=self.batch_size, num_devices=1,
                                       split=self.split)

  def _local_limit(self) -> int:
    return -(-self.num_pairs // jax.process_count())

  def _outputs(self, model: inference.SegSwap, batch):
    """Outputs of one loader batch: (out_a, out_b) numpy `(N, h, w, 3)`."""
    images = np.concatenate([_flat(batch['image_a']), _flat(batch['image_b'])])
    feats = model.features(images, batch_size=len(images))  # uint8 RGB, as the loader gives
    feat_a, feat_b = feats[:len(images) // 2], feats[len(images) // 2:]
    out = model.pair(feat_a, feat_b)
    return np.asarray(out.out_a), np.asarray(out.out_b)

  def predict(self, params: dict, num_pairs: int):
    """The first `num_pairs` pairs of this process's share: (batch dict, out_a, out_b), flat `(N, ...)`."""
    model = inference.SegSwap(params, self.model_config)
    kept, outputs = [], []
    for batch in self._batches():
      kept.append({k: _flat(v) for k, v in batch.items()})
      outputs.append(self._outputs(model, batch))
      if sum(len(b['mask_a']) for b in kept) >= num_pairs:
        break
    batch = {k: np.concatenate([b[k] for b in kept])[:num_pairs] for k in kept[0]}
    out_a = np.concatenate([o[0] for o in outputs])[:num_pairs]
    out_b = np.concatenate([o[1] for o in outputs])[:num_pairs]
    return batch, out_a, out_b

  def evaluate(self, params: dict) -> Dict[str, float]:
    """`params`: the model tree `{'backbone', 'transformer'}`. Collective across processes."""
    model = inference.SegSwap(params, self.model_config)
    ious, errors = [], []
    seen = 0
    for batch in self._batches():
      if self.num_pairs and seen >= self._local_limit():
        break
      out_a, out_b = self._outputs(model, batch)
      keep = len(out_a)
      if self.num_pairs:
        keep = min(keep, self._local_limit() - seen)
      seen += keep
      for out, mask, corr in ((out_a, batch['mask_a'], batch['corr_a']),
                              (out_b, batch['mask_b'], batch['corr_b'])):
        out, mask, corr = out[:keep], _flat(mask)[:keep], _flat(corr)[:keep]
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

  def draw(self, params: dict, num_pairs: int, title: str = '') -> np.ndarray:
    """A picture of the first held-out pairs: predicted masks (tinted, outlined at 0.5 in yellow), GT
    masks outlined in light blue, correspondence lines from A's confident cells, mask IoU in the titles.
    Each process draws pairs of its own share."""
    batch, out_a, out_b = self.predict(params, num_pairs)
    rows = []
    for i in range(len(out_a)):
      iou_a = float(losses.mask_iou(out_a[i, ..., 2], batch['mask_a'][i]))
      iou_b = float(losses.mask_iou(out_b[i, ..., 2], batch['mask_b'][i]))
      rows.append(visualize.draw_pair(
          visualize.enlarge(batch['image_a'][i], 256),
          visualize.enlarge(batch['image_b'][i], 256), out_a[i], out_b[i],
          title=f'{title}held-out pair {i}: mask IoU A {iou_a:.2f}, B {iou_b:.2f}',
          gt_mask_a=batch['mask_a'][i], gt_mask_b=batch['mask_b'][i]))
    return visualize.stack_rows(rows)


def brueghel_map(brueghel_dir: str, model_params: dict, model_config, batch_size: int,
                 cache_dir: str, work_dir: str, db_size: int = 640, box_size: int = 64) -> Optional[float]:
  """Brueghel validation mAP (docs/reference.md §6 on `brueghelVal.json`), as the reference selects
  checkpoints. Returns the mAP on process 0, None on the others (`eval.brueghel.evaluate` gathers there).
  """
  from eval import brueghel
  shutil.rmtree(work_dir, ignore_errors=True)  # its per-query results belong to older weights
  results = brueghel.evaluate(brueghel_dir, 'val', model_params, model_config, batch_size,
                              cache_dir=cache_dir, work_dir=work_dir, db_size=db_size, box_size=box_size)
  shutil.rmtree(work_dir, ignore_errors=True)
  if results is None:
    return None
  return float(results['retrieval_map'])


def evaluate_checkpoint(checkpoint: str, data_dir: str, split: str = 'validation', batch_size: int = 8,
                        num_pairs: int = 0, picture: str = '', num_drawn: int = 6,
                        compute_dtype: Optional[str] = None) -> Dict[str, float]:
  """Held-out metrics of a saved model on one split of a pair dataset (one process), in its own compute
  dtype or `compute_dtype`."""
  params, model_config = checkpoints.load_model(checkpoint)
  model_config = cli.compute_config(model_config, compute_dtype)
  dataset_dir = builder.resolve_dataset_dir(data_dir)
  evaluator = HeldOutEvaluator(dataset_dir, model_config, batch_size, num_pairs, split)
  result = evaluator.evaluate(params)
  if picture:
    visualize.save_png(picture, evaluator.draw(params, num_drawn))
  return result


def format_result(result: Dict[str, float], what: str = 'pairs') -> str:
  """One line: mask IoU and correspondence error."""
  return (f'mask IoU {result["mask_iou"]:.3f}, correspondence error median '
          f'{result["corr_error_median"]:.2f} cells (mean {result["corr_error_mean"]:.2f}, '
          f'{100 * result["corr_within_1"]:.0f}% within 1 cell), {result["num_pairs"]} {what}')
