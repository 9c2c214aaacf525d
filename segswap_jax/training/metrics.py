"""Training metrics on disk: a JSON-lines file and TensorBoard event files, written by process 0 only.

  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.write(step, {'train/loss': 0.31, ...})   # one JSON line {"step": ..., ...} and one scalar each
  writer.close()

`read_metrics(workdir)` reads the JSON lines back (the demo and the tests use it).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


class MetricWriter:
  """Appends scalars to `workdir/metrics.jsonl` and `workdir/tensorboard/`; a no-op when disabled."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a')
    from tensorboardX import SummaryWriter  # imported late: only process 0 needs it
    self._tensorboard = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    record = {'step': int(step)}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
    self._jsonl.write(json.dumps(record, sort_keys=True) + '\n')
    self._jsonl.flush()
    for key, value in clean.items():
      self._tensorboard.add_scalar(key, value, int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tensorboard.close()
      self._jsonl = self._tensorboard = None


def read_metrics(workdir: str) -> List[Dict[str, float]]:
  """The records of `workdir/metrics.jsonl`, in the order written."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
