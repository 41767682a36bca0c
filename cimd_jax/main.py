r"""Entry point: train, sample, evaluate, run the demo, compare samplers, run the
ablations, reproduce the paper-style LIDC table, or the real-data sanity check.

  python -m cimd_jax.main --config=configs/demo.py --workdir=runs/demo \
      --mode=train --config.training.num_steps=200
  cimd-jax --config=configs/lidc.py --workdir=runs/lidc --mode=evaluate

Exit status: 0 done; 2 a failure you can fix (bad data or config, no checkpoint, a
workdir in use, a checkpoint that does not fit, a diverged model), printed as one
line, its traceback in WORKDIR/logs/ (or on the console with --verbose_errors);
1 anything else (traceback shown); 143 stopped by SIGTERM / Ctrl-C after saving.
"""

import os
import re
import sys
import time
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_MODES = ('train', 'sample', 'evaluate', 'demo', 'compare_samplers', 'ablations',
          'reproduce', 'sanity')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and outputs.')
_MODE = flags.DEFINE_enum('mode', 'train', list(_MODES), 'What to run.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (auto-detects SLURM / TPU).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-process runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_LOCAL_DEVICE_IDS = flags.DEFINE_list('local_device_ids', None,
                                      'Devices this process uses (e.g. 0,1).')
_ABLATION_RUNS = flags.DEFINE_list(
    'ablation_runs', [], '--mode=ablations: only these models, e.g. off-x0,trained-x0 '
    '(default: all).')
_ABLATION_SAMPLERS = flags.DEFINE_list(
    'ablation_samplers', [], '--mode=ablations: only these samplers of ddpm1000, ddpm50, '
    'ddim25 (default: all).')
_VERBOSE_ERRORS = flags.DEFINE_bool(
    'verbose_errors', False, 'Show the traceback of known failures on the console too.')
flags.mark_flags_as_required(['config', 'workdir'])


def _error(message: str, code: int = 2) -> None:
  sys.stderr.write(f'cimd_jax: error: {message}\n')
  sys.stderr.flush()
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (unknown config keys get a suggestion)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _error(' '.join(str(e).split()))
  except Exception as e:  # pylint: disable=broad-except
    # ml_collections reports an unknown override key as an AttributeError/KeyError
    # whose text carries 'Did you mean "good" instead of "bad"?'.
    text = ' '.join(str(e).split()).replace('\\n', ' ').replace("\\'", "'")
    match = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    override = next((a.split('=', 1)[0].lstrip('-') for a in argv
                     if match and a.startswith('--config.')
                     and a.split('=', 1)[0].endswith('.' + match.group(2))), None)
    if match and override:
      _error(f'unknown config key {override.removeprefix("config.")}; did you mean '
             f'{override.removeprefix("config.").rsplit(".", 1)[0]}.{match.group(1)}?')
    _error(f'cannot read the command line: {type(e).__name__}: {text}')
  return argv


def _log_file(workdir: str, mode: str, process: int) -> str | None:
  """Adds a file handler WORKDIR/logs/<mode>-<time>-p<process>.log to the logger."""
  if not os.path.isdir(workdir):
    return None
  folder = os.path.join(workdir, 'logs')
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f'{mode}-{time.strftime("%Y%m%d-%H%M%S")}-p{process}.log')
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  handler = py_logging.FileHandler(path)
  handler.setFormatter(py_logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
  py_logging.getLogger().addHandler(handler)
  return path


def main(argv):
  if len(argv) > 1:
    _error(f'unexpected arguments: {" ".join(argv[1:])}')
  from cimd_jax.utils import errors  # pylint: disable=g-import-not-at-top
  from cimd_jax.utils import job  # pylint: disable=g-import-not-at-top
  from cimd_jax.utils import runtime  # pylint: disable=g-import-not-at-top
  guard = job.JobGuard().install()
  workdir, mode = _WORKDIR.value, _MODE.value
  log_path = None
  try:
    runtime.quiet_library_logs()
    runtime.initialize_distributed(
        _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None)
    guard.arm()
    runtime.enable_compilation_cache()
    import jax  # pylint: disable=g-import-not-at-top
    from cimd_jax import settings as settings_lib  # pylint: disable=g-import-not-at-top
    settings = settings_lib.from_config(_CONFIG.value)
    overrides = set(config_flags.get_override_values(flags.FLAGS['config']))
    if mode in ('train', 'demo', 'reproduce', 'sanity'):
      os.makedirs(workdir, exist_ok=True)
    log_path = _log_file(workdir, mode, jax.process_index())
    from cimd_jax.apps import modes  # pylint: disable=g-import-not-at-top
    values = config_flags.get_override_values(flags.FLAGS['config'])
    command_flags = ''.join(
        f" --config.{k}={'(' + ','.join(map(str, v)) + ')' if isinstance(v, (tuple, list)) else v}"
        for k, v in values.items() if k not in ('model.ambiguity', 'diffusion.prediction'))
    modes.run(mode, settings, workdir, overrides, should_stop=guard.should_stop,
              config_file=config_flags.get_config_filename(flags.FLAGS['config']),
              command_flags=command_flags,
              ablation_runs=tuple(_ABLATION_RUNS.value),
              ablation_samplers=tuple(_ABLATION_SAMPLERS.value))
    guard.disarm()
    if guard.stop_requested:
      logging.warning('Stopped before the end (stop requested); run the same command to '
                      'resume')
      sys.exit(job.EXIT_STOPPED)
  except errors.UserError as e:
    log_path = log_path or _log_file(workdir, mode, _PROCESS_ID.value or 0)
    if log_path:
      with open(log_path, 'a') as f:
        f.write(f'{errors.one_line(e)}\n{traceback.format_exc()}')
    sys.stderr.write(f'cimd_jax: error: {errors.one_line(e)}\n')
    if _VERBOSE_ERRORS.value:
      traceback.print_exc()
    elif log_path:
      sys.stderr.write(f'(traceback in {log_path})\n')
    guard.fail(errors.one_line(e), errors.EXIT_USER_ERROR)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    guard.fail(f'{type(e).__name__}: {e}', 1)


def run() -> None:
  """The `cimd-jax` console script (and `python -m cimd_jax.main`)."""
  if any(arg in ('-h', '-?', '--help', '--helpshort') for arg in sys.argv[1:]):
    # absl exits 1 after --help and, under a console script, shows no module doc.
    sys.modules['__main__'].__doc__ = __doc__
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
