"""Fast checks of the pieces behind safe outputs: folder locks, staged output folders,
case folder names (issue 13 items 3-5)."""

import json
import os
import socket

import pytest

from cimd_jax.evaluation import reports
from cimd_jax.utils import atomic
from cimd_jax.utils import locking
from cimd_jax.utils.errors import WorkdirLockedError


def test_a_held_lock_refuses_a_second_holder_naming_host_and_pid(tmp_path):
  path = tmp_path / '.lock'
  with locking.FolderLock(str(path), 'workdir X'):
    holder = json.loads(path.read_text())
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    with pytest.raises(WorkdirLockedError, match=rf'workdir X is in use by PID {os.getpid()} '
                                                 rf'on host {socket.gethostname()}'):
      locking.FolderLock(str(path), 'workdir X').acquire()
  # Released: the next holder gets it, and the file no longer names anyone.
  assert path.read_text() == ''
  with locking.FolderLock(str(path), 'workdir X'):
    pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
  path = tmp_path / '.lock'
  # A holder that no longer exists (PID 2**22 + 7 is above Linux's default pid_max).
  path.write_text(json.dumps({'host': socket.gethostname(), 'pid': 2**22 + 7,
                              'started': 'earlier', 'command': 'train'}))
  with caplog.at_level('INFO'):
    with locking.FolderLock(str(path), 'workdir Y'):
      assert json.loads(path.read_text())['pid'] == os.getpid()
  assert any('Taking over the lock on workdir Y' in r.getMessage() for r in caplog.records)


def test_staged_folder_replaces_the_old_output_only_on_commit(tmp_path):
  final = tmp_path / 'out'
  final.mkdir()
  (final / 'sample_07.png').write_text('old')
  (final / 'metrics.json').write_text('old')
  killed = atomic.StagedFolder(str(final))       # a run that never commits
  (tmp_path / os.path.basename(killed.path) / 'sample_00.png').write_text('new')
  assert sorted(os.listdir(final)) == ['metrics.json', 'sample_07.png']
  staged = atomic.StagedFolder(str(final))       # the next run removes the leftover
  assert os.listdir(staged.path) == []
  with open(os.path.join(staged.path, 'sample_00.png'), 'w') as f:
    f.write('new')
  staged.commit()
  staged.discard()                              # no-op after commit
  assert os.listdir(final) == ['sample_00.png']
  assert [n for n in os.listdir(tmp_path) if n != 'out'] == []


@pytest.mark.parametrize('ids', [
    ['a b', 'a_b', 'a?b'],
    ['x', 'x', 'x'],
    ['../up', 'ok', '.hidden', ''],
    ['case/1', 'case_1', 'case 1'],
])
def test_case_folder_names_are_distinct_and_safe(ids):
  names = reports.case_folder_names(ids)
  assert len(names) == len(ids) and len(set(names)) == len(ids)
  for cid, name in zip(ids, names):
    assert name and not name.startswith('.') and '/' not in name and ' ' not in name
    assert set(name) <= set('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.')
  # Safe ids keep their own name; the first of repeated ids too.
  if ids == ['a b', 'a_b', 'a?b']:
    assert names[1] == 'a_b'
  if ids == ['x', 'x', 'x']:
    assert names == ['x', 'x-2', 'x-3']
