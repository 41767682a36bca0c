"""The train state (the one owner of everything that changes during training) and the
optimizer built from explicit arguments."""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  step: int32 scalar, the number of optimizer updates applied.
  params: {'unet', 'amn', 'acn'} float32 parameter trees.
  opt_state: optax state of all three networks' parameters.
  ema_params: exponential moving average of `params` (used to sample).
  rng: PRNG key; step k uses `fold_in(rng, k)`.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimizerArgs:
  """AdamW with warm-up, a constant or cosine schedule and global-norm clipping."""
  learning_rate: float = 1e-4
  lr_schedule: str = 'constant'   # 'constant' | 'cosine'
  warmup_steps: int = 0
  num_steps: int = 100_000
  weight_decay: float = 0.0
  grad_clip_norm: float = 1.0     # <= 0 disables clipping

  def __post_init__(self):
    if self.lr_schedule not in ('constant', 'cosine'):
      raise ValueError("training.lr_schedule must be 'constant' or 'cosine', "
                       f'got {self.lr_schedule!r}')


def learning_rate_schedule(args: OptimizerArgs) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then constant or cosine decay to 0."""
  warmup = max(int(args.warmup_steps), 0)
  if args.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(args.learning_rate, max(args.num_steps - warmup, 1))
  else:
    decay = optax.constant_schedule(args.learning_rate)
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, args.learning_rate, warmup), decay], [warmup])


def make_optimizer(args: OptimizerArgs) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW on the schedule of `args`."""
  parts = []
  if args.grad_clip_norm and args.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(args.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(args), weight_decay=args.weight_decay))
  return optax.chain(*parts)


def create_train_state(params: Any, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  """A fresh state at step 0 whose EMA starts at `params`."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params),
      rng=rng,
  )


def ema_update(ema: Any, new: Any, rate: float) -> Any:
  """ema <- rate * ema + (1 - rate) * new, leaf by leaf."""
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, new)
