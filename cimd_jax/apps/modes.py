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

import dataclasses
import os
from typing import Any, Callable

from absl import logging
import jax

from cimd_jax import checkpoint
from cimd_jax import settings as settings_lib
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


def resume_settings(settings: settings_lib.Settings, workdir: str, overrides: set[str]
                    ) -> settings_lib.Settings:
  """The settings to train with: those given, with the model and diffusion of the
  latest checkpoint when resuming (settings.reconcile); training settings checked
  against the checkpoint's (`_check_training_changes`, `_warn_schedule`), and its
  training.best_metric kept while any checkpoint holds a score (`_keep_ranking`)."""
  try:
    step, stored = restore.read_config(workdir, 'latest')
  except CheckpointNotFoundError:
    return settings
  where = f'the checkpoint of step {step} in {workdir}'
  settings = settings_lib.reconcile(settings, stored, overrides, where)
  _check_training_changes(settings, stored, step, workdir)
  _warn_schedule(settings.training, stored, step, workdir)
  return _keep_ranking(settings, stored, overrides, workdir, where)


def _check_training_changes(settings: settings_lib.Settings, stored: dict[str, Any] | None,
                            step: int, workdir: str) -> None:
  """Training settings unlike the checkpoint's: a finished run would train nothing with
  them (ConfigError); another batch size or data would make the saved data position
  skip or repeat examples (ConfigError); others continue under a warning."""
  changed = settings_lib.changed_training_keys(settings, stored)
  if not changed:
    return
  shown = ', '.join(f'{k}={settings_lib.show(new)} (trained with {settings_lib.show(old)})'
                    for k, old, new in changed)
  if step >= settings.training.num_steps:
    raise ConfigError(
        f'{workdir} holds a finished training (step {step} of '
        f'training.num_steps={settings.training.num_steps}) made with other settings: '
        f'{shown}; nothing would be trained with them: use a new workdir (or raise '
        'training.num_steps to continue with them)')
  order = [k for k, _, _ in changed if k == 'training.batch_size' or k.startswith('data.')]
  if order:
    raise ConfigError(
        f'{workdir}: resuming at step {step} with {", ".join(order)} changed ({shown}): '
        'the saved data position counts batches of the stored data and batch size, so '
        'examples would be skipped or repeated; resume with the stored values, or train '
        'in a new workdir')
  logging.warning('Resuming %s at step %d with other settings than its checkpoint: %s; '
                  'steps up to %d used the old ones', workdir, step, shown, step)


def _warn_schedule(training: Any, stored: dict[str, Any] | None, step: int,
                   workdir: str) -> None:
  """Warns when num_steps is below the checkpoint's step (nothing is trained) or a
  cosine decay is rebuilt over another num_steps (the rate jumps)."""
  trained_for = ((stored or {}).get('training') or {}).get('num_steps')
  if step > training.num_steps:
    logging.warning('%s: its checkpoint (step %d) is past training.num_steps=%d; nothing is '
                    'trained and the model is step %d\'s', workdir, step, training.num_steps,
                    step)
  elif (training.lr_schedule == 'cosine' and trained_for is not None
        and trained_for != training.num_steps and step < training.num_steps):
    logging.warning('%s: the cosine learning-rate decay was built over %d steps and is now '
                    'rebuilt over training.num_steps=%d: from step %d on the rate follows the '
                    'new curve (a jump, not a continuation); set the final num_steps before '
                    'the first run to avoid it', workdir, trained_for, training.num_steps, step)


def _keep_ranking(settings: settings_lib.Settings, stored: dict[str, Any] | None,
                  overrides: set[str], workdir: str, where: str) -> settings_lib.Settings:
  """The checkpoint's training.best_metric while any step holds a score: -GED and +CI
  scores cannot be ranked together (the best step would be deleted or never
  replaced); an explicit other one is refused."""
  ranked_by = ((stored or {}).get('training') or {}).get('best_metric')
  if ranked_by is None or ranked_by == settings.training.best_metric:
    return settings
  try:
    checkpoint.resolve_step(workdir, 'best')
  except CheckpointNotFoundError:
    return settings       # no step holds a score yet: nothing to rank against
  if 'training.best_metric' in overrides:
    raise ConfigError(
        f'--config.training.best_metric={settings.training.best_metric!r} differs from '
        f'{where}, whose checkpoints are ranked by {ranked_by!r}: scores of two metrics '
        f'cannot be ranked together; keep {ranked_by!r}, or train in a new workdir')
  logging.info("Using training.best_metric=%r from %s (the config file says %r)",
               ranked_by, where, settings.training.best_metric)
  return dataclasses.replace(settings, training=dataclasses.replace(
      settings.training, best_metric=ranked_by))


def train(settings: settings_lib.Settings, workdir: str, overrides: set[str],
          should_stop: Callable[[int], bool] | None = None):
  """Trains (resuming from WORKDIR/checkpoints when present); returns the final state."""
  os.makedirs(workdir, exist_ok=True)
  lock = workdir_lock(workdir) if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    s = resume_settings(settings, workdir, overrides)
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
