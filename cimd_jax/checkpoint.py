"""Orbax checkpoints of the train state and the data iterator under WORKDIR/checkpoints.

A checkpoint holds two items: `state` (the TrainState pytree: step, params, optimizer
state, EMA params, PRNG key) and `data` (the grain iterator's JSON state), so a
resumed run continues both the optimisation and the data order. Orbax writes each step
into a temporary folder and renames it when complete, so a process killed at any time,
even mid-save, leaves only complete checkpoints for the next run to find.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  """The folder holding the numbered step folders: WORKDIR/checkpoints."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, keep: int, create: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager over WORKDIR/checkpoints keeping the last `keep` steps."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=create,
      # Synchronous saves: a save returns once the step folder is final, so the
      # "complete checkpoint" guarantee never depends on a background thread.
      enable_async_checkpointing=False,
  )
  return ocp.CheckpointManager(
      checkpoint_dir(workdir), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_state: dict | None) -> None:
  """Writes `state` (a pytree of jax.Arrays) and the data iterator state at `step`."""
  items = {'state': ocp.args.StandardSave(state)}
  items['data'] = ocp.args.JsonSave(data_state if data_state is not None else {})
  manager.save(step, args=ocp.args.Composite(**items), force=True)
  manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict]:
  """Restores (state, data_state) at `step` onto the shardings of `abstract_state`.

  `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `.sharding` set (e.g.
  from `jax.eval_shape` plus the target shardings).
  """
  restored = manager.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(),
      ))
  return restored['state'], dict(restored['data'] or {})


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


def describe_dir(path: str) -> str:
  """A one-line description of what a folder holds, for error messages."""
  if not os.path.exists(path):
    return f'{path} does not exist'
  entries = sorted(os.listdir(path))
  if not entries:
    return f'{path} is empty'
  shown = ', '.join(entries[:10]) + (' ...' if len(entries) > 10 else '')
  return f'{path} contains: {shown}'


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves, all placed on `sharding`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
