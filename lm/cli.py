"""Shared command-line handling for train.py, finetune.py and the lm.* tools.

One style everywhere: absl flags, with `--config.key=value` overrides parsed by ml_collections'
config_flags against the config's own types. train.py / finetune.py / lm.bench / lm.data use
the global absl FLAGS (`run`); tools that are also called in-process (lm.sweep, lm.generate,
lm.tasks) parse into a FlagValues of their own (`run_tool`), so their flags never collide.

A user's mistake (any lm.errors.UserError: unknown or mistyped config key, missing config
file, bad value, unwritable workdir, bad data or checkpoint) ends the program with one line on
stderr and exit code 2; the traceback is shown only with --verbose.
"""

from __future__ import annotations

import gc
import logging as py_logging
import os
import re
import sys
import threading
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from lm import config as config_lib
from lm.errors import UserError


def _override_keys(argv: list[str]) -> list[str]:
  keys = []
  for arg in argv:
    match = re.match(r'--config\.([\w.]+)(=|$)', arg)
    if match:
      keys.append(match.group(1))
  return keys


def check_command_line(argv: list[str]) -> None:
  """Before absl parses: the config file exists and every --config.a.b override is a real key."""
  for i, arg in enumerate(argv):
    path = None
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
    if path is not None:
      file_path = path.split(':', 1)[0]
      if not os.path.exists(file_path):
        raise config_lib.ConfigError(f'--config: no such config file {file_path!r}')
  reference = config_lib.base_config()
  for key in _override_keys(argv):
    config_lib.check_key(key, reference)


def precheck(argv: list[str] | None = None) -> None:
  """Call before DEFINE_config_file, which already applies --config.* overrides when defined."""
  try:
    check_command_line(list(sys.argv if argv is None else argv))
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def flag_error_message(error: Exception) -> str:
  """absl/config_flags' parse error as one line naming the config key."""
  text = ' '.join(str(error).split())
  match = re.match(r'flag --config\.([\w.]+)=(.*?): (.*)$', text)
  if match:
    key, value, detail = match.groups()
    return f'config key {key}: cannot use {value!r}: {detail}'
  return text


def _parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """app.run's flags_parser: one line and exit 2 instead of 'FATAL Flags parsing error'."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    print(f'error: {flag_error_message(e)}', file=sys.stderr)
    sys.exit(2)


def _one_line_records(record) -> bool:
  """Without --verbose, logged errors stay one line (e.g. Orbax's failed background save)."""
  record.exc_info = record.exc_text = record.stack_info = None
  return True


def define_run_flags(default_config: str):
  """The flags train.py and finetune.py share: --config (+ overrides), --workdir, --verbose."""
  config = config_flags.DEFINE_config_file('config', default_config,
                                           'Config file (configs/*.py).')
  workdir = flags.DEFINE_string('workdir', '', 'Run directory (default: runs/<config name>).')
  flags.DEFINE_bool('verbose', False, 'Show tracebacks for user errors.')
  for name in ('config', 'workdir', 'verbose'):  # --help lists the main module's key flags.
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  return config, workdir


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
  """absl.app.run(main) with one-line errors for user mistakes."""
  # What is alive now (the imported modules, their functions and constants) lives until exit:
  # frozen, it is never scanned again by the collections that tracing triggers (gen-2 time of
  # a tiny train.py run: 0.31-0.33 s -> 0.13 s, measured with gc.callbacks).
  gc.freeze()
  argv = list(sys.argv if argv is None else argv)
  verbose = '--verbose' in argv or '--verbose=true' in argv
  precheck(argv)

  def guarded(args):
    if not verbose:
      # Orbax and JAX log every save at INFO; a person wants the progress lines.
      logging.set_verbosity(logging.WARNING)
      logging.get_absl_handler().addFilter(_one_line_records)
    try:
      main(args)
    except UserError as e:
      if verbose:
        raise
      _exit_with_one_line(e)
    # main (train, finetune, bench) has closed every file and checkpoint manager it opened.
    # Freezing skips the interpreter's last full garbage collection at exit, over every object
    # JAX's tracing left: ~0.5 s of CPU per process for a tiny run (py-spy: gc_collect_main
    # after the last atexit handler). atexit handlers still run.
    gc.freeze()

  app.run(guarded, argv=argv, flags_parser=_parse_flags)


def _exit_with_one_line(error: BaseException) -> None:
  """Prints the user's error as one line and exits 2, with nothing printed after it.

  The interpreter's shutdown still runs (atexit: in-flight checkpoint commits, flushes), but a
  background thread (Orbax's async checkpointer, grain's prefetch) that fails because the
  interpreter is going down, e.g. 'cannot schedule new futures after interpreter shutdown',
  has nothing to add to the error already reported: its traceback and log lines are dropped.
  """
  print(f'error: {error}', file=sys.stderr, flush=True)
  threading.excepthook = lambda args: None
  sys.unraisablehook = lambda unraisable: None
  py_logging.disable(py_logging.CRITICAL)
  sys.exit(2)


# --------------------------------------------------------------------------- tools


def define_config_overrides(flag_values: flags.FlagValues, argv: list[str], help_text: str):
  """--config.KEY=VALUE flags for any key of the base config, typed by ml_collections."""
  return config_flags.DEFINE_config_dict('config', config_lib.base_config(), help_text,
                                         flag_values=flag_values, sys_argv=list(argv))


def config_overrides(config_flag: flags.Flag) -> dict:
  """{dotted key: parsed value} of the --config.KEY=VALUE flags given (flag_values['config'])."""
  return dict(config_flags.get_override_values(config_flag))


def flag_help(flag_values: flags.FlagValues) -> str:
  """One entry per flag: --name, its help text and its default."""
  lines = []
  for name in sorted(flag_values):
    flag = flag_values[name]
    if name != flag.name or '.' in name:  # Short names; --config.KEY overrides.
      continue
    shown = flag.default is not None and name != 'config'
    default = f' (default: {flag.default_as_str})' if shown else ''
    lines.append(f'  --{name}: {flag.help}{default}')
  return '\n'.join(lines)


def run_tool(main: Callable[[flags.FlagValues, list[str]], int | None],
             define: Callable[[flags.FlagValues, list[str]], None], argv: list[str] | None = None,
             *, prog: str, doc: str) -> int:
  """Parses argv into a FlagValues of the tool's own and calls main(flag_values, positional).

  --help prints `doc` and every flag; a flag error or a UserError is one line and exit code 2
  (the traceback with --verbose). Returns main's exit code (None means 0).
  """
  argv = [prog] + list(sys.argv[1:] if argv is None else argv)
  flag_values = flags.FlagValues()
  define(flag_values, argv)
  flags.DEFINE_bool('verbose', False, 'Show tracebacks for user errors.', flag_values=flag_values)
  if any(a in ('--help', '-h', '--helpfull') for a in argv[1:]):
    print(f'usage: {prog} [flags]\n\n{doc.strip()}\n\nflags:\n{flag_help(flag_values)}')
    return 0
  try:
    check_command_line(argv)
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  positional = _parse_flags(argv, flag_values)[1:]
  try:
    return main(flag_values, positional) or 0
  except UserError as e:
    if flag_values.verbose:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 2
