"""One writer per folder: an exclusive lock that names its holder.

`FolderLock(path)` takes an exclusive `fcntl.flock` on a lock file and writes the
holder's host, PID, start time and command into it. A second process asking for the
same lock is refused at once with `WorkdirLockedError` naming that holder. The
kernel releases a flock when its process dies, however it dies (SIGKILL included),
so a lock left by a killed run is simply taken over by the next one; the file's old
contents are then reported in the log as the previous holder. (On file systems
without working flock, e.g. some NFS mounts, a holder on this host whose PID no
longer exists is also taken over.)
"""

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any

from absl import logging

from cimd_jax.utils.errors import WorkdirLockedError


def _holder_info() -> dict[str, Any]:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': time.strftime('%Y-%m-%d %H:%M:%S'),
          'command': ' '.join(sys.argv)[:500]}


def _read_holder(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except OSError as e:
    return e.errno == errno.EPERM
  return True


class FolderLock:
  """An exclusive, self-describing lock on `lock_path` (a file); use as a context
  manager or call acquire()/release(). `what` names the protected thing in errors."""

  def __init__(self, lock_path: str, what: str):
    self.lock_path = os.path.abspath(lock_path)
    self.what = what
    self._fd: int | None = None

  def acquire(self) -> 'FolderLock':
    os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
    fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      holder = _read_holder(self.lock_path)
      raise WorkdirLockedError(
          f'{self.what} is in use by {_describe(holder)} (lock file {self.lock_path}); '
          'wait for that run to finish, stop it, or use another --workdir / output folder')
    previous = _read_holder(self.lock_path)
    if previous and previous.get('pid') != os.getpid():
      same_host = previous.get('host') == socket.gethostname()
      if same_host and _pid_alive(int(previous.get('pid', -1))) and _is_other_process(
          previous):
        # flock granted but the recorded holder still runs here: flock does not
        # work on this file system; refuse rather than share the folder.
        os.close(fd)
        raise WorkdirLockedError(
            f'{self.what} is in use by {_describe(previous)} (lock file {self.lock_path}); '
            'wait for that run to finish, stop it, or use another --workdir / output folder')
      logging.info('Taking over the lock on %s left by %s', self.what, _describe(previous))
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_holder_info()).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> 'FolderLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _is_other_process(holder: dict[str, Any]) -> bool:
  """Whether the recorded PID still runs the recorded command (PIDs get reused)."""
  pid = int(holder.get('pid', -1))
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      cmdline = f.read().replace(b'\0', b' ').decode(errors='replace').strip()
  except OSError:
    return True  # cannot tell: assume it is the holder
  return cmdline[:200] == str(holder.get('command', ''))[:200]


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return 'another process'
  return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
          f"(started {holder.get('started', '?')})")
