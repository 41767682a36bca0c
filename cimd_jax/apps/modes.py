"""What each `--mode` of main.py does, given the typed settings and a workdir.

  train             train (or resume) under a lock on the workdir
  sample            masks for a split or a folder of images (apps/sampling.py)
  evaluate          masks + metrics for a split
  demo              train -> evaluate -> baselines and calibration report (apps/demo.py)
  compare_samplers  one checkpoint scored with several samplers (apps/compare_samplers.py)
  ablations         ambiguity mode x prediction x sampler table (apps/ablations.py)
  reproduce         train -> N = 16, 32, 100 -> the paper-style table (apps/reproduce.py)
  sanity            train -> per-image D_a / GED on seen and unseen images beside
                    expert references (apps/sanity.py)

`overrides` are the dotted config keys given on the command line: they decide which
differences from a checkpoint's stored configuration are errors (settings.reconcile).
"""

import os
from typing import Any, Callable

from absl import logging
import jax

from cimd_jax import settings as settings_lib
from cimd_jax.apps import resume
from cimd_jax.data import provenance
from cimd_jax.inference import restore
from cimd_jax.train import loop
from cimd_jax.utils import atomic, locking
from cimd_jax.utils.errors import CheckpointNotFoundError, ConfigError

MODES = ('train', 'sample', 'evaluate', 'demo', 'compare_samplers', 'ablations',
         'reproduce', 'sanity')
# Modes that run in a multi-process job: training (sharded), sampling (process 0 writes).
MULTI_PROCESS_MODES = ('train', 'sample')


def run(mode: str, settings: settings_lib.Settings, workdir: str, overrides: set[str],
        should_stop: Callable[[int], bool] | None = None, config_file: str = '',
        command_flags: str = '', ablation_runs: tuple[str, ...] = (),
        ablation_samplers: tuple[str, ...] = ()) -> Any:
  """Runs `mode` (one of MODES) and returns its result. `config_file` and `command_flags`
  (the --config path and the command line's --config.* overrides) are quoted in the
  ablation table's commands; `ablation_runs` / `ablation_samplers` restrict it."""
  if jax.process_count() > 1 and mode not in MULTI_PROCESS_MODES:
    raise ConfigError(
        f'--mode={mode} runs in one process (every process would sample the same images '
        'and write one output folder); run it without --distributed, e.g. on one host '
        f'after a multi-host training (multi-process modes: {", ".join(MULTI_PROCESS_MODES)})')
  if mode == 'train':
    return train(settings, workdir, overrides, should_stop)
  if mode == 'sample':
    from cimd_jax.apps import sampling  # pylint: disable=g-import-not-at-top
    return sampling.run_sample(settings, workdir, overrides)
  if mode == 'evaluate':
    from cimd_jax.apps import sampling  # pylint: disable=g-import-not-at-top
    return sampling.evaluate_cases(settings, workdir, overrides)[1]
  if mode == 'demo':
    return demo(settings, workdir, overrides, should_stop)
  if mode == 'compare_samplers':
    return compare_samplers(settings, workdir, overrides)
  if mode == 'ablations':
    from cimd_jax.apps import ablations  # pylint: disable=g-import-not-at-top
    return ablations.run(settings, workdir,
                         lambda s, run_dir: _train_ablation_row(s, run_dir, should_stop),
                         config_file or 'CONFIG', command_flags,
                         runs=ablation_runs, samplers=ablation_samplers)
  if mode in ('reproduce', 'sanity'):
    from cimd_jax.apps import reproduce, sanity  # pylint: disable=g-import-not-at-top
    if not train_to_end(settings, workdir, overrides, should_stop):
      return None
    app = reproduce if mode == 'reproduce' else sanity
    return app.run(settings, workdir, overrides)
  raise ValueError(f'unknown mode {mode!r}; expected one of {MODES}')


