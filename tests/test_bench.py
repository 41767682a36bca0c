"""python -m cimd_jax.bench prints one JSON line per measurement with the promised keys."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _bench(*args, timeout=600):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, '-m', 'cimd_jax.bench', '--json', *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
  assert len(lines) == 1, out.stdout
  return json.loads(lines[0])


def test_model_bench_paper_config_with_override():
  record = _bench('--config=configs/lidc.py', '--what=model', '--config.data.image_channels=4')
  assert record['unet_params'] == 85_603_842
  assert record['amn_params'] == record['acn_params'] == 1_368_972  # 5 input channels
  assert abs(record['unet_forward_flops'] / 132.17e9 - 1) < 0.05
  for key in ('device', 'jax_version', 'threads'):
    assert key in record


@pytest.mark.slow
def test_train_and_sample_bench_keys(tmp_path):
  train = _bench('--config=configs/test.py', '--what=train', '--batch=4', '--repeats=5',
                 '--config.training.microbatches=2', f'--profile={tmp_path}')
  for key in ('what', 'config', 'batch', 'median_s', 'images_per_s', 'gflops_per_s',
              'roofline_fraction', 'peak_rss_mib', 'compile_s', 'matmul_gflops_per_s'):
    assert key in train, key
  assert train['config'] == 'test' and train['batch'] == 4 and len(train['times_s']) == 5
  assert 0 < train['roofline_fraction'] < 2
  assert train['microbatches'] == 2
  # The profile names the XLA ops: a UNet step spends its time in convolutions and
  # fusions, and every op's time is part of the total.
  profile = train['profile']
  assert profile['calls'] == 2 and os.path.exists(profile['trace'])
  assert profile['total_ms'] > 0
  kinds = [kind for kind, _, _ in profile['by_kind']]
  assert any('conv' in k or 'fusion' in k for k in kinds), kinds
  assert sum(share for _, _, share in profile['by_kind']) <= 1 + 1e-9
  sample = _bench('--config=configs/test.py', '--what=sample', '--config.sampling.num_samples=16')
  for key in ('what', 'config', 'sampler', 'steps', 'num_samples', 'step_median_s',
              'ensemble_s'):
    assert key in sample, key
  assert sample['num_samples'] == 16 and sample['steps'] == 10 and sample['ensemble_measured']


def test_flops_count_every_device_of_a_sharded_program():
  """A [64, 32] @ [32, 16] matmul is 2·64·32·16 FLOPs whether its rows are split over
  one device or several (XLA's cost analysis counts one device's share)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from cimd_jax.bench import common  # pylint: disable=g-import-not-at-top
  a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
  expected = 2 * 64 * 32 * 16
  for count in sorted({1, 2, min(4, jax.device_count())}):
    if count > jax.device_count():
      continue
    mesh = jax.make_mesh((count,), ('data',), devices=jax.devices()[:count])
    rows, whole = NamedSharding(mesh, PartitionSpec('data')), NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(jnp.matmul, in_shardings=(rows, whole), out_shardings=rows)
    compiled, _, flops = common.compile_timed(fn, a, b)
    assert common.num_program_devices(compiled) == count
    assert flops == pytest.approx(expected, rel=0.01), count


def test_top_ops_sums_xla_events_and_drops_framework_events():
  from cimd_jax.bench import profile  # pylint: disable=g-import-not-at-top
  events = [
      {'ph': 'X', 'name': 'convolution.1', 'dur': 3000.0},
      {'ph': 'X', 'name': 'convolution.2', 'dur': 1000.0},
      {'ph': 'X', 'name': 'convolution.1', 'dur': 2000.0},
      {'ph': 'X', 'name': 'fusion.12', 'dur': 4000.0},
      {'ph': 'X', 'name': '$profiler.py:307 trace', 'dur': 1e9},
      {'ph': 'X', 'name': 'PjitFunction(step)', 'dur': 1e9},
      {'ph': 'i', 'name': 'fusion.12', 'dur': 5e6},
  ]
  report = profile.top_ops(events)
  assert report['total_ms'] == 10.0
  assert report['by_kind'] == [('convolution', 6.0, 0.6), ('fusion', 4.0, 0.4)]
  assert report['top_ops'][0] == ('convolution.1', 5.0, 2)
  assert profile.op_kind('ynn_fusion.1.2') == 'ynn_fusion'


def test_metrics_bench_reports_speedup():
  record = _bench('--what=metrics', '--batch=32', '--repeats=5')
  assert record['what'] == 'metrics' and record['batch'] == 32
  assert record['speedup'] > 1 and record['images_per_s'] > 0


