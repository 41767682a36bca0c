"""Runs that fail, collide or are stopped behave (issue 13; docs/reliability.md).

Each test names the item it checks. Most run the command line (`python -m
cimd_jax.main`) in subprocesses, as a user would, and look at exit status, the one
line on stderr and what is left on disk.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from PIL import Image

from cimd_jax import checkpoint
from cimd_jax.apps import sample_inputs
from cimd_jax.apps import sampling
from cimd_jax.data import pipeline
from cimd_jax.data import provenance
from cimd_jax.evaluation import reports
from cimd_jax.utils import job
from cimd_jax.utils.errors import ConfigError, DivergenceError
from tests import helpers
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

CONFIG = os.path.join(ROOT, 'configs', 'test.py')


def _env(devices: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT
  return env


def _cmd(workdir, tfds_dir, *args) -> list[str]:
  return [sys.executable, '-m', 'cimd_jax.main', f'--config={CONFIG}', f'--workdir={workdir}',
          f'--config.data.tfds_dir={tfds_dir}', *args]


def _run(cmd, timeout=600, devices=1) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True,
                        timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('cimd_jax: error:')]


def _wait_for(predicate, timeout: float, what: str, proc=None) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc is not None and proc.poll() is not None:
      pytest.fail(f'{what}: the process exited early with {proc.returncode}')
    time.sleep(0.1)
  pytest.fail(f'{what}: not within {timeout} s')


def _lock_holder(path) -> int | None:
  try:
    with open(path) as f:
      return json.load(f).get('pid')
  except (OSError, ValueError):
    return None


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp('reliability')
  s = helpers.settings(base / 'tfds', training__num_steps=2, training__checkpoint_every=2)
  helpers.train_mode(s, base / 'run')
  assert provenance.trained_on(str(base / 'run')) == [
      pipeline.records_name(s.data, str(base / 'run'))]      # what the training ran on
  return base / 'run', base / 'tfds'


# ------------------------------------------------------------------ item 3: one writer; SIGTERM, resume
def test_second_trainer_is_refused_and_sigterm_saves_for_the_same_command(tmp_path):
  """A second `train` on a workdir in use is refused at once while the first one goes
  on training; SIGTERM then makes the first save and exit 143, and the same command
  resumes from that checkpoint. (The lock of a SIGKILLed run is taken over:
  test_kill_resume.py.)"""
  workdir, tfds = tmp_path / 'run', tmp_path / 'tfds'
  cmd = _cmd(workdir, tfds, '--config.training.num_steps=100000',
             '--config.training.checkpoint_every=100000', '--config.training.log_every=10')
  first_log = tmp_path / 'first.log'
  with open(first_log, 'w') as log:   # a file, not a pipe: a full pipe would stall it
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=log, text=True)
  try:
    _wait_for(lambda: _lock_holder(workdir / '.lock') == first.pid, 120, 'first lock', first)
    second = _run(cmd, timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    lines = _error_lines(second.stderr)
    assert len(lines) == 1 and 'Traceback' not in second.stderr, second.stderr[-2000:]
    assert f'PID {first.pid}' in lines[0] and socket.gethostname() in lines[0], lines
    assert first.poll() is None                     # the first is not disturbed ...
    logged_before = first_log.read_text().count('steps_per_s=')
    _wait_for(lambda: first_log.read_text().count('steps_per_s=') > logged_before, 300,
              'the first trainer goes on after the refusal', first)   # ... and trains on
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=180)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  err = first_log.read_text()
  assert first.returncode == 143, err[-2000:]
  steps = checkpoint.complete_steps(str(workdir))
  assert len(steps) == 1 and steps[0] >= 10, steps
  resumed = _run(_cmd(workdir, tfds, f'--config.training.num_steps={steps[0] + 2}'))
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'Resuming from checkpoint step {steps[0]}' in resumed.stderr
  assert 'Taking over the lock' not in resumed.stderr   # a clean exit leaves no holder
  assert checkpoint.complete_steps(str(workdir))[-1] == steps[0] + 2


# ------------------------------------------------------------------ item 2: fail as one
def _broken_folder(root, size=16, annotators=3) -> str:
  rng = np.random.default_rng(0)
  for sub in ('training', 'testing'):
    for c in range(2):
      case = os.path.join(root, sub, f'case{c}')
      os.makedirs(case)
      Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
          os.path.join(case, 'image_1.png'))
      for i in range(annotators):
        Image.fromarray((rng.random((size, size)) > 0.7).astype(np.uint8) * 255).save(
            os.path.join(case, f'label{i}_.png'))
  with open(os.path.join(root, 'training', 'case1', 'image_1.png'), 'wb') as f:
    f.write(b'not a png')
  return str(root)


def _two_processes(tmp_path, *args):
  port = portpicker.pick_unused_port()
  logs, procs = [], []
  for i in range(2):
    log = open(tmp_path / f'process_{i}.log', 'w')
    logs.append(log)
    procs.append(subprocess.Popen(
        _cmd(tmp_path / 'run', tmp_path / 'tfds', *args,
             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
             f'--process_id={i}'),
        cwd=ROOT, env=_env(2), stdout=log, stderr=subprocess.STDOUT, text=True))
  return procs, logs


def _finish(procs, logs, timeout):
  start = time.time()
  try:
    for p in procs:
      p.wait(timeout=max(1.0, timeout - (time.time() - start)))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  return time.time() - start


def test_two_process_job_on_a_broken_dataset_exits_in_both(tmp_path):
  root = _broken_folder(tmp_path / 'src')
  procs, logs = _two_processes(tmp_path, '--config.data.name=folder',
                               f'--config.data.source_dir={root}',
                               '--config.training.batch_size=4')
  seconds = _finish(procs, logs, timeout=240)
  out = [open(tmp_path / f'process_{i}.log').read() for i in range(2)]
  for i, p in enumerate(procs):
    assert p.returncode not in (0, None), (i, out[i][-3000:])
  assert seconds < 180, seconds   # startup of both (minutes on a loaded CPU) included
  cause = [l for l in out[0].splitlines() if l.startswith('cimd_jax: error:')]
  assert cause and 'image_1.png' in cause[0] and 'cannot read image' in cause[0], out[0][-3000:]
  assert 'image_1.png' in out[1], out[1][-3000:]   # the other process names the cause too


def test_sigterm_to_one_process_stops_the_job_with_a_checkpoint(tmp_path):
  procs, logs = _two_processes(tmp_path, '--config.training.num_steps=100000',
                               '--config.training.checkpoint_every=100000',
                               '--config.training.batch_size=4',
                               '--config.training.log_every=5')
  try:
    _wait_for(lambda: '[5] ' in open(tmp_path / 'process_0.log').read(), 400,
              'training started', procs[0])
    procs[1].send_signal(signal.SIGTERM)
  finally:
    _finish(procs, logs, timeout=180)
  out = [open(tmp_path / f'process_{i}.log').read() for i in range(2)]
  assert [p.returncode for p in procs] == [143, 143], (out[0][-2000:], out[1][-2000:])
  steps = checkpoint.complete_steps(str(tmp_path / 'run'))
  assert len(steps) == 1 and steps[0] >= 5, steps


# ------------------------------------------------------------------ item 4: names
def _labelled_folder(root, names, size=16, annotators=3):
  rng = np.random.default_rng(1)
  for sub, case_names in (('training', ['t0']), ('testing', names)):
    for name in case_names:
      case = os.path.join(root, sub, name)
      os.makedirs(case)
      Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
          os.path.join(case, 'image_1.png'))
      for i in range(annotators):
        Image.fromarray((rng.random((size, size)) > 0.7).astype(np.uint8) * 255).save(
            os.path.join(case, f'label{i}_.png'))
  return str(root)


_BUSY_PROCESS = """
import sys, time
from cimd_jax.utils import job
job.JobGuard(grace_s=120, poll_s=0.1).install()
print('ready', flush=True)
start = time.time()
while time.time() - start < 60:   # never asks should_stop (as an evaluation does not)
  time.sleep(0.05)
