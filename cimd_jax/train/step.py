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
from cimd_jax.models import conv as conv_lib
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


def batch_gradients(state: TrainState, batch: dict[str, jax.Array],
                    example_ids: jax.Array, *, networks: Networks, tables: DiffusionTables,
                    objective_args: objective.ObjectiveArgs) -> tuple[Any, dict[str, jax.Array]]:
  """Gradients of the mean loss over `batch` w.r.t. all params, and the mean terms.

  `example_ids` int [B]: each example's index in the global batch (its t and eps come
  from `fold_in(step key, id)`); the step key is `fold_in(state.rng, state.step)`.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    terms = objective.loss_terms(params, networks, tables, batch, step_rng,
                                 objective_args, train=True, example_ids=example_ids)
    means = {k: jnp.mean(v) for k, v in terms.items()}
    return means['loss'], means

  return jax.grad(loss_fn, has_aux=True)(state.params)


def apply_gradients(state: TrainState, grads: Any, means: dict[str, jax.Array], *,
                    tx: optax.GradientTransformation, lr_fn: Callable[[Any], Any],
                    ema_rate: float) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimizer and EMA update from `grads`; returns (new state, scalar metrics)."""
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


def train_step(state: TrainState, batch: dict[str, jax.Array], *, networks: Networks,
               tables: DiffusionTables, objective_args: objective.ObjectiveArgs,
               tx: optax.GradientTransformation, lr_fn: Callable[[Any], Any],
               ema_rate: float) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update of all three networks on `batch` (global, sharded).

  Returns the new state and scalar metrics: loss, mse, vlb, kl (batch means),
  grad_norm, param_norm, learning_rate, finite (1.0 when the loss is finite).
  """
  global_batch = batch['image'].shape[0]
  grads, means = batch_gradients(state, batch, jnp.arange(global_batch), networks=networks,
                                 tables=tables, objective_args=objective_args)
  return apply_gradients(state, grads, means, tx=tx, lr_fn=lr_fn, ema_rate=ema_rate)


class MicrobatchedTrainStep:
  """`train_step` with the gradient accumulated over k equal micro-batches.

  Rows i, i+k, i+2k, ... form micro-batch i (so each device keeps its own rows);
  every example draws the same t and eps as in the whole batch, so the update equals
  `train_step`'s up to float rounding (dropout aside). Activation memory is that of
  one micro-batch. Each micro-batch is its own jitted call (gradients accumulated in
  a donated buffer), then one jitted update: inside a `lax.scan` XLA:CPU does not use
  its fast convolution kernels (a scanned step was 18x slower, config B batch 20), and
  an unrolled loop in one program kept every micro-batch's activations alive.
  Called like the jitted `train_step`: `(state, batch) -> (state, metrics)`.
  """

  def __init__(self, mesh: Mesh, state_sharding: Any, microbatches: int, *,
               networks: Networks, tables: DiffusionTables,
               objective_args: objective.ObjectiveArgs, tx: optax.GradientTransformation,
               lr_fn: Callable[[Any], Any], ema_rate: float):
    self.microbatches = microbatches
    k = microbatches
    grads_fn = functools.partial(batch_gradients, networks=networks, tables=tables,
                                 objective_args=objective_args)
    data, rep = batch_sharding(mesh), replicated(mesh)

    def take(batch, i):
      return jax.tree.map(
          lambda x: jnp.take(x.reshape((x.shape[0] // k, k) + x.shape[1:]), i, axis=1), batch)

    def accumulate(state, total, chunk, i):
      size = chunk['image'].shape[0]
      grads, means = grads_fn(state, chunk, jnp.arange(size) * k + i)
      return jax.tree.map(lambda a, b: a + b / k, total, (grads, means))

    def zeros(state, chunk):
      shapes = jax.eval_shape(grads_fn, state, chunk, jnp.arange(chunk['image'].shape[0]))
      return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    def update(state, total):
      return apply_gradients(state, *total, tx=tx, lr_fn=lr_fn, ema_rate=ema_rate)

    self._indices = [jnp.asarray(i, jnp.int32) for i in range(k)]  # made once, not per step
    self._take = jax.jit(take, in_shardings=(data, None), out_shardings=data)
    self._zeros = jax.jit(zeros, out_shardings=rep)
    self._accumulate = jax.jit(accumulate, in_shardings=(state_sharding, rep, data, None),
                               out_shardings=rep, donate_argnums=(1,),
                               compiler_options=conv_compiler_options(networks))
    self._update = jax.jit(update, in_shardings=(state_sharding, rep),
                           out_shardings=(state_sharding, rep), donate_argnums=(0,))

  def __call__(self, state: TrainState, batch: dict[str, jax.Array]
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    global_batch = batch['image'].shape[0]
    if global_batch % self.microbatches:
      raise ValueError(f'batch {global_batch} is not divisible into '
                       f'{self.microbatches} micro-batches')
    total = None
    for index in self._indices:
      chunk = self._take(batch, index)
      if total is None:
        total = self._zeros(state, chunk)
      total = self._accumulate(state, total, chunk, index)
    return self._update(state, total)

  def programs(self, state: TrainState, batch: dict[str, jax.Array]
               ) -> list[tuple[Any, tuple[Any, ...], int]]:
    """(jitted function, abstract arguments, calls per step) of the two programs of a
    step: the per-micro-batch accumulation and the update (for benchmarks)."""
    index = jnp.asarray(0, jnp.int32)
    chunk = jax.eval_shape(self._take, batch, index)
    total = jax.eval_shape(self._zeros, state, chunk)
    return [(self._accumulate, (state, total, chunk, index), self.microbatches),
            (self._update, (state, total), 1)]


def conv_compiler_options(networks: Networks) -> dict[str, str] | None:
  """XLA compiler options for a program that runs `networks` (their conv_impl;
  models/conv.py), or None."""
  return conv_lib.compiler_options(*(getattr(net, 'conv_impl', 'xla') for net in networks))


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
    return MicrobatchedTrainStep(mesh, state_sharding, microbatches, **step_kwargs)
  fn = functools.partial(train_step, **step_kwargs)
  return jax.jit(
      fn,
      in_shardings=(state_sharding, batch_sharding(mesh)),
      out_shardings=(state_sharding, replicated(mesh)),
      donate_argnums=(0,),
      compiler_options=conv_compiler_options(step_kwargs['networks']),
  )
