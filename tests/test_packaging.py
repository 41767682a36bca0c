"""Packaging: the declared dependencies agree with the tested pins, and `pip install .`
into a new virtual environment gives a working `cimd-jax` console script and
`import cimd_jax` outside the repository."""

import os
import re
import subprocess
import sys
import sysconfig

from packaging.requirements import Requirement
import pytest
import tomllib

from tests.conftest import ROOT


def _pins() -> dict[str, str]:
  pins = {}
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    for line in f:
      line = line.split('#', 1)[0].strip()
      if line:
        name, version = line.split('==')
        pins[name.lower().replace('_', '-')] = version
  return pins


def test_declared_dependencies_admit_the_pinned_versions():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  pins = _pins()
  declared = [Requirement(r) for r in project['dependencies']]
  assert declared
  for req in declared:
    name = req.name.lower().replace('_', '-')
    assert name in pins, f'{req} is declared in pyproject.toml but not pinned'
    assert req.specifier.contains(pins[name]), f'{req} excludes the pinned {pins[name]}'
  assert project['scripts']['cimd-jax'] == 'cimd_jax.main:run'
  for name in ('LICENSE', 'CITATION.cff'):
    assert os.path.isfile(os.path.join(ROOT, name)), name
  with open(os.path.join(ROOT, 'LICENSE')) as f:
    assert 'Apache License' in f.read(300)


@pytest.mark.slow
def test_pip_install_into_a_new_venv(tmp_path):
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  py = str(venv / 'bin' / 'python')
  # The package itself is built and installed from the repository; its (large)
  # dependencies come from this environment through a .pth file instead of a
  # second download. The fresh venv's own site-packages come first on sys.path.
  install = subprocess.run([py, '-m', 'pip', 'install', '--quiet', '--no-deps', ROOT],
                           capture_output=True, text=True, timeout=600)
  assert install.returncode == 0, install.stderr[-3000:]
  site = subprocess.run([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(site, 'project_dependencies.pth'), 'w') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH',)}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  where = subprocess.run([py, '-c', 'import cimd_jax; print(cimd_jax.__file__, '
                          'cimd_jax.__version__); cimd_jax.load'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert where.returncode == 0, where.stderr[-3000:]
  assert where.stdout.startswith(str(venv)), where.stdout
  cli = subprocess.run([str(venv / 'bin' / 'cimd-jax'), '--help'], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert re.search(r'--mode', cli.stdout), cli.stdout
  assert 'Exit status' in cli.stdout, cli.stdout  # the module doc, not absl's empty one
  # A config file from the repository, run from another directory: a tiny training.
  run = subprocess.run(
      [str(venv / 'bin' / 'cimd-jax'), f'--config={ROOT}/configs/test.py',
       f'--workdir={tmp_path / "run"}', '--config.training.num_steps=1',
       '--config.training.checkpoint_every=1'],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '1')
