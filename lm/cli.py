"""Shared command-line handling for train.py, finetune.py and the lm.* tools.

A user's mistake (unknown or mistyped config key, missing config file, bad value, unwritable
workdir, bad data or checkpoint) ends the program with one line on stderr and exit code 2;
the traceback is shown only with --verbose.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

from lm import config as config_lib



# Modules whose error classes mean "the user's input is wrong": one line, exit 2, no traceback.
_USER_ERROR_CLASSES = (('lm.data', 'DataError'), ('lm.checkpoint', 'CheckpointError'),
                       ('lm.loop', 'TrainingError'), ('lm.convert', 'ConvertError'))


def user_error_types() -> tuple[type[BaseException], ...]:
  """The user-error classes of the modules already imported.

  An error of a module's class can only come from an imported module, and importing the others
  here (grain, orbax, ...) while an exception is being handled could replace it with an
  ImportError: on a machine without grain, a GPU out-of-memory error read
  "No module named 'grain'".
  """
  errors = [config_lib.ConfigError]
  for module, name in _USER_ERROR_CLASSES:
    if module in sys.modules and hasattr(sys.modules[module], name):
      errors.append(getattr(sys.modules[module], name))
  return tuple(errors)


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
    node = reference
    parts = key.split('.')
    for depth, part in enumerate(parts):
      if not hasattr(node, 'keys') or part not in node:
        options = list(node.keys()) if hasattr(node, 'keys') else []
        prefix = '.'.join(parts[:depth + 1])
        raise config_lib.ConfigError(
            f"unknown config key '{prefix}'{config_lib._closest(part, options)}")
      node = node[part]


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


def _parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags_parser: one line and exit 2 instead of 'FATAL Flags parsing error'."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f'error: {flag_error_message(e)}', file=sys.stderr)
    sys.exit(2)


def _one_line_records(record) -> bool:
  """Without --verbose, logged errors stay one line (e.g. Orbax's failed background save)."""
  record.exc_info = record.exc_text = record.stack_info = None
  return True


def define_run_flags(default_config: str):
  """The flags train.py and finetune.py share: --config (+ overrides), --workdir, --verbose."""
  from absl import flags
  from ml_collections import config_flags

  config = config_flags.DEFINE_config_file('config', default_config,
                                           'Config file (configs/*.py).')
  workdir = flags.DEFINE_string('workdir', '', 'Run directory (default: runs/<config name>).')
  flags.DEFINE_bool('verbose', False, 'Show tracebacks for user errors.')
  return config, workdir


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
  """absl.app.run(main) with one-line errors for user mistakes."""
  from absl import app

  argv = list(sys.argv if argv is None else argv)
  verbose = '--verbose' in argv or '--verbose=true' in argv
  precheck(argv)

  def guarded(args):
    if not verbose:
      # Orbax and JAX log every save at INFO; a person wants the progress lines.
      from absl import logging
      logging.set_verbosity(logging.WARNING)
      logging.get_absl_handler().addFilter(_one_line_records)
    try:
      main(args)
    except user_error_types() as e:
      if verbose:
        raise
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  try:
    app.run(guarded, argv=argv, flags_parser=_parse_flags)
  except SystemExit:
    raise
  except Exception as e:  # Errors raised by flag parsing (bad override value types).
    if verbose:
      raise
    print(f'error: {type(e).__name__}: {e}', file=sys.stderr)
    sys.exit(2)
