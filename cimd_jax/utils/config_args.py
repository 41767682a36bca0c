"""Typed argument dataclasses from config groups, and the checks they run.

Every config group (`data`, `model`, ...) maps 1:1 onto a frozen dataclass whose
fields are the group's keys; `build_args(Cls, 'group', values)` builds it, naming
an unknown key with the closest known one, and the dataclass's `__post_init__`
checks each value with the helpers below. Every failure is a one-line
`ConfigError` naming `group.key`, the value and what is allowed.
"""

import dataclasses
import difflib
from typing import Any, Iterable, Mapping, TypeVar

from cimd_jax.utils.errors import ConfigError

T = TypeVar('T')


def build_args(cls: type[T], group: str, values: Mapping[str, Any]) -> T:
  """`cls(**values)` for the config group `group`, with unknown keys named.

  Keys missing from `values` take the dataclass default. Tuple-typed fields accept
  lists (JSON round trips give lists).
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for key in values:
    if key not in fields:
      close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
      hint = (f'; did you mean {group}.{close[0]}?' if close else
              f'; the keys of {group} are: {", ".join(sorted(fields))}')
      raise ConfigError(f'unknown config key {group}.{key}{hint}')
  kwargs = {}
  for key, value in values.items():
    if isinstance(value, list):
      value = tuple(value)
    kwargs[key] = value
  return cls(**kwargs)


def as_dict(args: Any) -> dict[str, Any]:
  """The dataclass as a JSON-ready dict (tuples become lists)."""
  out = {}
  for f in dataclasses.fields(args):
    value = getattr(args, f.name)
    out[f.name] = list(value) if isinstance(value, tuple) else value
  return out


def fail(key: str, value: Any, expected: str) -> None:
  """Raises ConfigError('key=value: expected ...')."""
  raise ConfigError(f'{key}={value!r}: expected {expected}')


def check_int(key: str, value: Any, low: int | None = None, high: int | None = None,
              allow: Iterable[int] = ()) -> None:
  """`value` is an int (not a bool) in [low, high], or one of `allow`."""
  allowed = tuple(allow)
  if isinstance(value, bool) or not isinstance(value, int):
    fail(key, value, _range_text('an integer', low, high, allowed))
  if value in allowed:
    return
  if (low is not None and value < low) or (high is not None and value > high):
    fail(key, value, _range_text('an integer', low, high, allowed))


def check_float(key: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
  """`value` is a finite number in the interval (open or closed at each end)."""
  import math  # pylint: disable=g-import-not-at-top
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    lo = '(-inf' if low is None else ('(' if low_open else '[') + f'{low:g}'
    hi = 'inf)' if high is None else f'{high:g}' + (')' if high_open else ']')
    fail(key, value, f'a number in {lo}, {hi}')


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
  """`value` is one of `choices`."""
  choices = tuple(choices)
  if value not in choices:
    fail(key, value, 'one of ' + ', '.join(repr(c) for c in choices))


def check_bool(key: str, value: Any) -> None:
  if not isinstance(value, bool):
    fail(key, value, 'True or False')


def check_int_tuple(key: str, value: Any, low: int = 1, nonempty: bool = True) -> None:
  """`value` is a tuple of ints >= low (non-empty unless told otherwise)."""
  if (not isinstance(value, tuple) or (nonempty and not value)
      or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in value)):
    fail(key, value, f'a {"non-empty " if nonempty else ""}tuple of integers >= {low}')


def _range_text(kind: str, low: Any, high: Any, allowed: tuple[Any, ...]) -> str:
  if low is not None and high is not None:
    text = f'{kind} in [{low}, {high}]'
  elif low is not None:
    text = f'{kind} >= {low}'
  elif high is not None:
    text = f'{kind} <= {high}'
  else:
    text = kind
  if allowed:
    text += ' or ' + ', '.join(str(a) for a in allowed)
  return text


def flat(groups: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """{'group.key': value} from {group: {key: value}} (sequences joined by commas),
  for TensorBoard hparams."""
  out = {}
  for group, values in groups.items():
    for key, value in values.items():
      out[f'{group}.{key}'] = (','.join(str(v) for v in value)
                               if isinstance(value, (list, tuple)) else value)
  return out