sys.exit(0)
"""


def test_a_second_sigterm_stops_at_once():
  """The first SIGTERM asks for a stop (a process that never polls keeps running until
  the grace period), and so does the same request delivered twice within 2 s; the log
  promises that sending it again stops at once: it did not."""
  proc = subprocess.Popen([sys.executable, '-c', _BUSY_PROCESS], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'ready'
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)               # delivered twice (process + group)
    time.sleep(1.0)
    assert proc.poll() is None                     # still running: one stop request
    time.sleep(2.5)                                # > repeat_s, with room for a slow watchdog
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == job.EXIT_STOPPED
    assert 'SIGTERM received again' in proc.stderr.read()
  finally:
    proc.kill()


def test_colliding_case_names_get_their_own_folders(trained, tmp_path):
  workdir, _ = trained
  names = ['a b', 'a_b', 'a?b']
  root = _labelled_folder(tmp_path / 'src', names)
  s = helpers.settings(tmp_path / 'tfds', data__name='folder', data__source_dir=root,
                       sampling__output_dir=str(tmp_path / 'eval'), sampling__num_samples=2)
  _, result, out = sampling.evaluate_cases(s, str(workdir), set())
  folders = sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
  assert len(folders) == 3 and result['num_images'] == 3
  with open(os.path.join(out, 'per_image.csv')) as f:
    rows = list(csv.DictReader(f))
  assert sorted(r['case_id'] for r in rows) == sorted(names)
  assert sorted(r['folder'] for r in rows) == folders
  with open(os.path.join(out, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['cases'] == {r['case_id']: r['folder'] for r in rows}
  # Unlabelled inputs x.png and x.jpg: two folders, and the log counts two.
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  for ext in ('png', 'jpg'):
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(inputs / f'x.{ext}')
  s = helpers.settings(tmp_path / 'tfds', sampling__input_dir=str(inputs),
                       sampling__output_dir=str(tmp_path / 'samples'), sampling__num_samples=2)
  out = sampling.run_sample(s, str(workdir), set())
  with open(os.path.join(out, 'manifest.json')) as f:
    cases = json.load(f)['cases']
  assert sorted(cases) == ['x.jpg', 'x.png'] and len(set(cases.values())) == 2
  assert sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))) == sorted(
      cases.values())


# ------------------------------------------------------------------ item 5: outputs
def test_killed_evaluate_then_smaller_n_leaves_exactly_n_masks(trained, tmp_path):
  workdir, tfds = trained
  out = tmp_path / 'eval'
  common = (f'--config.sampling.output_dir={out}', '--config.data.synthetic_num_test=24',
            '--config.sampling.images_per_call=1', '--mode=evaluate')
  full = _run(_cmd(workdir, tfds, *common, '--config.sampling.num_samples=8'))
  assert full.returncode == 0, full.stderr[-2000:]
  staging = lambda: [n for n in os.listdir(tmp_path) if n.startswith('.eval.staging-')]
  killed = subprocess.Popen(_cmd(workdir, tfds, *common, '--config.sampling.num_samples=6'),
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  try:
    _wait_for(lambda: staging() and len(os.listdir(tmp_path / staging()[0])) >= 3, 300,
              'evaluation under way', killed)
  finally:
    killed.kill()
    killed.wait()
  # The killed run left the previous complete results untouched.
  with open(out / 'metrics.json') as f:
    assert json.load(f)['num_samples'] == 8
  again = _run(_cmd(workdir, tfds, *common, '--config.sampling.num_samples=4'))
  assert again.returncode == 0, again.stderr[-2000:]
  assert staging() == [] and not any(n.endswith('.previous') for n in os.listdir(tmp_path))
  with open(out / 'metrics.json') as f:
    metrics_json = json.load(f)
  with open(out / 'manifest.json') as f:
    manifest = json.load(f)
  assert metrics_json['num_samples'] == 4 and manifest['complete'] is True
  with open(out / 'per_image.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 24
  for row in rows:
    files = os.listdir(out / row['folder'])
    assert sorted(n for n in files if n.startswith('sample_')) == [
        f'sample_{i:02d}.png' for i in range(4)]
  # metrics.json describes the masks on disk.
  s = helpers.settings(tfds, data__synthetic_num_test=24)
  cases = sample_inputs.dataset_cases(s, str(workdir))
  preds = np.stack([reports.read_case_masks(str(out / r['folder'])) for r in rows])
  from cimd_jax import metrics  # pylint: disable=g-import-not-at-top
  per_image = metrics.evaluate(np.stack([c.experts for c in cases]), preds)
  np.testing.assert_allclose(np.mean(per_image['ci']), metrics_json['metrics']['ci']['mean'],
                             atol=1e-6)


# ------------------------------------------------------------------ item 6: divergence
def test_divergent_training_never_saves_non_finite_state(tmp_path):
  s = helpers.settings(tmp_path / 'tfds', training__learning_rate=1e6,
                       training__num_steps=30, training__checkpoint_every=1)
  try:
    helpers.train_mode(s, tmp_path / 'run')
  except DivergenceError as e:
    assert 'diverged at step' in str(e) and 'learning_rate' in str(e)
  manager = checkpoint.make_manager(str(tmp_path / 'run'), keep=100, read_only=True)
  for step in checkpoint.complete_steps(str(tmp_path / 'run')):
    state = checkpoint.restore_on_one_device(manager, step)
    for leaf in jax.tree.leaves(state):
      assert np.all(np.isfinite(np.asarray(leaf))), step
  manager.close()


def _exploded_copy(workdir, target):
  """A copy of `workdir` whose latest checkpoint's EMA UNet weights are scaled by 1e30
  (finite, but the model's outputs are not), saved as a new step."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(workdir, target)
  step = checkpoint.complete_steps(str(target))[-1]
  manager = checkpoint.make_manager(str(target), keep=10)
  state = checkpoint.restore_on_one_device(manager, step)
  config = checkpoint.stored_config(manager, step)
  state['ema_params']['unet'] = jax.tree.map(lambda x: x * 1e30, state['ema_params']['unet'])
  checkpoint.save(manager, step + 1, state, None, config)
  manager.wait_until_finished()
  manager.close()


def test_evaluate_refuses_a_diverged_model(trained, tmp_path):
  workdir, tfds = trained
  _exploded_copy(workdir, tmp_path / 'exploded')
  result = _run(_cmd(tmp_path / 'exploded', tfds, '--mode=evaluate',
                     f'--config.sampling.output_dir={tmp_path / "eval"}'))
  assert result.returncode == 2, result.stderr[-2000:]
  lines = _error_lines(result.stderr)
  assert len(lines) == 1 and 'non-finite' in lines[0] and 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'eval')


