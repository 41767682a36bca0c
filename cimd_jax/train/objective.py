"""The CIMD objective: L = L_simple + lambda * L_vlb + beta * KL(Q(z|b, x_b) || P(z|b, x_hat_b)).

Per example (Rahman et al., CVPR 2023, eq. 8; improved DDPM for the hybrid loss):
  * t ~ Uniform{0..T-1}, eps ~ N(0, I), x_t = q_sample(x_b, t, eps)
  * the UNet sees concat(b, x_t) and predicts (eps_hat, v) -- or (x0_hat, v) with
    diffusion.prediction='x0' (an option of improved DDPM); eps_hat is then derived
  * L_simple = mean over pixels of (eps - eps_hat)^2 (or of (x_b - x0_hat)^2)
  * L_vlb    = T * L_t (bits/dim) with the predicted mean detached, so it trains only
               the variance (the unbiased single-sample estimate of the full VLB; with
               lambda = 0.001 this is improved DDPM's hybrid loss)
  * Q = AMN(b, x_b) (or x_t), P = ACN(b, x_hat_0 clipped to [-1, 1]) (or eps_hat);
    KL(Q || P) summed over latent dimensions; zero when the ambiguity networks are
    off. Networks that the ambiguity mode freezes get no parameter gradient.
All terms are returned per example, and `weighted_loss` is the one place that
weights and sums them.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cimd_jax.diffusion import gaussian
from cimd_jax.diffusion.args import DiffusionArgs
from cimd_jax.diffusion.schedule import DiffusionTables
from cimd_jax.models.build import Networks
from cimd_jax.models.latent import kl_diag_gaussians
from cimd_jax.train.state import FROZEN_NETWORKS
from cimd_jax.utils import config_args as ca

TERMS = ('mse', 'vlb', 'kl')


@dataclasses.dataclass(frozen=True)
class ObjectiveArgs:
  """The `objective` config group: weights and inputs of the CIMD objective.

  vlb_weight: lambda (improved DDPM: 0.001); the VLB term trains only the variance.
  kl_weight: beta, the weight of KL(AMN || ACN).
  amn_input: what the AMN sees besides the image: 'clean' expert mask | 'noisy' x_t.
  acn_input: what the ACN sees: 'x0' (the clipped x_0 prediction, the paper's text) |
    'eps' (the eps prediction, as the official code feeds it).
  mse_weighting: the weight of the mean-squared term over t: 'uniform' (the paper's,
    DDPM's "simple" loss in the predicted quantity) | 'truncated_snr' (Salimans & Ho
    2022, §4: max(||x_0 - x_hat_0||^2, ||eps - eps_hat||^2), i.e. the eps loss weighted
    by max(1, 1 / SNR_t) or the x_0 loss by max(1, SNR_t), SNR_t = abar_t / (1 - abar_t)).
  """
  vlb_weight: float = 0.001
  kl_weight: float = 1.0
  amn_input: str = 'clean'
  acn_input: str = 'x0'
  mse_weighting: str = 'uniform'

  def __post_init__(self):
    ca.check_float('objective.vlb_weight', self.vlb_weight, 0.0)
    ca.check_float('objective.kl_weight', self.kl_weight, 0.0)
    ca.check_choice('objective.amn_input', self.amn_input, ('clean', 'noisy'))
    ca.check_choice('objective.acn_input', self.acn_input, ('x0', 'eps'))
    ca.check_choice('objective.mse_weighting', self.mse_weighting,
                    ('uniform', 'truncated_snr'))


# The official code's KL weight (its KL divided by 1000, weight 1): the only weight at
# which the frozen networks' KL was measured not to stop the UNet learning.
OFFICIAL_KL_WEIGHT = 0.001


def ambiguity_warning(objective: ObjectiveArgs, ambiguity: str) -> str | None:
  """A one-line warning for an objective measured not to train, else None.

  With both networks frozen at random weights ('frozen') their KL cannot fall (≈ 11
  nats on the demo data, from their different output scales); above the official
  weight its gradient through x̂₀ outweighs the mask loss, and on the demo the UNet
  did not learn at kl_weight=1 (MSE 1.03 after 1250 steps; docs/ablations.md).
  """
  if ambiguity == 'frozen' and objective.kl_weight > OFFICIAL_KL_WEIGHT:
    return (f'objective.kl_weight={objective.kl_weight:g} with model.ambiguity=\'frozen\': '
            'the KL of two random networks cannot fall, and at this weight it kept the UNet '
            'from learning on the demo data (docs/ablations.md); the official code uses '
            f'{OFFICIAL_KL_WEIGHT:g} (--config.objective.kl_weight={OFFICIAL_KL_WEIGHT:g})')
  return None


def draw_t_and_noise(rng: jax.Array, example_ids: jax.Array, num_timesteps: int,
                     mask_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Each example's t int32 [B] and eps [B, *mask_shape].

  Example i's t is `randint(fold_in(fold_in(rng, 0), example_ids[i]), 0, T)` and its
  eps `normal(fold_in(fold_in(rng, 1), example_ids[i]))`, so a batch split into
  micro-batches draws the same t and eps as the whole batch.
  """
  t_rng, noise_rng = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)
  per_example = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
  t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_timesteps))(
      per_example(t_rng, example_ids))
  noise = jax.vmap(lambda k: jax.random.normal(k, mask_shape, jnp.float32))(
      per_example(noise_rng, example_ids))
  return t, noise


