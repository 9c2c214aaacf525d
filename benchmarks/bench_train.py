"""Train step throughput: steps/s, positive pairs/s and achieved FLOP/s vs the matmul peak.

Shapes:
  * coco: the reference recipe, 480x480, frozen ResNet-50 + small transformer, 5 positives + 15 in-batch
    negatives per device (the step also computes the backbone on the 10 images);
  * demo: configs/demo.py's model and batch at its image size.
The step is the one `python -m segswap_jax.train` runs (jitted on one device here; pmap runs one copy per
device). Batches are random arrays of the loader's format: the speed does not depend on their values.
"""
import jax

from benchmarks import bench_matmul_peak, random_batches, timing
from configs import coco, demo
from segswap_jax import model as model_lib
from segswap_jax.training import config as config_lib
from segswap_jax.training import step as step_lib


def measure(config, repeats: int):
  """(seconds per step, FLOPs per step) of the jitted train step of a training config."""
  model_config = config_lib.build_model_config(config)
  settings = config_lib.training_settings(config)
  params = model_lib.init_params(model_config, jax.random.PRNGKey(0))
  state, frozen = step_lib.create_train_state(params, settings)
  step = jax.jit(step_lib.make_train_step(model_config, settings, axis_name=None))
  batch = random_batches.random_batch(config.batch_pos, config.data.image_size)
  flops = timing.compiled_flops(step, state, batch, frozen)
  best, _ = timing.time_call(lambda: step(state, batch, frozen), repeats=repeats)
  return best, flops


def main(quick: bool = False) -> str:
  peak = bench_matmul_peak.measure_peak_gflops()
  cases = [('demo (configs/demo.py)', demo.get_config())]
  reference = coco.get_config()
  if quick:
    reference.data.image_size = 240
  cases.append((f'coco ({reference.data.image_size}x{reference.data.image_size})', reference))
  rows = [f'machine fp32 matmul peak: {peak:.1f} GFLOP/s; one device', '',
          '| shapes | model | pairs / step (pos + neg) | s / step | steps/s | positive pairs/s | '
          'GFLOP / step | achieved GFLOP/s | % of peak |',
          '|---|---|---|---:|---:|---:|---:|---:|---:|']
  for name, config in cases:
    seconds, flops = measure(config, repeats=2 if 'coco' in name else 5)
    model = (f'{config.model.backbone}{" (trained)" if config.train_backbone else " (frozen)"} + '
             f'{config.model.size} [{config.model.block_types}]')
    achieved = flops / seconds / 1e9
    rows.append(f'| {name} | {model} | {config.batch_pos} + {config.batch_neg} | {seconds:.3f} | '
                f'{1 / seconds:.2f} | {config.batch_pos / seconds:.2f} | {flops / 1e9:.1f} | '
                f'{achieved:.1f} | {100 * achieved / peak:.0f}% |')
  return '\n'.join(rows)


if __name__ == '__main__':
  print(main())
