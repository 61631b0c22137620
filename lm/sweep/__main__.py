"""python -m lm.sweep: see lm/sweep/__init__.py."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from lm.errors import UserError
from lm.evaluate import evaluate_trial
from lm.sweep import report, runner, spec, state
from lm.sweep import trials as trials_lib



def parse_overrides(argv: list[str]) -> tuple[dict, list[str]]:
  """--config.a.b=v arguments (values parsed like Python literals) and the rest."""
  import ast
  overrides, rest = {}, []
  for arg in argv:
    match = re.match(r'--config\.([\w.]+)=(.*)$', arg, re.S)
    if not match:
      rest.append(arg)
      continue
    key, text = match.groups()
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    overrides[key] = value
  return overrides, rest


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, argv = parse_overrides(argv)
  parser = argparse.ArgumentParser(
      prog='python -m lm.sweep', description=__doc__.split('\n\n')[0],
      epilog='--config.KEY=VALUE (any number) sets KEY for every trial of every stage.')
  parser.add_argument('--sweep', help='sweep file, configs/sweeps/*.py[:arg]')
  parser.add_argument('--workdir', help='sweep directory (one sub-directory per trial)')
  parser.add_argument('--parallel', type=int, default=1, help='trials at once (processes)')
  parser.add_argument('--print-commands', '--print_commands', action='store_true',
                      dest='print_commands', help='print one command per trial and exit')
  parser.add_argument('--aggregate', action='store_true',
                      help='only (re)write results.csv / results.md / plots from the workdir')
  parser.add_argument('--evaluate', help=argparse.SUPPRESS)  # The eval helper: a trial workdir.
  parser.add_argument('--evals', default='{}', help=argparse.SUPPRESS)
  parser.add_argument('--finetuned', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--verbose', action='store_true', help='tracebacks for user errors')
  args = parser.parse_args(argv)
  try:
    if args.evaluate:
      try:
        evaluate_trial(args.evaluate, json.loads(args.evals), is_finetune=args.finetuned)
      except UserError as e:
        if args.verbose:
          raise
        print(f'error: {e}', file=sys.stderr)
        return 2
      return 0
    if not args.sweep or not args.workdir:
      parser.error('--sweep and --workdir are required')
    sweep = spec.load_sweep(args.sweep)
    trials = trials_lib.make_trials(sweep, args.workdir, overrides)
    if args.print_commands:
      for trial in trials:
        print(trial.shell_command())
      return 0
    if not args.aggregate:
      for trial in trials:
        state.check_unchanged(trial)
    workdir = os.path.abspath(args.workdir)
    if args.aggregate:
      report.aggregate(sweep, trials, workdir)
      print(f'sweep: results in {workdir}/results.md')
      return 0
    print(f'sweep {sweep.name}: {len(trials)} trials in {len(sweep.stages)} stage(s) -> '
          f'{workdir}', flush=True)
    with runner.SweepLock(workdir):
      rc = runner.Runner(sweep, trials, workdir, parallel=args.parallel).run()
      report.aggregate(sweep, trials, workdir)
    print(f'sweep: results in {workdir}/results.csv, results.md and *.png', flush=True)
    return rc
  except UserError as e:
    if args.verbose:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
