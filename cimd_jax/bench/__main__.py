r"""python -m cimd_jax.bench --config=configs/<name>.py
    --what=model|train|sample|ensemble|metrics|all [--batch N] [--json] [--repeats 5]
    [--torch_reference=PYTHON]

Every figure is the median of >= 5 timed runs after warm-up, with compile time apart,
peak memory (RSS on CPU; device memory where there is one), achieved GFLOP/s from
XLA's cost analysis and, measured in the same run, this machine's float32 matmul rate
and CPU model, so every figure is also a fraction of the in-run roofline.
`--what=ensemble` times a whole N-mask ensemble end to end (compile apart) and its
per-step time inside the lax.scan. With `--torch_reference=PYTHON` (a Python that has
torch), train and sample also run the official PyTorch model's matching script
(bench/torch_reference.py) right after, in the same invocation, and print the ratio.
`--what=all` runs each measurement in its own process so that peak memory is per
measurement.
"""

import dataclasses
import json
import os
import subprocess
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/lidc.py', 'Config file.')
_WHAT = flags.DEFINE_enum('what', 'model',
                          ['model', 'train', 'sample', 'ensemble', 'metrics', 'all'],
                          'What to measure.')
_BATCH = flags.DEFINE_integer('batch', None, 'Global batch (train) or images (sample).')
_JSON = flags.DEFINE_bool('json', False, 'One JSON line per measurement.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per figure (median).')
_ENSEMBLE = flags.DEFINE_enum(
    'ensemble', 'auto', ['auto', 'measure', 'estimate'],
    'sample: time a whole ensemble (measure), or step time x steps (estimate); auto '
    'measures when the estimate is under 10 minutes.')
_PROFILE = flags.DEFINE_string(
    'profile', '', 'train: also trace two steps with jax.profiler into this folder and '
    'print the XLA ops that took the most time.')
_CACHE = flags.DEFINE_bool('compilation_cache', False,
                           'Use the persistent compilation cache (off: honest compile_s).')
_TORCH = flags.DEFINE_string(
    'torch_reference', '', 'train/sample: a Python with torch; also time the official '
    'PyTorch model (configs A and B) in this run and print the ratio.')
_TORCH_DIR = flags.DEFINE_string('torch_speed_dir', '',
                                 "The official scripts' folder (default: "
                                 '../shared/reference/torch_speed or $CIMD_TORCH_SPEED).')


def _emit(record: dict) -> None:
  if _JSON.value:
    print(json.dumps(record, default=float), flush=True)
  else:
    keys = [k for k in record if k not in ('times_s',)]
    print('  '.join(f'{k}={record[k]:.4g}' if isinstance(record[k], float) else
                    f'{k}={record[k]}' for k in keys), flush=True)


def _run_all(argv) -> None:
  """Each measurement in a fresh process (per-measurement peak memory)."""
  base = [a for a in argv[1:] if not a.startswith('--what')]
  for what in ('model', 'metrics', 'train', 'sample'):
    subprocess.run([sys.executable, '-m', 'cimd_jax.bench', f'--what={what}', *base],
                   check=True)


def _check_torch_reference() -> None:
  """Before any timing: --torch_reference names an executable and the official
  scripts exist; otherwise one line and exit status 2."""
  import shutil  # pylint: disable=g-import-not-at-top
  from cimd_jax.bench import torch_reference  # pylint: disable=g-import-not-at-top
  if not shutil.which(_TORCH.value):
    sys.stderr.write(f'cimd_jax.bench: --torch_reference={_TORCH.value}: not an executable; '
                     'expected the path of a Python that has torch\n')
    sys.exit(2)
  folder = _TORCH_DIR.value or os.environ.get('CIMD_TORCH_SPEED', torch_reference.DEFAULT_DIR)
  if not os.path.isfile(os.path.join(folder, 'torch_train_step.py')):
    sys.stderr.write(f'cimd_jax.bench: {folder}: no torch_train_step.py; expected the '
                     'folder ../shared/reference/torch_speed (set --torch_speed_dir)\n')
    sys.exit(2)


