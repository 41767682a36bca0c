"""The CIMD objective: L = L_simple + lambda * L_vlb + beta * KL(Q(z|b, x_b) || P(z|b, x_hat_b)).

Per example (Rahman et al., CVPR 2023, eq. 8; improved DDPM for the hybrid loss):
  * t ~ Uniform{0..T-1}, eps ~ N(0, I), x_t = q_sample(x_b, t, eps)
  * the UNet sees concat(b, x_t) and predicts (eps_hat, v) -- or (x0_hat, v) with
    `prediction='x0'` (an option of improved DDPM; the synthetic demo uses it, see
    docs/samplers.md); eps_hat is then derived from x0_hat
  * L_simple = mean over pixels of (eps - eps_hat)^2 (or of (x_b - x0_hat)^2)
  * L_vlb    = T * L_t (bits/dim) with the predicted mean detached, so it trains only
               the variance (the unbiased single-sample estimate of the full VLB; with
               lambda = 0.001 this is improved DDPM's hybrid loss)
  * Q = AMN(b, x_b) (or x_t), P = ACN(b, x_hat_0 clipped to [-1, 1]) (or eps_hat);
    KL(Q || P) summed over latent dimensions.
All three terms are returned per example, and `weighted_loss` is the one place that
weights and sums them.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cimd_jax.diffusion import gaussian
from cimd_jax.diffusion.schedule import DiffusionTables
from cimd_jax.models.build import Networks
from cimd_jax.models.latent import kl_diag_gaussians


@dataclasses.dataclass(frozen=True)
class ObjectiveArgs:
  """Weights and choices of the CIMD objective."""
  variance: str = 'learned_range'   # 'learned_range' | 'fixed_small' | 'fixed_large'
  vlb_weight: float = 0.001         # lambda
  kl_weight: float = 1.0            # beta
  amn_input: str = 'clean'          # 'clean' | 'noisy'
  acn_input: str = 'x0'             # 'x0' | 'eps'
  prediction: str = 'eps'           # the UNet predicts 'eps' (paper) or 'x0'

  def __post_init__(self):
    if self.amn_input not in ('clean', 'noisy'):
      raise ValueError(f"model.amn_input must be 'clean' or 'noisy', got {self.amn_input!r}")
    if self.acn_input not in ('x0', 'eps'):
      raise ValueError(f"model.acn_input must be 'x0' or 'eps', got {self.acn_input!r}")
    if self.prediction not in gaussian.PREDICTIONS:
      raise ValueError(f'diffusion.prediction must be one of {gaussian.PREDICTIONS}, '
                       f'got {self.prediction!r}')


def loss_terms(params: dict[str, Any], networks: Networks, tables: DiffusionTables,
               batch: dict[str, jax.Array], rng: jax.Array, args: ObjectiveArgs,
               train: bool = True,
               example_ids: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-example loss terms `mse`, `vlb`, `kl` and their weighted sum `loss`, each [B].

  Args:
    params: {'unet', 'amn', 'acn'} parameter trees.
    batch: 'image' f32 [B, H, W, C] in [-1, 1], 'mask' f32 [B, H, W, 1] in {-1, +1}.
    rng: PRNG key for t, eps and dropout.
    example_ids: int [B], each example's index in the global batch (default
      0..B-1). Example i's t and eps come from `fold_in(rng, example_ids[i])`, so a
      batch split into micro-batches draws the same t and eps as the whole batch.
  """
  image, mask = batch['image'], batch['mask']
  b = image.shape[0]
  assert image.ndim == 4 and mask.shape == image.shape[:3] + (1,), (image.shape, mask.shape)
  if example_ids is None:
    example_ids = jnp.arange(b)
  assert example_ids.shape == (b,), (example_ids.shape, b)
  t_rng, noise_rng, dropout_rng = (jax.random.fold_in(rng, i) for i in range(3))
  per_example = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
  t = jax.vmap(lambda k: jax.random.randint(k, (), 0, tables.num_timesteps))(
      per_example(t_rng, example_ids))
  noise = jax.vmap(lambda k: jax.random.normal(k, mask.shape[1:], mask.dtype))(
      per_example(noise_rng, example_ids))
  # Dropout masks cannot be drawn per example; a micro-batch gets its own stream.
  dropout_rng = jax.random.fold_in(dropout_rng, example_ids[0])
  x_t = gaussian.q_sample(tables, mask, t, noise)

  model_in = jnp.concatenate([image, x_t], axis=-1)
  out = networks.unet.apply({'params': params['unet']}, model_in, t, train=train,
                            rngs={'dropout': dropout_rng})
  if args.prediction == 'x0':
    x0_raw = out[..., :1]
    mse = jnp.mean(jnp.square(mask - x0_raw), axis=(1, 2, 3))
    eps_hat = gaussian.predict_eps_from_xstart(tables, x_t, t, x0_raw)
  else:
    eps_hat = out[..., :1]
    mse = jnp.mean(jnp.square(noise - eps_hat), axis=(1, 2, 3))

  if args.variance == 'learned_range':
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps_hat), out[..., 1:]], axis=-1)
    vlb = tables.num_timesteps * gaussian.vlb_terms(
        tables, mask, x_t, t, frozen, args.variance)
  else:
    vlb = jnp.zeros((b,), jnp.float32)

  amn_mask = mask if args.amn_input == 'clean' else x_t
  if args.acn_input == 'x0':
    x0_hat = x0_raw if args.prediction == 'x0' else gaussian.predict_xstart_from_eps(
        tables, x_t, t, eps_hat)
    acn_mask = jnp.clip(x0_hat, -1., 1.)
  else:
    acn_mask = eps_hat
  q_mean, q_log_sigma = networks.amn.apply(
      {'params': params['amn']}, jnp.concatenate([image, amn_mask], axis=-1))
  p_mean, p_log_sigma = networks.acn.apply(
      {'params': params['acn']}, jnp.concatenate([image, acn_mask], axis=-1))
  kl = kl_diag_gaussians(q_mean, q_log_sigma, p_mean, p_log_sigma)

  terms = {'mse': mse, 'vlb': vlb, 'kl': kl}
  terms['loss'] = weighted_loss(terms, args)
  return terms


def weighted_loss(terms: dict[str, jax.Array], args: ObjectiveArgs) -> jax.Array:
  """L = mse + lambda * vlb + beta * kl, per example [B]. The only place terms are weighted."""
  return terms['mse'] + args.vlb_weight * terms['vlb'] + args.kl_weight * terms['kl']
