"""Runs every benchmark: `python -m benchmarks.run [--only NAME ...] [--quick]`.

Each `benchmarks/bench_<name>.py` exposes `main(quick: bool) -> str`, which measures and returns a markdown
block (figures plus the machine line); this runner prints the blocks. Copy them into RESULTS.md by hand
with the date, so the recorded numbers are always ones that were measured.
"""
import argparse
import importlib
import pkgutil
import platform
import os

import benchmarks


def machine_line() -> str:
  import jax
  return (f'{platform.node()} | {os.cpu_count()} cores | {platform.processor() or platform.machine()} | '
          f'jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--only', nargs='*', default=None, help='benchmark names, e.g. forward scoring')
  parser.add_argument('--quick', action='store_true', help='smaller shapes and fewer repeats')
  args = parser.parse_args()
  names = sorted(m.name[len('bench_'):] for m in pkgutil.iter_modules(benchmarks.__path__)
                 if m.name.startswith('bench_'))
  if args.only:
    unknown = sorted(set(args.only) - set(names))
    if unknown:
      parser.error(f'unknown benchmark(s) {unknown}; available: {names}')
    names = [n for n in names if n in args.only]
  print(f'machine: {machine_line()}')
  for name in names:
    module = importlib.import_module(f'benchmarks.bench_{name}')
    print(f'\n## {name}\n')
    print(module.main(quick=args.quick))


if __name__ == '__main__':
  main()
