r"""Entry point: train, sample, evaluate, or run the whole demo.

  python -m cimd_jax.main --config=configs/synthetic.py --workdir=runs/demo \
      --mode=train --config.training.num_steps=200
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'ml_collections config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, logs and outputs.')
_MODE = flags.DEFINE_enum('mode', 'train',
                          ['train', 'sample', 'evaluate', 'demo', 'compare_samplers'],
                          'What to run.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (auto-detects SLURM / TPU).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-process runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_LOCAL_DEVICE_IDS = flags.DEFINE_list('local_device_ids', None,
                                      'Devices this process uses (e.g. 0,1).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from cimd_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.quiet_library_logs()
  runtime.initialize_distributed(
      _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
      [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None)
  runtime.enable_compilation_cache()
  from cimd_jax import run_modes  # pylint: disable=g-import-not-at-top
  run_modes.run(_MODE.value, _CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  app.run(main)
