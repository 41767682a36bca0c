"""Output folders that appear complete or not at all.

`StagedFolder(final_dir)` gives a fresh staging folder next to `final_dir`
(`.<name>.staging-<pid>`); the caller writes everything there and calls `commit()`,
which moves any previous `final_dir` aside, renames the staging folder into place and
deletes the previous one. A run killed before `commit()` leaves the previous results
untouched (and its staging folder, removed by the next run on the same output);
a re-run never mixes files of two runs (no stale `sample_15.png` beside 8 new masks,
no old metrics.json beside new masks). `check_replaceable` refuses, before any
work, a `final_dir` that is not an earlier output (the workdir, a parent folder, a
folder of other files), which a commit would delete. Use StagedFolder under a
`locking.FolderLock` on the same output so that no other live process owns a
staging folder (`staged_output` does both). `write_text` does the same for one file.
"""

import contextlib
import glob
import json
import os
import shutil
from typing import Iterator

from absl import logging

from cimd_jax.utils import locking
from cimd_jax.utils.errors import ConfigError


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path + '.tmp.<pid>'`, flushes it to disk and renames it to
  `path`: the file is complete or absent, never half-written (also after a power
  loss), and two processes writing the same path do not share a temporary file."""
  tmp = f'{path}.tmp.{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):   # no stray temporary file after a failed write
      os.remove(tmp)
    raise


def staging_prefix(final_dir: str) -> str:
  parent, name = os.path.split(os.path.abspath(final_dir))
  return os.path.join(parent, f'.{name}.staging-')


def lock_path(final_dir: str) -> str:
  """The lock file that guards `final_dir` and its staging folders."""
  parent, name = os.path.split(os.path.abspath(final_dir))
  return os.path.join(parent, f'.{name}.lock')


def replace_refusal(final_dir: str, marker: str, protected: tuple[str, ...] = ()
                    ) -> str | None:
  """Why a commit must not replace `final_dir` (None when it may): it is or contains
  one of the `protected` paths (e.g. the workdir with its checkpoints), it is a
  file, or it is a non-empty folder without `marker` (not an earlier output)."""
  final_dir = os.path.realpath(final_dir)
  for path in protected:
    path = os.path.realpath(path)
    if os.path.commonpath([final_dir, path]) == final_dir:
      return f'is or contains {path}, which a new output would delete'
  if not os.path.lexists(final_dir):
    return None
  if not os.path.isdir(final_dir):
    return 'is a file'
  if os.listdir(final_dir) and not os.path.exists(os.path.join(final_dir, marker)):
    return (f'exists and holds files but no {marker}, so it is not an earlier output '
            'and a new output would delete them')
  return None


def check_replaceable(final_dir: str, marker: str, key: str, protected: tuple[str, ...] = (),
                      source: str | None = None) -> None:
  """Raises ConfigError naming `key` when `replace_refusal` refuses `final_dir`; with
  `source` (a default output folder), also when the earlier output there, by its
  `marker` JSON's 'source', came from another input that happens to share its name."""
  reason = replace_refusal(final_dir, marker, protected)
  if reason:
    raise ConfigError(f'{key} {os.path.abspath(final_dir)}: {reason}; expected a new '
                      f'folder or an earlier output (one with {marker})')
  old = _marker_source(os.path.join(final_dir, marker)) if source is not None else None
  if old is not None and old != source:
    raise ConfigError(f'{key} (default) {os.path.abspath(final_dir)} holds the output of '
                      f'{old}, and this run reads {source}; set --config.{key} to another '
                      'folder')


def _marker_source(path: str) -> str | None:
  """The 'source' recorded in a marker JSON file, None when there is none."""
  try:
    with open(path) as f:
      return json.load(f).get('source')
  except (OSError, ValueError, AttributeError):
    return None


class StagedFolder:
  """A staging folder for `final_dir` (see the module docstring)."""

  def __init__(self, final_dir: str):
    self.final_dir = os.path.abspath(final_dir)
    os.makedirs(os.path.dirname(self.final_dir), exist_ok=True)
    for stale in glob.glob(glob.escape(staging_prefix(final_dir)) + '*'):
      logging.info('Removing the unfinished output of an interrupted run: %s', stale)
      shutil.rmtree(stale, ignore_errors=True)
    self.path = staging_prefix(final_dir) + str(os.getpid())
    os.makedirs(self.path)
    self.committed = False

  def commit(self) -> str:
    """Puts the staged folder in place of `final_dir`; returns `final_dir`."""
    old = None
    if os.path.lexists(self.final_dir):
      old = staging_prefix(self.final_dir) + f'{os.getpid()}.previous'
      os.rename(self.final_dir, old)
    os.rename(self.path, self.final_dir)
    self.committed = True
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    return self.final_dir

  def discard(self) -> None:
    """Removes the staging folder (nothing of this run reaches `final_dir`)."""
    if not self.committed:
      shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def staged_output(final_dir: str) -> Iterator[StagedFolder]:
  """A StagedFolder for `final_dir` under the lock on that output; whatever the
  caller has not committed when the block ends (by an error too) is removed."""
  with locking.FolderLock(lock_path(final_dir), f'output folder {final_dir}'):
    staged = StagedFolder(final_dir)
    try:
      yield staged
    finally:
      staged.discard()