def _train_ablation_row(settings: settings_lib.Settings, run_dir: str,
                        should_stop: Callable[[int], bool]) -> bool:
  """train_to_end for one row of --mode=ablations; ConfigError when the row was trained
  before with other model or diffusion keys (resuming keeps those: the row would differ
  from the others in more than its name)."""
  try:
    stored = restore.read_config(run_dir, 'latest')[1]
  except CheckpointNotFoundError:
    stored = None
  want = settings_lib.to_dict(settings)
  kept = (settings_lib.to_dict(settings_lib.reconcile(settings, stored, set(), run_dir))
          if stored else want)
  differ = [f'{g}.{k}={settings_lib.show(want[g][k])} (trained with '
            f'{settings_lib.show(kept[g][k])})' for g in ('model', 'diffusion')
            for k in want[g] if want[g][k] != kept[g][k]]
  if differ:
    raise ConfigError(f'{run_dir} was trained with other settings than this table asks for: '
                      f'{", ".join(differ)}; use a new --workdir, or pass the stored values')
  return train_to_end(settings, run_dir, set(), should_stop)


def workdir_lock(workdir: str) -> locking.FolderLock:
  """The lock that makes one training run the only writer of `workdir`."""
  return locking.FolderLock(os.path.join(os.path.abspath(workdir), '.lock'),
                            f'workdir {os.path.abspath(workdir)}')


def train(settings: settings_lib.Settings, workdir: str, overrides: set[str],
          should_stop: Callable[[int], bool] | None = None):
  """Trains (resuming from WORKDIR/checkpoints when present); returns the final state."""
  os.makedirs(workdir, exist_ok=True)
  lock = workdir_lock(workdir) if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    s = resume.resume_settings(settings, workdir, overrides)
    config = settings_lib.to_dict(s)
    if jax.process_index() == 0:
      from cimd_jax.evaluation import reports  # pylint: disable=g-import-not-at-top
      reports.write_json(os.path.join(workdir, 'config.json'), config)
      provenance.record_training(s.data, workdir)
    return loop.train_and_evaluate(
        workdir, data=s.data, model=s.model, diffusion=s.diffusion, objective=s.objective,
        training=s.training, sampling=s.sampling, config=config, should_stop=should_stop)
  finally:
    if lock is not None:
      lock.release()


def train_to_end(settings: settings_lib.Settings, workdir: str, overrides: set[str],
                 should_stop: Callable[[int], bool] | None = None) -> bool:
  """Trains (resuming) to training.num_steps; False when a stop request ended it
  earlier (the modes that evaluate afterwards then stop too, never scoring a
  half-trained model)."""
  state = train(settings, workdir, overrides, should_stop)
  done = int(state.step.addressable_data(0))   # replicated; fine in multi-process jobs too
  if done < settings.training.num_steps:
    logging.warning('Training stopped at step %d of %d: nothing evaluated; run the same '
                    'command to resume', done, settings.training.num_steps)
    return False
  return True


def demo(settings: settings_lib.Settings, workdir: str, overrides: set[str],
         should_stop: Callable[[int], bool] | None = None) -> dict[str, Any]:
  """Train -> evaluate -> baselines and calibration -> WORKDIR/report/."""
  from cimd_jax.apps import demo as demo_lib  # pylint: disable=g-import-not-at-top
  from cimd_jax.apps import sampling  # pylint: disable=g-import-not-at-top

  def evaluate_fn():
    return sampling.evaluate_cases(settings, workdir, overrides)
  s = settings.sampling
  return demo_lib.run_demo(lambda: train_to_end(settings, workdir, overrides, should_stop),
                           evaluate_fn, settings.data, s.split, s.num_samples, s.seed,
                           workdir)


def compare_samplers(settings: settings_lib.Settings, workdir: str, overrides: set[str]
                     ) -> str:
  """Scores DDPM-T, DDPM-100/50, DDIM-50/25 on sampling.split; writes and returns
  WORKDIR/report/samplers.md."""
  from cimd_jax.apps import compare_samplers as compare_lib  # pylint: disable=g-import-not-at-top
  rows, rec = compare_lib.compare(settings, workdir, overrides)
  table = compare_lib.markdown_table(rows, rec)
  os.makedirs(os.path.join(workdir, 'report'), exist_ok=True)
  path = os.path.join(workdir, 'report', 'samplers.md')
  atomic.write_text(path, table + '\n')
  print(table, flush=True)
  logging.info('Wrote %s', path)
  return path
