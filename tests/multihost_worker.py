"""One process of a multi-process training job, started by tests/test_multihost.py.

  python tests/multihost_worker.py OUT_DIR WORKDIR TFDS_DIR NUM_STEPS \
      [COORDINATOR NUM_PROCESSES PROCESS_ID]

Trains configs/test.py through `cimd_jax.train.loop.train_and_evaluate`, then writes
OUT_DIR/process_<id>.npz with the per-step losses and the final parameters.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv):
  out_dir, workdir, tfds_dir, num_steps = argv[1:5]
  distributed = len(argv) > 5
  from cimd_jax.utils import runtime  # pylint: disable=g-import-not-at-top
  if distributed:
    coordinator, num_processes, process_id = argv[5], int(argv[6]), int(argv[7])
    runtime.initialize_distributed(True, coordinator, num_processes, process_id)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top

  settings = helpers.settings(tfds_dir, training__num_steps=int(num_steps),
                              training__batch_size=8, training__log_every=1,
                              training__checkpoint_every=int(num_steps))
  losses = {}
  state = helpers.train_loop(settings, workdir,
                             on_log=lambda step, s: losses.update({step: s['loss']}))
  # Parameters are replicated: every process holds a full copy on its devices.
  params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
  flat = {jax.tree_util.keystr(p): v
          for p, v in jax.tree_util.tree_leaves_with_path(params)}
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, f'process_{jax.process_index()}.npz'),
           losses=np.array([losses[k] for k in sorted(losses)]), **flat)
  with open(os.path.join(out_dir, f'process_{jax.process_index()}.json'), 'w') as f:
    json.dump({'process_count': jax.process_count(), 'device_count': jax.device_count(),
               'local_device_count': jax.local_device_count()}, f)


if __name__ == '__main__':
  main(sys.argv)
