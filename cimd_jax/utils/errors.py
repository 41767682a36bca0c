"""Failures a user can act on.

Every error the user can fix (bad data, bad config, no checkpoint, a workdir in use,
a checkpoint that does not fit, a diverged model) is a `UserError`: `main.py`
prints its message as ONE line and exits with status 2; the traceback goes to the
workdir's log file (or to the console with `--verbose_errors`). Anything else is a
bug and keeps its traceback. Each subclass also derives from the built-in exception
that callers may already catch (ValueError, FileNotFoundError, ...).
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A failure with a one-line message naming the file, key or value at fault."""


class ConfigError(UserError, ValueError):
  """A config key is unknown, out of range, or contradicts the checkpoint."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """No (complete) checkpoint where one is needed."""


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint's parameters or stored configuration do not fit the request."""


class WorkdirLockedError(UserError, RuntimeError):
  """Another live process writes to the same workdir or output folder."""


class DivergenceError(UserError, FloatingPointError):
  """Training produced non-finite values, or a model's outputs are non-finite."""


class InputError(UserError, ValueError):
  """An input image or folder for sampling cannot be used."""


def one_line(error: BaseException) -> str:
  """The error's message on one line (newlines folded), prefixed by its class name."""
  text = ' '.join(str(error).split())
  return f'{type(error).__name__}: {text}' if text else type(error).__name__