@pytest.mark.parametrize('flag, named', [
    (['--torch_reference=/no/such/python'], '--torch_reference=/no/such/python'),
    ([f'--torch_reference={sys.executable}', f'--torch_speed_dir={ROOT}'], ROOT),
])
def test_bad_torch_reference_is_one_line_before_any_timing(flag, named):
  out = subprocess.run([sys.executable, '-m', 'cimd_jax.bench', '--what=metrics', *flag],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith('cimd_jax.bench:')]
  assert len(lines) == 1 and named in lines[0], out.stderr[-2000:]
  assert not [l for l in out.stdout.splitlines() if l.startswith('{')]  # nothing timed


def test_official_config_is_named_only_for_the_official_work():
  """Configs A and B match the official scripts; a model that does other work (another
  head count, dropout, bfloat16, remat, up/down ResBlocks, other AMN/ACN, or no
  ambiguity networks in training) gets no ratio, since the scripts would time
  something else. Sampling does not run the AMN/ACN, so `ambiguity` does not matter
  there."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from cimd_jax import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from cimd_jax.bench import torch_reference  # pylint: disable=g-import-not-at-top
  a = settings_lib.from_config(settings_lib.load_config_file(
      os.path.join(ROOT, 'configs', 'lidc.py')))
  b = settings_lib.from_config(settings_lib.load_config_file(
      os.path.join(ROOT, 'configs', 'bench_small.py')))
  assert torch_reference.official_config(a.model, a.data.image_size, 4) == 'A'
  assert torch_reference.official_config(b.model, b.data.image_size, 4) == 'B'
  assert torch_reference.official_config(b.model, b.data.image_size, 1) is None
  for change in (dict(num_heads=4), dict(num_head_channels=32), dict(dropout=0.3),
                 dict(resblock_updown=True), dict(compute_dtype='bfloat16'),
                 dict(remat=True), dict(latent_filters=(8,)), dict(latent_dim=3),
                 dict(ambiguity='off')):
    other = dataclasses.replace(b.model, **change)
    assert torch_reference.official_config(other, 64, 4) is None, change
  off = dataclasses.replace(b.model, ambiguity='off')
  assert torch_reference.official_config(off, 64, 4, 'sample') == 'B'


def test_torch_ratio_names_the_ambiguity_override(monkeypatch):
  """Config A with the AMN/ACN off differs from the official training work only by
  model.ambiguity: the bench says so and names the flag that restores it, and runs
  no torch script for it."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from cimd_jax import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from cimd_jax.bench import __main__ as bench_main  # pylint: disable=g-import-not-at-top
  from cimd_jax.bench import torch_reference  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(torch_reference, 'run', lambda *a, **k: pytest.fail('ran torch'))
  a = settings_lib.from_config(settings_lib.load_config_file(
      os.path.join(ROOT, 'configs', 'lidc.py')))
  a = dataclasses.replace(a, data=dataclasses.replace(a.data, image_channels=4))
  off = dataclasses.replace(a, model=dataclasses.replace(a.model, ambiguity='off'))
  out = bench_main._torch_ratio(off, 'train', {'batch': 4})  # pylint: disable=protected-access
  assert '--config.model.ambiguity=trained' in out['torch_reference']
  other = dataclasses.replace(off, model=dataclasses.replace(off.model, num_heads=4))
  out = bench_main._torch_ratio(other, 'train', {'batch': 4})  # pylint: disable=protected-access
  assert out['torch_reference'].startswith('no official script')


def test_ratio_and_roofline_account_for_hardware():
  """The official scripts use 2 CPU threads: on a GPU or another core count no ratio is
  printed; a 2-device run's FLOPs (both devices' work) are divided by two devices'
  matmul rate."""
  from cimd_jax.bench import common  # pylint: disable=g-import-not-at-top
  from cimd_jax.bench import torch_reference  # pylint: disable=g-import-not-at-top
  assert torch_reference.not_comparable('cpu', 2) is None
  assert 'gpu with 16 CPU cores' in torch_reference.not_comparable('gpu', 16)
  assert 'cpu with 8 CPU cores' in torch_reference.not_comparable('cpu', 8)
  assert common.roofline_fraction(300.0, 200.0, 2) == pytest.approx(0.75)
  assert common.roofline_fraction(150.0, 200.0, 1) == pytest.approx(0.75)


def test_config_name_in_both_flag_forms():
  from cimd_jax.bench import common  # pylint: disable=g-import-not-at-top
  for argv in (['bench', '--config', 'configs/test.py', '--what=model'],
               ['bench', '--config=configs/test.py']):
    assert common.config_name(argv) == 'test'
  assert common.config_name(['bench', '--what=model']) == 'lidc'