# ------------------------------------------------------------------ item 7: stored config
def test_resume_uses_the_checkpoint_model_and_refuses_contradictions(trained, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir, tfds = trained
  shutil.copytree(workdir, tmp_path / 'run')
  wide = helpers.settings(tfds, model__num_channels=16, training__num_steps=3,
                          training__checkpoint_every=3)
  with pytest.raises(ConfigError, match=r'model.num_channels=16 contradicts .* '
                                        r'model.num_channels=8'):
    helpers.train_mode(wide, tmp_path / 'run', {'model.num_channels'})
  state = helpers.train_mode(wide, tmp_path / 'run')   # the config file's width: ignored
  assert int(state.step) == 3
  assert state.params['unet']['input_blocks_0']['kernel'].shape[-1] == 8


# ------------------------------------------------------------------ items 8, 9: messages
@pytest.mark.parametrize('args,expected', [
    (('--config.training.num_steps=-5',), 'training.num_steps=-5: expected an integer in [1,'),
    (('--config.sampling.num_samples=0',), 'sampling.num_samples=0: expected an integer in [1,'),
    (('--config.training.batch_sise=4',),
     'unknown config key training.batch_sise; did you mean training.batch_size?'),
    (('--config.training.learning_rate=-1',), 'training.learning_rate=-1'),
    (('--config.data.image_size=18', '--config.model.channel_mult=(1,2,2)'),
     'data.image_size=18: expected a multiple of 2**2'),
    (('--mode=evaluate',), 'No checkpoint in'),
])
def test_known_failures_are_one_line_with_status_2(tmp_path, args, expected):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  result = _run(_cmd(workdir, tmp_path / 'tfds', *args), timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = _error_lines(result.stderr)
  assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  if 'No checkpoint' in expected:   # the traceback went to the workdir's log
    logs = os.listdir(workdir / 'logs')
    assert any('Traceback' in open(workdir / 'logs' / n).read() for n in logs)


@pytest.mark.parametrize('mode', ['evaluate', 'demo', 'reproduce', 'ablations'])
def test_single_process_modes_are_refused_in_a_multi_process_job(mode, monkeypatch):
  """Evaluation and the modes built on it would let every process sample the same
  images and fight over one output folder: refused, naming the mode, before any work;
  training and sampling are the multi-process modes."""
  import jax  # pylint: disable=g-import-not-at-top
  from cimd_jax.apps import modes  # pylint: disable=g-import-not-at-top
  from cimd_jax.utils.errors import ConfigError  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ConfigError, match=rf'^--mode={mode} runs in one process'):
    modes.run(mode, helpers.settings(), '/nonexistent/workdir', set())
  assert modes.MULTI_PROCESS_MODES == ('train', 'sample')
