"""Sweeps: run a grid / zip / random set of train.py or finetune.py trials and compare them.

  python -m lm.sweep --sweep=configs/sweeps/lr_width.py --workdir=runs/lr_width [--parallel=2]
  python -m lm.sweep --sweep=configs/sweeps/transfer.py --workdir=runs/transfer --print-commands
  python -m lm.sweep --sweep=... --workdir=... --aggregate        (tables and plots only)

A sweep file defines `get_sweep()` (or `get_sweep(arg)`, called with the text after
`--sweep=FILE:`) returning a `Sweep`: stages that run in order, each a base config file plus
overrides, expanded into trials by a grid (cartesian product), zipped lists and seeded random
samples over `config.key`s. A grid or zip axis may also take named bundles of overrides
({'lora': {...}, 'full': {...}}) whose reserved keys `script`, `config` and `evals` change the
entry point, the base config file or the extra evaluations of those trials.

Every trial is exactly one command (what --print-commands prints):

  python train.py|finetune.py --config=<file> --config.k=v ... --workdir=<sweep>/<stage>/<label>

followed, if the trial asks for `evals`, by `python -m lm.sweep --evaluate=<trial workdir>`,
which measures the final params on other data (e.g. the general corpus). '{sweep}' in a value
is the sweep's workdir, so a later stage can fine-tune an earlier stage's model.

A trial is finished when its workdir holds `done.json` (written by the sweep after the command
exits 0 with a checkpoint at train.steps; it holds the final metrics). Re-running a sweep
skips finished trials and restarts unfinished ones, which resume from their own checkpoints.
SIGTERM / Ctrl-C stops the running trials at a step boundary (they save a checkpoint) and
writes what is finished so far. Trials run elsewhere from the printed commands count as
finished once their final checkpoint exists.

The package: spec (the sweep-file language), trials (expansion, checked configs, commands),
state (trial state on disk), runner (subprocesses), report (tables and plots), __main__ (CLI);
the evaluator behind --evaluate is lm.evaluate.evaluate_trial.

Results go to <workdir>/results.csv, results.md (the sweep's pivot tables and every trial),
loss_curves.png, <metric>_vs_<axis>.png and the sweep's own plots; plots.json holds the
plotted numbers.
"""

from lm.sweep.report import aggregate
from lm.sweep.runner import Runner, SweepLock
from lm.sweep.spec import (Plot, Sampler, Stage, Sweep, Table, choice, load_sweep, log_uniform,
                           randint, uniform)
from lm.sweep.state import SweepStateError, status
from lm.sweep.trials import Trial, expand, make_trials

__all__ = ['Plot', 'Runner', 'Sampler', 'Stage', 'Sweep', 'SweepLock', 'SweepStateError', 'Table',
           'Trial', 'aggregate', 'choice', 'expand', 'load_sweep', 'log_uniform', 'make_trials',
           'randint', 'status', 'uniform']