def loss_terms(params: dict[str, Any], networks: Networks, tables: DiffusionTables,
               batch: dict[str, jax.Array], rng: jax.Array, args: ObjectiveArgs,
               diffusion: DiffusionArgs, train: bool = True,
               example_ids: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-example loss terms `mse` (weighted over t by `args.mse_weighting`), `vlb`,
  `kl`, their weighted sum `loss`, and the drawn timestep `t`, each [B].

  Args:
    params: {'unet', 'amn', 'acn'} parameter trees ('unet' only when off).
    networks: from models.build.build_networks (carries the ambiguity mode).
    tables: the full T-step tables of `diffusion`.
    batch: 'image' f32 [B, H, W, C] in [-1, 1], 'mask' f32 [B, H, W, 1] in {-1, +1}.
    rng: PRNG key for t, eps (see `draw_t_and_noise`) and dropout.
    example_ids: int [B], each example's index in the global batch (default 0..B-1).
  """
  image, mask = batch['image'], batch['mask']
  b = image.shape[0]
  assert image.ndim == 4 and mask.shape == image.shape[:3] + (1,), (image.shape, mask.shape)
  if example_ids is None:
    example_ids = jnp.arange(b)
  assert example_ids.shape == (b,), (example_ids.shape, b)
  t, noise = draw_t_and_noise(rng, example_ids, tables.num_timesteps, mask.shape[1:])
  # Dropout masks cannot be drawn per example; a micro-batch gets its own stream.
  dropout_rng = jax.random.fold_in(jax.random.fold_in(rng, 2), example_ids[0])
  x_t = gaussian.q_sample(tables, mask, t, noise)

  model_in = jnp.concatenate([image, x_t], axis=-1)
  out = networks.unet.apply({'params': params['unet']}, model_in, t, train=train,
                            rngs={'dropout': dropout_rng})
  if diffusion.prediction == 'x0':
    x0_raw = out[..., :1]
    mse = jnp.mean(jnp.square(mask - x0_raw), axis=(1, 2, 3))
    eps_hat = gaussian.predict_eps_from_xstart(tables, x_t, t, x0_raw)
  else:
    eps_hat = out[..., :1]
    mse = jnp.mean(jnp.square(noise - eps_hat), axis=(1, 2, 3))
  mse = mse * mse_weight(tables, t, diffusion.prediction, args.mse_weighting)

  if diffusion.variance == 'learned_range':
    frozen_mean = jnp.concatenate([jax.lax.stop_gradient(eps_hat), out[..., 1:]], axis=-1)
    vlb = tables.num_timesteps * gaussian.vlb_terms(
        tables, mask, x_t, t, frozen_mean, diffusion.variance)
  else:
    vlb = jnp.zeros((b,), jnp.float32)

  if networks.amn is None:
    kl = jnp.zeros((b,), jnp.float32)
  else:
    latent_params = {name: (jax.lax.stop_gradient(params[name])
                            if name in FROZEN_NETWORKS[networks.ambiguity] else params[name])
                     for name in ('amn', 'acn')}
    amn_mask = mask if args.amn_input == 'clean' else x_t
    if args.acn_input == 'x0':
      x0_hat = x0_raw if diffusion.prediction == 'x0' else gaussian.predict_xstart_from_eps(
          tables, x_t, t, eps_hat)
      acn_mask = jnp.clip(x0_hat, -1., 1.)
    else:
      acn_mask = eps_hat
    q_mean, q_log_sigma = networks.amn.apply(
        {'params': latent_params['amn']}, jnp.concatenate([image, amn_mask], axis=-1))
    p_mean, p_log_sigma = networks.acn.apply(
        {'params': latent_params['acn']}, jnp.concatenate([image, acn_mask], axis=-1))
    kl = kl_diag_gaussians(q_mean, q_log_sigma, p_mean, p_log_sigma)

  terms = {'mse': mse, 'vlb': vlb, 'kl': kl}
  terms['loss'] = weighted_loss(terms, args)
  terms['t'] = t
  return terms


def mse_weight(tables: DiffusionTables, t: jax.Array, prediction: str, weighting: str
               ) -> jax.Array:
  """The per-example weight [B] of the mean-squared term in `prediction`'s units, so
  that 'truncated_snr' gives max(x_0 error, eps error) (objective.mse_weighting)."""
  if weighting == 'uniform':
    return jnp.ones(t.shape, jnp.float32)
  abar = tables.alphas_cumprod[t]
  snr = abar / (1.0 - abar)
  return jnp.maximum(1.0, snr if prediction == 'x0' else 1.0 / snr)


def weighted_loss(terms: dict[str, jax.Array], args: ObjectiveArgs) -> jax.Array:
  """L = mse + lambda * vlb + beta * kl, per example [B]. The only place terms are weighted."""
  return terms['mse'] + args.vlb_weight * terms['vlb'] + args.kl_weight * terms['kl']
