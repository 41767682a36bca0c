"""Seeded group-level splits (patients, cases) and explicit split files.

`held_out_split` puts whole groups (a patient's series_uid, a case folder) into one
split, never single slices:

  n_test = max(1, round(test_fraction * n))             (0 when test_fraction = 0)
  n_val  = max(1, round(validation_fraction * (n - n_test)))   (0 when fraction = 0)

The groups are put in `seeded_order` (salt 'split'); the first n_test go to 'test',
the next n_val to 'validation', the rest to 'train'. Every seeded choice of the
readers uses `seeded_order`: an order by SHA-256 of the salt, the seed and the id,
so the same ids and seed give the same split on every machine and with every NumPy
(NumPy keeps a Generator's bit stream but not its `permutation` or `choice`
algorithms fixed across releases), and anyone can recompute it (docs/data.md).
"""

import hashlib
import json
import os
import re
from typing import Iterable, Sequence

from cimd_jax.data.args import TEST, TRAIN, VALIDATION
from cimd_jax.data.records import DataError

SPLIT_NAMES = (TRAIN, VALIDATION, TEST)
SPLIT_RULE = 'sha256-order-v1'   # in the records' cache key wherever a split is seeded


def natural_key(name: str) -> tuple:
  """Sort key that orders digit runs numerically: '2' < '10', 'a2' < 'a10'; names
  equal as numbers ('p01', 'p1') by the name itself, so that every order is total."""
  parts = tuple((0, int(part), '') if part.isdecimal() else (1, 0, part)   # '²': text
                for part in re.split(r'(\d+)', name) if part)
  return parts, name


def seeded_digest(salt: str, seed: int, item: str) -> str:
  """The hex SHA-256 of f'{salt}:{seed}:{item}' (UTF-8): the one seeded hash of every
  seeded choice (docs/data.md, "Seeded choices")."""
  return hashlib.sha256(f'{salt}:{seed}:{item}'.encode()).hexdigest()


def seeded_order(ids: Sequence[str], seed: int, salt: str) -> list[int]:
  """Indices into `ids` sorted by seeded_digest(salt, seed, id), ties (equal ids) by
  index: a seeded permutation that depends only on the ids, the seed and the salt,
  not on NumPy or the machine."""
  digests = [seeded_digest(salt, seed, i) for i in ids]
  return sorted(range(len(ids)), key=lambda k: (digests[k], k))


def held_out_split(ids: Iterable[str], validation_fraction: float, test_fraction: float,
                   seed: int, what: str) -> dict[str, list[str]]:
  """split -> ids (natural order) of a seeded group-level split (module docstring).

  Args:
    ids: the groups (duplicates are ignored).
    what: the kind of group, for messages ('patient (series_uid)', 'case').

  Returns:
    {'train': [...]} plus 'validation' / 'test' when their fraction is > 0.
  """
  groups = sorted(set(ids), key=natural_key)
  n = len(groups)
  n_test = max(1, int(round(test_fraction * n))) if test_fraction > 0 else 0
  n_val = (max(1, int(round(validation_fraction * (n - n_test))))
           if validation_fraction > 0 else 0)
  if n_test + n_val >= n:
    raise DataError(f'data.test_fraction={test_fraction} and data.validation_fraction='
                    f'{validation_fraction} of {n} {what}(s) leave no training {what}; '
                    'expected more data or smaller fractions')
  order = seeded_order(groups, seed, 'split')
  test = set(order[:n_test])
  val = set(order[n_test:n_test + n_val])
  out = {TRAIN: [g for i, g in enumerate(groups) if i not in test and i not in val]}
  if n_val:
    out[VALIDATION] = [g for i, g in enumerate(groups) if i in val]
  if n_test:
    out[TEST] = [g for i, g in enumerate(groups) if i in test]
  return out


def read_split_file(path: str, known: Iterable[str], what: str) -> dict[str, list[str]]:
  """split -> ids (natural order) from a JSON split file, checked against the data.

  The file is a JSON object whose keys are among 'train', 'validation', 'test'
  ('train' required) and whose values are lists of ids (strings). Every known id
  must be in exactly one list, and every listed id must be known.
  """
  known = set(known)
  where = f'data.split_file {path}'
  try:
    with open(os.path.expanduser(path)) as f:
      table = json.load(f)
  except FileNotFoundError:
    raise DataError(f'{where}: does not exist; expected a JSON file') from None
  except (OSError, ValueError) as e:
    raise DataError(f'{where}: cannot read JSON ({type(e).__name__}: {e}); expected '
                    '{"train": [...], "validation": [...], "test": [...]}') from None
  if not isinstance(table, dict) or TRAIN not in table:
    raise DataError(f'{where}: expected a JSON object with key "train" (and optionally '
                    '"validation", "test")')
  extra = sorted(set(table) - set(SPLIT_NAMES))
  if extra:
    raise DataError(f'{where}: unknown key(s) {extra}; expected only "train", '
                    '"validation", "test"')
  owner: dict[str, str] = {}
  for split in SPLIT_NAMES:
    items = table.get(split, [])
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
      raise DataError(f'{where}, key "{split}": expected a list of {what} strings')
    for item in items:
      if item in owner:
        raise DataError(f'{where}: {what} {item!r} is listed under both "{owner[item]}" '
                        f'and "{split}"; expected each in one split')
      owner[item] = split
  unknown = sorted(set(owner) - known, key=natural_key)
  if unknown:
    raise DataError(f'{where}, key "{owner[unknown[0]]}": {what} {unknown[0]!r} (and '
                    f'{len(unknown) - 1} more) is not in the data; expected only '
                    f'{what}s of data.source_dir')
  missing = sorted(known - set(owner), key=natural_key)
  if missing:
    raise DataError(f'{where}: {what} {missing[0]!r} (and {len(missing) - 1} more) of '
                    'the data is in no split; expected every one listed')
  out = {split: sorted((i for i, s in owner.items() if s == split), key=natural_key)
         for split in SPLIT_NAMES}
  if not out[TRAIN]:
    raise DataError(f'{where}, key "train": empty; expected at least one {what}')
  return {split: ids for split, ids in out.items() if ids}