def main(argv):
  if _TORCH.value:
    _check_torch_reference()
  if _WHAT.value == 'all':
    _run_all(sys.argv)
    return
  from cimd_jax.utils import runtime  # pylint: disable=g-import-not-at-top
  if _CACHE.value:
    runtime.enable_compilation_cache()
  from cimd_jax import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from cimd_jax.bench import common  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  info = {'config': common.config_name(sys.argv), **common.machine_info()}
  what = _WHAT.value
  if what == 'model':
    from cimd_jax.bench import model_bench  # pylint: disable=g-import-not-at-top
    s = settings_lib.from_config(config)
    record = model_bench.bench_model(s.model, s.data.image_size, s.data.image_channels)
    record = {'what': 'model', **record}
  elif what == 'metrics':
    from cimd_jax.bench import metrics_bench  # pylint: disable=g-import-not-at-top
    record = metrics_bench.bench_metrics(num_images=_BATCH.value or 256,
                                         repeats=_REPEATS.value)
  elif what == 'train':
    from cimd_jax.bench import train_bench  # pylint: disable=g-import-not-at-top
    batch = _BATCH.value or int(config.training.batch_size)
    with config.unlocked():
      config.training.batch_size = batch   # so training.microbatches is checked against it
    record = train_bench.bench_train(settings_lib.from_config(config), batch,
                                     repeats=_REPEATS.value, profile_dir=_PROFILE.value)
    if 'profile' in record and not _JSON.value:
      from cimd_jax.bench import profile  # pylint: disable=g-import-not-at-top
      print(profile.format_report(record.pop('profile')), flush=True)
  elif what == 'ensemble':
    from cimd_jax.bench import sample_bench  # pylint: disable=g-import-not-at-top
    record = sample_bench.bench_ensemble(settings_lib.from_config(config),
                                         num_images=_BATCH.value or 1)
  else:
    from cimd_jax.bench import sample_bench  # pylint: disable=g-import-not-at-top
    record = sample_bench.bench_sample(
        settings_lib.from_config(config), num_images=_BATCH.value or 1,
        repeats=_REPEATS.value, ensemble=_ENSEMBLE.value)
  if what in ('train', 'sample', 'ensemble'):
    roof = common.matmul_gflops()
    record['matmul_gflops_per_s'] = roof
    if record.get('gflops_per_s'):
      import jax  # pylint: disable=g-import-not-at-top
      record['roofline_fraction'] = common.roofline_fraction(record['gflops_per_s'], roof,
                                                             jax.device_count())
  if _TORCH.value and what in ('train', 'sample'):
    record.update(_torch_ratio(settings_lib.from_config(config), what, record))
  _emit({**record, **info})


def _torch_ratio(s, what: str, record: dict) -> dict:
  """The official model's figure for the same work, run now, and our ratio to it."""
  import jax  # pylint: disable=g-import-not-at-top
  from cimd_jax.bench import torch_reference  # pylint: disable=g-import-not-at-top
  cfg = torch_reference.official_config(s.model, s.data.image_size, s.data.image_channels,
                                       what)
  if cfg is None:
    trained = dataclasses.replace(s.model, ambiguity='trained')
    if torch_reference.official_config(trained, s.data.image_size, s.data.image_channels,
                                       what):
      return {'torch_reference': f'no ratio: model.ambiguity={s.model.ambiguity!r} trains '
                                 'other networks than the official script, which trains '
                                 'the AMN/ACN (add --config.model.ambiguity=trained)'}
    return {'torch_reference': 'no official script for this config (only A and B, with '
                               "the official model's heads, dropout, dtype and AMN/ACN)"}
  reason = torch_reference.not_comparable(jax.default_backend(),
                                          len(os.sched_getaffinity(0)))
  if reason:
    return {'torch_reference': reason}
  size = record['batch'] if what == 'train' else record['rows']
  try:
    torch = torch_reference.run(_TORCH.value, what, cfg, size,
                                max(3, min(_REPEATS.value, 5)), _TORCH_DIR.value)
  except (OSError, RuntimeError, ValueError) as e:  # keep our figures; name the failure
    return {'torch_reference': f'failed: {e}'}
  out = {'torch_cfg': cfg, 'torch_median_s': torch['median_s']}
  if what == 'train':
    out['torch_images_per_s'] = torch['images_per_s']
    out['speedup_vs_torch'] = record['images_per_s'] / torch['images_per_s']
  else:
    out['speedup_vs_torch'] = torch['median_s'] / record['step_median_s']
  return out


if __name__ == '__main__':
  app.run(main)
