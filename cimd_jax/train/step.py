"""The pure train step `(state, batch) -> (state, metrics)` and its sharded jit.

Data parallelism: a 1-D `jax.sharding.Mesh` with axis 'data' over every device of
every process; the batch is sharded along its leading axis, the state is replicated.
XLA inserts the gradient all-reduce (GSPMD); there is no pmap.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cimd_jax.diffusion.args import DiffusionArgs
from cimd_jax.diffusion.schedule import DiffusionTables
from cimd_jax.models import conv as conv_lib
from cimd_jax.models.build import Networks
from cimd_jax.train import objective
from cimd_jax.train.state import TrainState, ema_update

DATA_AXIS = 'data'
NUM_QUARTILES = 4


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device."""
  return NamedSharding(mesh, P())


def tree_norm(tree: Any) -> jax.Array:
  """Global L2 norm of a pytree, float32 scalar."""
  return optax.tree.norm(tree)


def quartile_sums(mse: jax.Array, t: jax.Array, num_timesteps: int) -> dict[str, jax.Array]:
  """Sum of `mse` [B] and count of examples per quarter of the timesteps
  (`t * 4 // T`): {'mse_q0_sum', 'q0_count', ...}; float32 scalars."""
  quartile = (t * NUM_QUARTILES) // num_timesteps
  out = {}
  for q in range(NUM_QUARTILES):
    member = (quartile == q).astype(jnp.float32)
    out[f'mse_q{q}_sum'] = jnp.sum(mse * member)
    out[f'q{q}_count'] = jnp.sum(member)
  return out


def batch_gradients(state: TrainState, batch: dict[str, jax.Array],
                    example_ids: jax.Array, *, networks: Networks, tables: DiffusionTables,
                    objective_args: objective.ObjectiveArgs, diffusion: DiffusionArgs
                    ) -> tuple[Any, dict[str, jax.Array], dict[str, jax.Array]]:
  """(gradients of the mean loss over `batch`, mean terms, per-quartile MSE sums).

  Mean terms: loss, mse, vlb, kl over `batch`; sums: see `quartile_sums`.
  `example_ids` int [B]: each example's index in the global batch (its t and eps come
  from `fold_in(step key, id)`); the step key is `fold_in(state.rng, state.step)`.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    terms = objective.loss_terms(params, networks, tables, batch, step_rng,
                                 objective_args, diffusion, train=True,
                                 example_ids=example_ids)
    means = {k: jnp.mean(terms[k]) for k in (*objective.TERMS, 'loss')}
    return means['loss'], (means, quartile_sums(terms['mse'], terms['t'],
                                                tables.num_timesteps))

  grads, (means, sums) = jax.grad(loss_fn, has_aux=True)(state.params)
  return grads, means, sums


def apply_gradients(state: TrainState, grads: Any, means: dict[str, jax.Array],
                    sums: dict[str, jax.Array], *, tx: optax.GradientTransformation,
                    lr_fn: Callable[[Any], Any], ema_rate: float
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimizer and EMA update from `grads`; returns (new state, scalar metrics):
  the mean terms, the quartile sums, grad_norm, param_norm, learning_rate and
  finite (1.0 when the loss and every new parameter are finite)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = ema_update(state.ema_params, params, ema_rate)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema_params)
  metrics = {**means, **sums}
  metrics['grad_norm'] = tree_norm(grads)
  metrics['param_norm'] = tree_norm(params)
  metrics['learning_rate'] = jnp.asarray(lr_fn(state.step), jnp.float32)
  metrics['finite'] = jnp.logical_and(
      jnp.isfinite(means['loss']),
      jnp.logical_and(all_finite(params), all_finite(ema_params))).astype(jnp.float32)
  return new_state, metrics


def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every leaf of `tree` is finite (bool scalar)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, networks: Networks,
               tables: DiffusionTables, objective_args: objective.ObjectiveArgs,
               diffusion: DiffusionArgs, tx: optax.GradientTransformation,
               lr_fn: Callable[[Any], Any], ema_rate: float
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update of the trained networks on `batch` (global, sharded).

  Returns the new state and scalar metrics (see `apply_gradients`).
  """
  global_batch = batch['image'].shape[0]
  grads, means, sums = batch_gradients(
      state, batch, jnp.arange(global_batch), networks=networks, tables=tables,
      objective_args=objective_args, diffusion=diffusion)
  return apply_gradients(state, grads, means, sums, tx=tx, lr_fn=lr_fn, ema_rate=ema_rate)


def compile_ahead(step_fn: Any, state: TrainState, batch: dict[str, jax.Array]) -> Any:
  """`step_fn` (from jit_train_step) compiled for these arguments' shapes before its
  first call; called the same way."""
  from cimd_jax.train import microbatch  # pylint: disable=g-import-not-at-top
  if isinstance(step_fn, microbatch.MicrobatchedTrainStep):
    return step_fn.compile(state, batch)
  return step_fn.lower(state, batch).compile()


def conv_compiler_options(networks: Networks) -> dict[str, str] | None:
  """XLA compiler options for a program that runs `networks` (their conv_impl;
  models/conv.py), or None."""
  return conv_lib.compiler_options(*(net.conv_impl for net in (networks.unet, networks.amn,
                                                               networks.acn)
                                     if net is not None))


def jit_train_step(mesh: Mesh, state_sharding: Any, microbatches: int = 1, **step_kwargs
                   ) -> Callable[[TrainState, dict[str, jax.Array]],
                                 tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` jitted once with explicit shardings and the state donated.

  `state_sharding` is a pytree of shardings matching the TrainState (usually all
  replicated); batch leaves are sharded along 'data'; metrics come back replicated.
  With `microbatches > 1`, a `MicrobatchedTrainStep` (same call, same update).
  Compiled with the networks' conv compiler options (`conv_compiler_options`).
  """
  if microbatches > 1:
    from cimd_jax.train import microbatch  # pylint: disable=g-import-not-at-top
    return microbatch.MicrobatchedTrainStep(mesh, state_sharding, microbatches,
                                            **step_kwargs)
  fn = functools.partial(train_step, **step_kwargs)
  return jax.jit(
      fn,
      in_shardings=(state_sharding, batch_sharding(mesh)),
      out_shardings=(state_sharding, replicated(mesh)),
      donate_argnums=(0,),
      compiler_options=conv_compiler_options(step_kwargs['networks']),
  )
