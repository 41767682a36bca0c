"""A training process killed with SIGKILL (even mid-save) resumes from its last
complete checkpoint, taking over the workdir lock the killed process left."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _train_cmd(workdir, tfds_dir, num_steps):
  return [sys.executable, '-m', 'cimd_jax.main', '--mode=train',
          f'--config={ROOT}/configs/test.py', f'--workdir={workdir}',
          f'--config.data.tfds_dir={tfds_dir}',
          f'--config.training.num_steps={num_steps}',
          '--config.training.checkpoint_every=1',
          '--config.training.keep_checkpoints=2']


def _complete_steps(workdir):
  ckpt = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt):
    return []
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def test_sigkill_then_resume(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=ROOT)
  workdir, tfds_dir = str(tmp_path / 'run'), str(tmp_path / 'tfds')
  num_steps = 400
  kills = 0
  for delay in (0.0, 0.37):
    proc = subprocess.Popen(_train_cmd(workdir, tfds_dir, num_steps), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      before = _complete_steps(workdir)
      deadline = time.time() + 240
      # Wait until this process has written at least two new checkpoints, then kill
      # it at an arbitrary moment (saves happen every step, so often mid-save).
      while time.time() < deadline:
        steps = _complete_steps(workdir)
        if steps and (not before or steps[-1] >= before[-1] + 2):
          break
        if proc.poll() is not None:
          pytest.fail(f'training exited early with code {proc.returncode}')
        time.sleep(0.05)
      else:
        pytest.fail('no checkpoint appeared within 240 s')
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=30)
      kills += 1
      killed_pid = proc.pid
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert kills == 2
  killed_at = _complete_steps(workdir)[-1]
  assert killed_at < num_steps

  finish = subprocess.run(_train_cmd(workdir, tfds_dir, killed_at + 3), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert finish.returncode == 0, finish.stderr[-3000:]
  resumed = re.search(r'Resuming from checkpoint step (\d+)', finish.stderr)
  assert resumed, finish.stderr[-3000:]
  assert int(resumed.group(1)) >= killed_at
  # The kernel released the killed process's flock; its holder record is still there.
  assert 'Taking over the lock' in finish.stderr, finish.stderr[-3000:]
  assert f'PID {killed_pid}' in finish.stderr, finish.stderr[-3000:]
  assert _complete_steps(workdir)[-1] == killed_at + 3
