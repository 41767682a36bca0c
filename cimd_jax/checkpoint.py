"""Orbax checkpoints under WORKDIR/checkpoints: the train state, the data iterator and
the configuration the model was trained with.

A checkpoint holds three items:
  state   the TrainState pytree (step, params, optimizer state, EMA params, PRNG key);
  data    each process's grain iterator state (grain's own Orbax handler: one JSON
          file per process), so a resumed run continues the exact data order;
  config  the run's configuration (JSON, `settings.to_dict`): what sample, evaluate,
          resume and `cimd_jax.load` use to rebuild the model and the diffusion.
Orbax writes each step into a temporary folder and renames it when complete, so a
process killed at any time, even mid-save, leaves only complete checkpoints. The
manager keeps the latest `keep` steps and, when validation scores are saved with a
step, also the best one by `best_metric`.
"""

import math
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cimd_jax.utils.errors import CheckpointNotFoundError

BEST_KEY = 'score'   # in the metrics saved with a step: higher is better


def checkpoint_dir(workdir: str) -> str:
  """The folder holding the numbered step folders: WORKDIR/checkpoints."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, keep: int, save_every: int = 1, best: bool = False,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over WORKDIR/checkpoints.

  `should_save(step)` is true every `save_every` steps. Keeps the latest `keep` steps,
  plus (with `best`) the step with the highest validation `score` among those saved
  with metrics. Saves are asynchronous: the
  next training step runs while the files are written; `close()` (or
  `wait_until_finished()`) waits for the last one. `read_only` managers (sampling,
  evaluation) never write.
  """
  preserve = [policies.LatestN(n=keep)]
  if best:
    preserve.append(policies.BestN(get_metric_fn=_best_score, n=1,
                                   keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      create=not read_only, read_only=read_only,
      save_decision_policy=policies.FixedIntervalPolicy(save_every),
      preservation_policy=policies.AnyPreservationPolicy(preserve),
      # Orbax writes a step's metrics only when best_fn is set; BestN ranks by them.
      best_fn=_best_score if best else None, best_mode='max',
      enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler(),
                     'config': ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         config: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
  """Starts writing `state` (jax.Arrays), the data iterator's state and `config` at
  `step`. `metrics`, when given, must hold BEST_KEY (higher is better): it ranks the
  step for the best-checkpoint policy."""
  if metrics is not None and BEST_KEY not in metrics:
    # Checked before writing: Orbax would write the step, then fail ranking it.
    raise ValueError(f'checkpoint.save: metrics for step {step} lack {BEST_KEY!r} '
                     f'(got keys {sorted(metrics)}); pass None or include it')
  items = {'state': ocp.args.StandardSave(state),
           'config': ocp.args.JsonSave(config)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore_train_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                        data_iterator: Any) -> tuple[Any, bool]:
  """Restores the state at `step` onto the shardings of `abstract_state` and, when
  the checkpoint has this process's iterator file, the data iterator in place.

  Returns (state, whether the data order was restored).
  """
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  data_restored = False
  if data_iterator is not None and _has_data_state(manager, step):
    try:
      manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
      data_restored = True
    except (ValueError, KeyError):  # another number of processes or of data workers
      data_restored = False
  return restored['state'], data_restored


def _has_data_state(manager: ocp.CheckpointManager, step: int) -> bool:
  folder = os.path.join(str(manager.directory), str(step), 'data')
  name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  return os.path.exists(os.path.join(folder, name))


def restore_on_one_device(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The `state` item at `step` as a dict tree of arrays on this process's first device,
  whatever the device topology it was saved from (e.g. a multi-host job)."""
  metadata = manager.item_metadata(step)['state']
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), metadata)
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return restored['state']


def complete_steps(workdir: str) -> list[int]:
  """The steps with a complete checkpoint folder, ascending."""
  folder = checkpoint_dir(workdir)
  if not os.path.isdir(folder):
    return []
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def stored_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The configuration saved with checkpoint `step` (None for checkpoints written
  before configurations were stored)."""
  if not os.path.isdir(os.path.join(str(manager.directory), str(step), 'config')):
    return None
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return dict(restored['config'])


def resolve_step(workdir: str, which: str | int = 'latest') -> int:
  """The step of checkpoint `which`: 'latest', 'best' (the highest validation
  `score` saved with a step, see `save`) or a step number (int or digits).

  Raises CheckpointNotFoundError naming the folder (and what it holds) when there is
  no such checkpoint.
  """
  steps = complete_steps(workdir)
  folder = checkpoint_dir(workdir)
  if not steps:
    raise CheckpointNotFoundError(
        f'No checkpoint in {folder}: {describe_dir(folder)}; workdir: '
        f'{describe_dir(os.path.abspath(workdir))}. Train first (--mode=train) or point '
        '--workdir at a trained run.')
  which = str(which)
  if which in ('latest', '-1'):
    return steps[-1]
  if which == 'best':
    manager = make_manager(workdir, keep=len(steps), read_only=True, best=True)
    try:
      saved = {s: _saved_metrics(manager, s) for s in steps}
      scores = {s: _best_score(m) for s, m in saved.items() if m and BEST_KEY in m}
      scored = {s: v for s, v in scores.items() if v > -math.inf}
      if not scored:
        raise CheckpointNotFoundError(
            f'No checkpoint in {folder} has a finite validation score: train with '
            'training.eval_every > 0 (and a training.best_metric the validation data '
            'gives) to have a best checkpoint')
      return max(scored, key=lambda s: (scored[s], s))
    finally:
      manager.close()
  if not which.isdigit() or int(which) not in steps:
    raise CheckpointNotFoundError(f'No checkpoint for step {which} in {folder}; '
                                  f'available steps: {steps}')
  return int(which)


def _best_score(metrics: dict[str, Any]) -> float:
  """A checkpoint's saved validation score (metrics[BEST_KEY]) for ranking; NaN (a
  metric the data cannot give) ranks below every real score instead of comparing
  False both ways."""
  value = float(metrics[BEST_KEY])
  return -math.inf if math.isnan(value) else value


def _saved_metrics(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The metrics saved with checkpoint `step`, or None where none can be read."""
  try:
    return manager.metrics(step)
  except Exception:  # pylint: disable=broad-except
    return None


def describe_dir(path: str) -> str:
  """A one-line description of what a folder holds, for error messages."""
  if not os.path.exists(path):
    return f'{path} does not exist'
  entries = sorted(os.listdir(path))
  if not entries:
    return f'{path} is empty'
  shown = ', '.join(entries[:10]) + (' ...' if len(entries) > 10 else '')
  return f'{path} contains: {shown}'
