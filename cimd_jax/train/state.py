"""The train state (the one owner of everything that changes during training) and the
optimizer built from explicit arguments."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from cimd_jax.train.args import TrainingArgs

# Which parameter groups stay at their initial values in each ambiguity mode
# (models.build.AMBIGUITY_MODES).
FROZEN_NETWORKS = {'trained': (), 'frozen': ('amn', 'acn'), 'target': ('amn',), 'off': ()}


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  step: int32 scalar, the number of optimizer updates applied.
  params: {'unet', 'amn', 'acn'} float32 parameter trees ('unet' only when the
    ambiguity networks are off).
  opt_state: optax state of the parameters.
  ema_params: exponential moving average of `params` (used to sample).
  rng: PRNG key; step k uses `fold_in(rng, k)`.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


def learning_rate_schedule(args: TrainingArgs) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then constant or cosine decay to 0
  at `num_steps`."""
  warmup = max(int(args.warmup_steps), 0)
  if args.lr_schedule == 'cosine':
    decay = optax.cosine_decay_schedule(args.learning_rate, max(args.num_steps - warmup, 1))
  else:
    decay = optax.constant_schedule(args.learning_rate)
  if warmup == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, args.learning_rate, warmup), decay], [warmup])


def make_optimizer(args: TrainingArgs, ambiguity: str = 'trained'
                   ) -> optax.GradientTransformation:
  """Global-norm clipping and AdamW on the schedule of `args`, over the trained
  networks; the networks `FROZEN_NETWORKS[ambiguity]` get no update at all (no
  weight decay either)."""
  parts = []
  if args.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(args.grad_clip_norm))
  parts.append(optax.adamw(learning_rate_schedule(args), weight_decay=args.weight_decay))
  tx = optax.chain(*parts)
  frozen = FROZEN_NETWORKS[ambiguity]
  if not frozen:
    return tx

  def labels(params):
    return {name: jax.tree.map(lambda _, n=name: 'frozen' if n in frozen else 'trained',
                               tree)
            for name, tree in params.items()}
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)


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
