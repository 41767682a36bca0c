"""Two local processes x two fake CPU devices form one 4-device job through
jax.distributed, and train exactly like one process with four devices."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

WORKER = os.path.join(ROOT, 'tests', 'multihost_worker.py')
NUM_STEPS = 3


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT
  return env


def _run_all(cmds_envs, timeout):
  procs = [subprocess.Popen(c, env=e, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c, e in cmds_envs]
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:  # clean up on failure or timeout
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('multihost')
  tfds_dir = str(base / 'tfds')
  # Single process, four devices: the reference (also prepares the dataset cache).
  _run_all([([sys.executable, WORKER, str(base / 'single_out'), str(base / 'single'),
              tfds_dir, str(NUM_STEPS)], _env(4))], timeout=600)
  port = portpicker.pick_unused_port()
  cmds = [([sys.executable, WORKER, str(base / 'multi_out'), str(base / 'multi'), tfds_dir,
            str(NUM_STEPS), f'127.0.0.1:{port}', '2', str(i)], _env(2)) for i in range(2)]
  _run_all(cmds, timeout=600)
  return base


def _load(path):
  data = dict(np.load(path))
  return data.pop('losses'), data


def test_two_processes_form_one_four_device_job(runs):
  for i in range(2):
    with open(runs / 'multi_out' / f'process_{i}.json') as f:
      info = json.load(f)
    assert info == {'process_count': 2, 'device_count': 4, 'local_device_count': 2}


def test_processes_agree_and_match_single_process(runs):
  losses0, params0 = _load(runs / 'multi_out' / 'process_0.npz')
  losses1, params1 = _load(runs / 'multi_out' / 'process_1.npz')
  ref_losses, ref_params = _load(runs / 'single_out' / 'process_0.npz')
  assert len(ref_losses) == NUM_STEPS
  np.testing.assert_array_equal(losses0, losses1)
  np.testing.assert_allclose(losses0, ref_losses, rtol=1e-5, atol=1e-5)
  assert params0.keys() == params1.keys() == ref_params.keys()
  for key in params0:
    np.testing.assert_array_equal(params0[key], params1[key])
    np.testing.assert_allclose(params0[key], ref_params[key], rtol=1e-5, atol=1e-5)


def test_one_checkpoint_copy_restorable_by_one_process(runs, tmp_path):
  ckpt_dir = runs / 'multi' / 'checkpoints'
  steps = sorted(d for d in os.listdir(ckpt_dir) if d.isdigit())
  assert steps == [str(NUM_STEPS)], os.listdir(ckpt_dir)
  # No per-process copies anywhere else in the workdir.
  found = [root for root, dirs, _ in os.walk(runs / 'multi') if str(NUM_STEPS) in dirs
           and os.path.basename(root) == 'checkpoints']
  assert len(found) == 1
  # A single process restores it and samples from it.
  workdir = tmp_path / 'restored'
  shutil.copytree(runs / 'multi', workdir)
  out = subprocess.run(
      [sys.executable, '-m', 'cimd_jax.main', '--mode=sample',
       f'--config={ROOT}/configs/test.py', f'--workdir={workdir}',
       f'--config.data.tfds_dir={runs / "tfds"}', '--config.sampling.num_samples=2',
       '--config.sampling.steps=5', f'--config.sampling.output_dir={tmp_path / "samples"}'],
      env=_env(1), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  cases = [d for d in os.listdir(tmp_path / 'samples') if (tmp_path / 'samples' / d).is_dir()]
  assert cases
  assert os.path.exists(tmp_path / 'samples' / cases[0] / 'sample_01.png')


def test_launch_scripts_pass_bash_n_and_shellcheck():
  scripts = [os.path.join(ROOT, 'launch', n) for n in
             ('slurm_gpu.sbatch', 'tpu_vm.sh', 'local.sh')]
  for script in scripts:
    subprocess.run(['bash', '-n', script], check=True)
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed (launch/local.sh test installs it as root)')
  result = subprocess.run(['shellcheck', *scripts], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
