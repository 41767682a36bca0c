"""A job stops as one: stop requests (SIGTERM, Ctrl-C) and failures of any process.

`JobGuard` is installed once per process by main.py:

* SIGTERM (what SLURM and `kill` send) or a first Ctrl-C (SIGINT) *requests a stop*:
  the training loop polls `should_stop()` between steps, saves a checkpoint and
  returns; a second Ctrl-C interrupts at once, and so does a second SIGTERM sent at
  least `repeat_s` (2 s) after the first (status 143; the watchdog sees it, so it
  works while the main thread is inside XLA; one sent sooner is taken for the same
  request delivered twice, as a scheduler signalling the process and its group
  does). Signals are noticed by a watchdog thread through `signal.set_wakeup_fd`, so
  they count even while the main thread is blocked inside a collective or a long
  XLA call: if the process has not finished `grace_s` seconds after the request,
  the watchdog exits it (status 143).
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

  def __init__(self, grace_s: float = 120.0, poll_s: float = 0.5, repeat_s: float = 2.0):
    self.grace_s, self.poll_s, self.repeat_s = grace_s, poll_s, repeat_s
    self._stop = threading.Event()
    self._stop_time: float | None = None
    self._read_fd: int | None = None
    self._sigint_count = 0
    self._first_sigterm: float | None = None  # when the watchdog saw the first SIGTERM
    self._armed = False      # watch the other processes (after jax.distributed is up)
    self._disarmed = False
    self._lost_contact = 0

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

  def should_stop(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process of the job
    (process 0 decides, from every stop request published so far, and shares its
    decision through the coordination service)."""
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1 or not self._armed:
      return self._stop.is_set()
    from cimd_jax.utils import runtime  # pylint: disable=g-import-not-at-top
    local = None
    if jax.process_index() == 0:
      try:
        requested = self._stop.is_set() or self._peer(STOP_KEY) is not None
      except ConnectionError:
        requested = self._stop.is_set()
      local = '1' if requested else '0'
    decision = runtime.share_from_chief(f'stop/{step}', local) == '1'
    if jax.process_index() == 0:   # the others are past step - 2 (the steps' collectives)
      runtime.forget_shared(f'stop/{step - 2}')
    if decision and not self._stop.is_set():
      self._stop_time = time.monotonic()
      self._stop.set()
    return decision

  # ------------------------------------------------------------------ endings
  def arm(self) -> None:
    """jax.distributed is initialised: start watching the other processes (asking the
    coordination service before the client has connected aborts the process), and
    take SIGTERM back (the coordination service installs its own preemption
    handler for it)."""
    signal.signal(signal.SIGTERM, self._on_signal)
    self._armed = True

  def disarm(self) -> None:
    """The work is over: stop watching the other processes (they shut down too)."""
    self._disarmed = True

  def fail(self, message: str, code: int) -> None:
    """Ends this process with `code` after telling the other processes why (in a
    multi-process job: at once, without JAX's shutdown barrier, where a failed
    process would wait for the others for minutes)."""
    self._disarmed = True
    client = _client() if self._armed else None
    if client is None:
      sys.exit(code)
    self._publish(FAILURE_KEY, message)
    # Process 0 hosts the coordination service: give the others' watchdogs (polling
    # every poll_s) time to read the cause before it goes away with this process.
    time.sleep(4 * self.poll_s)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access

  def _publish(self, key: str, value: str) -> None:
    client = _client() if self._armed else None
    if client is None:
      return
    try:
      import jax  # pylint: disable=g-import-not-at-top
      client.key_value_set(f'{key}/{jax.process_index()}', value)
    except Exception:  # pylint: disable=broad-except
      pass

  def _peer(self, key: str) -> str | None:
    """What another process published under `key` ('process i: message'), or None.
    Raises ConnectionError when the coordination service cannot be reached."""
    client = _client()
    if client is None:
      return None
    try:
      entries = client.key_value_dir_get(key)
    except Exception as e:  # pylint: disable=broad-except
      raise ConnectionError(str(e)) from e
    if not entries:
      return None
    name, value = entries[0]
    return f'process {name.rsplit("/", 1)[-1]}: {value}'

  # ------------------------------------------------------------------ watchdog
  def _watch_peers(self) -> None:
    """Exits when another process published a failure or the coordination service
    (process 0) is gone; takes over another process's stop request."""
    try:
      failure = self._peer(FAILURE_KEY)
      stop = None if self._stop.is_set() else self._peer(STOP_KEY)
      self._lost_contact = 0
    except ConnectionError as e:
      self._lost_contact += 1
      if self._lost_contact * self.poll_s < 10 or self._disarmed:
        return
      failure = f'the coordination service (process 0) cannot be reached ({e})'
      stop = None
    if failure is not None and not self._disarmed:
      logging.error('Stopping: another process of the job failed (%s)', failure)
      sys.stderr.write(f'cimd_jax: error: another process of the job failed: {failure}\n')
      sys.stderr.flush()
      os._exit(1)  # pylint: disable=protected-access
    if stop is not None:
      self._stop_time = time.monotonic()
      self._stop.set()

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
            now = time.monotonic()
            if self._first_sigterm is None:
              self._first_sigterm = now
            elif now - self._first_sigterm >= self.repeat_s:
              sys.stderr.write('cimd_jax: SIGTERM received again; exiting now\n')
              sys.stderr.flush()
              os._exit(EXIT_STOPPED)  # pylint: disable=protected-access
            self._stop_time = self._stop_time or time.monotonic()
            self._stop.set()
            self._publish(STOP_KEY, 'SIGTERM')
      if self._armed and not self._disarmed and _client() is not None:
        self._watch_peers()
      if (self._stop_time is not None
          and time.monotonic() - self._stop_time > self.grace_s):
        sys.stderr.write(f'cimd_jax: stop requested {self.grace_s:.0f} s ago and the job '
                         'has not finished; exiting now\n')
        sys.stderr.flush()
        os._exit(EXIT_STOPPED)  # pylint: disable=protected-access
