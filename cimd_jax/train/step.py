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

from cimd_jax.diffusion.schedule import DiffusionTables
from cimd_jax.models.build import Networks
from cimd_jax.train import objective
from cimd_jax.train.state import TrainState, ema_update

DATA_AXIS = 'data'


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


def train_step(state: TrainState, batch: dict[str, jax.Array], *, networks: Networks,
               tables: DiffusionTables, objective_args: objective.ObjectiveArgs,
               tx: optax.GradientTransformation, lr_fn: Callable[[Any], Any],
               ema_rate: float, microbatches: int = 1
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update of all three networks on `batch` (global, sharded).

  With `microbatches = k > 1` the gradient of the batch mean is accumulated over k
  equal micro-batches in a `lax.scan` (rows i, i+k, i+2k, ... form micro-batch i, so
  each device keeps its own rows), which bounds activation memory by one micro-batch.
  Every example draws the same t and eps as with k = 1, so the update is the same up
  to float rounding (dropout aside).

  Returns the new state and scalar metrics: loss, mse, vlb, kl (batch means),
  grad_norm, param_norm, learning_rate, finite (1.0 when the loss is finite).
  """
  step_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params, chunk, example_ids):
    terms = objective.loss_terms(params, networks, tables, chunk, step_rng,
                                 objective_args, train=True, example_ids=example_ids)
    means = {k: jnp.mean(v) for k, v in terms.items()}
    return means['loss'], means

  grad_fn = jax.grad(loss_fn, has_aux=True)
  global_batch = batch['image'].shape[0]
  if microbatches == 1:
    grads, means = grad_fn(state.params, batch, jnp.arange(global_batch))
  else:
    grads, means = _accumulated_grads(grad_fn, state.params, batch, microbatches)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      ema_params=ema_update(state.ema_params, params, ema_rate),
  )
  metrics = dict(means)
  metrics['grad_norm'] = tree_norm(grads)
  metrics['param_norm'] = tree_norm(params)
  metrics['learning_rate'] = jnp.asarray(lr_fn(state.step), jnp.float32)
  metrics['finite'] = jnp.isfinite(means['loss']).astype(jnp.float32)
  return new_state, metrics


def _accumulated_grads(grad_fn: Callable[..., Any], params: Any,
                       batch: dict[str, jax.Array], microbatches: int) -> tuple[Any, Any]:
  """Mean of `grad_fn` over `microbatches` equal slices of `batch` ([B, ...] leaves)."""
  global_batch = batch['image'].shape[0]
  if global_batch % microbatches:
    raise ValueError(f'batch {global_batch} is not divisible into {microbatches} micro-batches')
  size = global_batch // microbatches
  # [B, ...] -> [size, k, ...] -> [k, size, ...]: micro-batch i holds rows a*k + i.
  chunks = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape((size, microbatches) + x.shape[1:]), 0, 1), batch)

  def accumulate(total, i_chunk):
    i, chunk = i_chunk
    grads, means = grad_fn(params, chunk, jnp.arange(size) * microbatches + i)
    return jax.tree.map(jnp.add, total, (grads, means)), None

  first = jax.tree.map(lambda x: x[0], chunks)
  shapes = jax.eval_shape(grad_fn, params, first, jnp.arange(size))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), chunks))
  return jax.tree.map(lambda x: x / microbatches, total)


def jit_train_step(mesh: Mesh, state_sharding: Any, **step_kwargs
                   ) -> Callable[[TrainState, dict[str, jax.Array]],
                                 tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step` jitted once with explicit shardings and the state donated.

  `state_sharding` is a pytree of shardings matching the TrainState (usually all
  replicated); batch leaves are sharded along 'data'; metrics come back replicated.
  """
  fn = functools.partial(train_step, **step_kwargs)
  return jax.jit(
      fn,
      in_shardings=(state_sharding, batch_sharding(mesh)),
      out_shardings=(state_sharding, replicated(mesh)),
      donate_argnums=(0,),
  )
