"""python -m lm.sweep --sweep=FILE --workdir=DIR [--parallel=N] [--print_commands] [--aggregate]
[--config.KEY=VALUE ...]: see lm/sweep/__init__.py."""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from lm import cli
from lm.config import ConfigError
from lm.evaluate import evaluate_trial
from lm.sweep import report, runner, spec, state
from lm.sweep import trials as trials_lib


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  def define(kind, name, default, help_text, **kw):
    getattr(flags, f'DEFINE_{kind}')(name, default, help_text, flag_values=flag_values, **kw)

  define('string', 'sweep', None, 'Sweep file, configs/sweeps/*.py[:arg].')
  define('string', 'workdir', None, 'Sweep directory (one sub-directory per trial).')
  define('integer', 'parallel', 1, 'Trials at once (processes).', lower_bound=1)
  define('bool', 'print_commands', False, 'Print one command per trial and exit.')
  define('bool', 'aggregate', False, 'Only (re)write results.csv / results.md / plots.')
  # The eval helper each trial with `evals` runs after training (see lm.evaluate).
  define('string', 'evaluate', None, 'Internal: a trial workdir to evaluate.')
  define('string', 'evals', '{}', 'Internal: JSON {name: {config key: value}} for --evaluate.')
  define('bool', 'finetuned', False, 'Internal: the trial was a finetune.py run.')
  flags.DEFINE_alias('print-commands', 'print_commands', flag_values=flag_values)
  cli.define_config_overrides(flag_values, argv,
                              '--config.KEY=VALUE (any number) sets KEY in every trial.')


def run(args: flags.FlagValues, positional: list[str]) -> int:
  if positional:
    raise ConfigError(f'unexpected arguments {positional}')
  if args.evaluate:
    evaluate_trial(args.evaluate, json.loads(args.evals), is_finetune=args.finetuned)
    return 0
  if not args.sweep or not args.workdir:
    raise ConfigError('--sweep and --workdir are required (see --help)')
  sweep = spec.load_sweep(args.sweep)
  trials = trials_lib.make_trials(sweep, args.workdir, cli.config_overrides(args['config']))
  if args.print_commands:
    for trial in trials:
      print(trial.shell_command())
    return 0
  workdir = os.path.abspath(args.workdir)
  if args.aggregate:
    report.aggregate(sweep, trials, workdir)
    print(f'sweep: results in {workdir}/results.md')
    return 0
  for trial in trials:
    state.check_unchanged(trial)
  print(f'sweep {sweep.name}: {len(trials)} trials in {len(sweep.stages)} stage(s) -> '
        f'{workdir}', flush=True)
  with runner.SweepLock(workdir):
    rc = runner.Runner(sweep, trials, workdir, parallel=args.parallel).run()
    report.aggregate(sweep, trials, workdir)
  print(f'sweep: results in {workdir}/results.csv, results.md and *.png', flush=True)
  return rc


def main(argv: list[str] | None = None) -> int:
  return cli.run_tool(run, define_flags, argv, prog='python -m lm.sweep',
                      doc=sys.modules['lm.sweep'].__doc__)


if __name__ == '__main__':
  sys.exit(main())
