"""A job stops as one: stop requests (SIGTERM, Ctrl-C) and failures of any process.

`JobGuard` is installed once per process by main.py:

* SIGTERM (what SLURM and `kill` send) or a first Ctrl-C (SIGINT) *requests a stop*:
  the training loop polls `should_stop()` between steps, saves a checkpoint and
  returns; a second Ctrl-C interrupts at once. Signals are noticed by a watchdog
  thread through `signal.set_wakeup_fd`, so they count even while the main thread
  is blocked inside a collective or a long XLA call: if the process has not
  finished `grace_s` seconds after the request, the watchdog exits it (status 143).
* In a multi-process job the request is published in the JAX coordination
  service's key-value store, so every process stops at the same step
  (`should_stop()` agrees across processes through a small all-gather).
* `fail(error)`: a process that raises publishes the cause and exits at once
  (without waiting at JAX's shutdown barrier, where it would hang for minutes).
  Every other process's watchdog sees the cause within a second, logs it (so
  process 0's log names it) and exits too. A process that dies without a word
  (killed, out of memory) is detected by the coordination service's heartbeat
  (runtime.HEARTBEAT_TIMEOUT_S).
"""

import os
import select
import signal
import sys
import threading
import time

from absl import logging

STOP_KEY = 'cimd_jax/stop'
FAILURE_KEY = 'cimd_jax/failure'
EXIT_STOPPED = 143   # 128 + SIGTERM: stopped before the work was complete


def _client():
  """The JAX coordination-service client of a multi-process job, else None."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return distributed.global_state.client
  except Exception:  # pylint: disable=broad-except
    return None


class JobGuard:
  """See the module docstring. `install()` must run on the main thread."""

  def __init__(self, grace_s: float = 120.0, poll_s: float = 0.5):
    self.grace_s, self.poll_s = grace_s, poll_s
    self._stop = threading.Event()
    self._stop_time: float | None = None
    self._read_fd: int | None = None
    self._sigint_count = 0
    self._published = False

  # ------------------------------------------------------------------ set-up
  def install(self) -> 'JobGuard':
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    os.set_blocking(read_fd, False)
    self._read_fd = read_fd
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, self._on_signal)
    signal.signal(signal.SIGINT, self._on_signal)
    threading.Thread(target=self._watch, name='cimd_jax-job-guard', daemon=True).start()
    return self

  def _on_signal(self, signum, frame):  # main thread, Python level
    del frame
    if signum == signal.SIGINT:
      self._sigint_count += 1
      if self._sigint_count > 1:
        raise KeyboardInterrupt
    self.request_stop(signal.Signals(signum).name)

  # ------------------------------------------------------------------ stop
  def request_stop(self, why: str) -> None:
    if not self._stop.is_set():
      logging.warning('%s received: finishing the current step, saving a checkpoint and '
                      'stopping (send it again, or wait %.0f s, to stop at once)', why,
                      self.grace_s)
      self._stop_time = time.monotonic()
      self._stop.set()
    self._publish(STOP_KEY, why)

  @property
  def stop_requested(self) -> bool:
    return self._stop.is_set()

  def should_stop(self) -> bool:
    """Whether to stop now; the same answer on every process of the job."""
    import jax  # pylint: disable=g-import-not-at-top
    local = self._stop.is_set()
    if jax.process_count() == 1:
      return local
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray([local], np.int32))
    if np.any(flags) and not local:
      self._stop_time = time.monotonic()
      self._stop.set()
    return bool(np.any(flags))

  # ------------------------------------------------------------------ failure
  def fail(self, message: str, code: int) -> None:
    """Ends this process with `code` after telling the other processes why."""
    client = _client()
    if client is None:
      sys.exit(code)
    self._publish(FAILURE_KEY, message)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access

  def _publish(self, key: str, value: str) -> None:
    client = _client()
    if client is None:
      return
    try:
      import jax  # pylint: disable=g-import-not-at-top
      client.key_value_set(f'{key}/{jax.process_index()}', value)
    except Exception:  # pylint: disable=broad-except
      pass

  def _peer(self, key: str) -> str | None:
    client = _client()
    if client is None:
      return None
    try:
      entries = client.key_value_dir_get(key)
    except Exception:  # pylint: disable=broad-except
      return None
    if not entries:
      return None
    name, value = entries[0]
    return f'process {name.rsplit("/", 1)[-1]}: {value}'

  # ------------------------------------------------------------------ watchdog
  def _watch(self) -> None:
    while True:
      ready, _, _ = select.select([self._read_fd], [], [], self.poll_s)
      if ready:
        try:
          data = os.read(self._read_fd, 64)
        except BlockingIOError:
          data = b''
        for signum in data:
          if signum == signal.SIGTERM:
            self._stop_time = self._stop_time or time.monotonic()
            self._stop.set()
            self._publish(STOP_KEY, 'SIGTERM')
      failure = self._peer(FAILURE_KEY)
      if failure is not None:
        logging.error('Stopping: another process of the job failed (%s)', failure)
        sys.stderr.write(f'cimd_jax: error: another process of the job failed: {failure}\n')
        sys.stderr.flush()
        os._exit(1)  # pylint: disable=protected-access
      if not self._stop.is_set() and self._peer(STOP_KEY) is not None:
        self._stop_time = time.monotonic()
        self._stop.set()
      if (self._stop_time is not None
          and time.monotonic() - self._stop_time > self.grace_s):
        sys.stderr.write(f'cimd_jax: stop requested {self.grace_s:.0f} s ago and the job '
                         'has not finished; exiting now\n')
        sys.stderr.flush()
        os._exit(EXIT_STOPPED)  # pylint: disable=protected-access
