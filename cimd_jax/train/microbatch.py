"""The train step with its gradient accumulated over micro-batches (less activation
memory, the same update as `step.train_step`)."""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cimd_jax.diffusion.args import DiffusionArgs
from cimd_jax.diffusion.schedule import DiffusionTables
from cimd_jax.models.build import Networks
from cimd_jax.train import objective
from cimd_jax.train.state import TrainState
from cimd_jax.train.step import (apply_gradients, batch_gradients, batch_sharding,
                                 conv_compiler_options, replicated)


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
               objective_args: objective.ObjectiveArgs, diffusion: DiffusionArgs,
               tx: optax.GradientTransformation, lr_fn: Callable[[Any], Any],
               ema_rate: float):
    self.microbatches = microbatches
    k = microbatches
    grads_fn = functools.partial(batch_gradients, networks=networks, tables=tables,
                                 objective_args=objective_args, diffusion=diffusion)
    data, rep = batch_sharding(mesh), replicated(mesh)

    def take(batch, i):
      return jax.tree.map(
          lambda x: jnp.take(x.reshape((x.shape[0] // k, k) + x.shape[1:]), i, axis=1), batch)

    def accumulate(state, total, chunk, i):
      size = chunk['image'].shape[0]
      grads, means, sums = grads_fn(state, chunk, jnp.arange(size) * k + i)
      # Gradients and means average over the k micro-batches; sums add up.
      return (jax.tree.map(lambda a, b: a + b / k, total[0], grads),
              jax.tree.map(lambda a, b: a + b / k, total[1], means),
              jax.tree.map(lambda a, b: a + b, total[2], sums))

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

  def compile(self, state: TrainState, batch: dict[str, jax.Array]) -> 'MicrobatchedTrainStep':
    """Compiles the step's programs now (ahead of the first call); returns self."""
    index = jnp.asarray(0, jnp.int32)
    chunk = jax.eval_shape(self._take, batch, index)
    total = jax.eval_shape(self._zeros, state, chunk)
    self._take = self._take.lower(batch, index).compile()
    self._zeros = self._zeros.lower(state, chunk).compile()
    self._accumulate = self._accumulate.lower(state, total, chunk, index).compile()
    self._update = self._update.lower(state, total).compile()
    return self

  def programs(self, state: TrainState, batch: dict[str, jax.Array]
               ) -> list[tuple[Any, tuple[Any, ...], int]]:
    """(jitted function, abstract arguments, calls per step) of the two programs of a
    step: the per-micro-batch accumulation and the update (for benchmarks)."""
    index = jnp.asarray(0, jnp.int32)
    chunk = jax.eval_shape(self._take, batch, index)
    total = jax.eval_shape(self._zeros, state, chunk)
    return [(self._accumulate, (state, total, chunk, index), self.microbatches),
            (self._update, (state, total), 1)]
