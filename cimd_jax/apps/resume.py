"""What a resumed training may change: the settings of the latest checkpoint in a
workdir checked against those given (model and diffusion keys by settings.reconcile;
training keys refused, followed or warned about here)."""

import dataclasses
from typing import Any

from absl import logging

from cimd_jax import checkpoint
from cimd_jax import settings as settings_lib
from cimd_jax.inference import restore
from cimd_jax.utils.errors import CheckpointNotFoundError, ConfigError


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
  skip or repeat examples, another seed would not be used (the checkpoint's random
  stream continues), and clipping switched on or off does not fit the saved optimizer
  state (ConfigError each); others continue under a warning."""
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
  unusable = [k for k, old, new in changed if k == 'training.seed' or (
      k == 'training.grad_clip_norm' and (old > 0) != (new > 0))]
  if unusable:
    why = {'training.seed': 'the seed is used only at step 0 (a resumed run continues the '
                            'checkpoint\'s random stream)',
           'training.grad_clip_norm': 'clipping switched on or off does not fit the saved '
                                      'optimizer state'}
    raise ConfigError(
        f'{workdir}: resuming at step {step} with {", ".join(unusable)} changed ({shown}): '
        f'{"; ".join(why[k] for k in unusable)}; resume with the stored values, or train in '
        'a new workdir')
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
