"""Restoring a trained UNet for sampling: its parameters (EMA or raw) and the
configuration stored with the checkpoint, checked before anything is drawn."""

import dataclasses
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from cimd_jax import checkpoint
from cimd_jax.utils.errors import CheckpointMismatchError, DivergenceError


@dataclasses.dataclass(frozen=True)
class Restored:
  """A restored UNet.

  params: the UNet's float32 parameter tree on this process's first device.
  step: the checkpoint's step.
  config: the configuration stored with it (settings.to_dict form), or None for
    checkpoints written before configurations were stored.
  """
  params: Any
  step: int
  config: dict[str, Any] | None


def read_config(workdir: str, which: str | int = 'latest'
                ) -> tuple[int, dict[str, Any] | None]:
  """(step of checkpoint `which` ('latest', 'best' or a step), the configuration
  stored with it or None)."""
  step = checkpoint.resolve_step(workdir, which)
  manager = checkpoint.make_manager(workdir, keep=1, read_only=True)
  try:
    return step, checkpoint.stored_config(manager, step)
  finally:
    manager.close()


def warn_if_unfinished(step: int, stored: dict[str, Any] | None, where: str) -> bool:
  """Logs a warning (and returns True) when checkpoint `step` comes before the
  training.num_steps its run was configured for: results from it are of a model
  that has not finished training."""
  planned = ((stored or {}).get('training') or {}).get('num_steps')
  if planned is None or step >= planned:
    return False
  logging.warning('%s: step %d of a run configured for %d steps (training.num_steps); '
                  'the model has not finished training', where, step, planned)
  return True


def restore_unet(workdir: str, which: str | int = 'latest', use_ema: bool = True,
                 expected: Any = None) -> Restored:
  """The UNet parameters of checkpoint `which` ('latest', 'best' or a step) of
  WORKDIR/checkpoints.

  Args:
    expected: the configured UNet's parameter tree (shapes); when given, the first
      parameter whose presence or shape differs raises CheckpointMismatchError.

  Raises:
    CheckpointNotFoundError naming the folder when there is no such checkpoint;
    DivergenceError when the restored parameters are not finite.
  """
  step = checkpoint.resolve_step(workdir, which)
  manager = checkpoint.make_manager(workdir, keep=1, read_only=True)
  try:
    state = checkpoint.restore_on_one_device(manager, step)
    config = checkpoint.stored_config(manager, step)
  finally:
    manager.close()
  which = 'ema_params' if use_ema else 'params'
  params = _get(state, which)['unet']
  where = f'{checkpoint.checkpoint_dir(workdir)}/{step}'
  if expected is not None:
    check_params_fit(params, expected, where)
  params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float32), params)
  bad = first_non_finite(params)
  if bad:
    raise DivergenceError(
        f'Checkpoint {where} holds non-finite {which} ({bad}): the run diverged; '
        'sample an earlier step (--config.sampling.checkpoint=STEP) or retrain with a '
        'lower training.learning_rate')
  return Restored(params=params, step=step, config=config)


def first_non_finite(tree: Any) -> str:
  """The path of the first leaf with a NaN or inf ('' when all are finite)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not np.all(np.isfinite(np.asarray(leaf))):
      return jax.tree_util.keystr(path)
  return ''


def _get(tree: Any, key: str) -> Any:
  return tree[key] if isinstance(tree, dict) else getattr(tree, key)


def check_params_fit(params: Any, expected: Any, where: str) -> None:
  """Raises CheckpointMismatchError at the first path whose presence or shape differs."""
  got = {jax.tree_util.keystr(p): np.shape(v)
         for p, v in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): tuple(v.shape)
          for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  for path in sorted(set(got) | set(want)):
    if path not in got:
      raise CheckpointMismatchError(
          f'Checkpoint {where} has no parameter {path} (shape {want[path]} in the config); '
          'was it trained with another model config?')
    if path not in want:
      raise CheckpointMismatchError(
          f'Checkpoint {where} has parameter {path} (shape {got[path]}) that the configured '
          'model does not have; was it trained with another model config?')
    if tuple(got[path]) != tuple(want[path]):
      raise CheckpointMismatchError(
          f'Checkpoint {where} does not fit the config: parameter {path} has shape '
          f'{tuple(got[path])} in the checkpoint but {tuple(want[path])} in the config '
          '(check model.num_channels, channel_mult, data.image_channels, ...).')
