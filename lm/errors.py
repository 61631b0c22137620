"""The one base class of every error a user can cause (bad config, data, checkpoint, model file).

The command line prints a `UserError` as one line and exits 2 (lm.cli); anything else is a bug
and keeps its traceback. Each module's own error class derives from it and from the builtin it
has always been (ValueError, RuntimeError), so existing `except ValueError` callers keep working.
"""

from __future__ import annotations


class UserError(Exception):
  """The user's input is wrong; the message names the config key, file, line or parameter path."""
