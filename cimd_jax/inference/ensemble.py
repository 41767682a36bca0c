"""The trained UNet as a denoiser for the samplers, and ensembles of N masks per image."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cimd_jax.diffusion import gaussian
from cimd_jax.diffusion import samplers
from cimd_jax.diffusion.args import DiffusionArgs
from cimd_jax.diffusion.schedule import DiffusionTables
from cimd_jax.inference.args import SamplingArgs
from cimd_jax.models import conv
from cimd_jax.models.build import ModelArgs, build_unet
from cimd_jax.utils.errors import DivergenceError

EnsembleFn = Callable[[Any, np.ndarray, jax.Array, int], np.ndarray]


def denoiser(model: ModelArgs, image_size: int, diffusion: DiffusionArgs,
             clip_variance: bool = True, variance_transfer: str = 'interpolate',
             sampler_tables: DiffusionTables | None = None
             ) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """apply_fn(params, x [R, H, W, C+1], t_orig int [R]) -> eps-form output [R, H, W, 2|1].

  `t_orig` indexes the full T-step tables of `diffusion`; with prediction 'x0' the
  UNet's x_0 output is turned into eps there (gaussian.as_eps_output). With
  `clip_variance` the learned-range channel v is clipped to [-1, 1], so that
  log sigma^2 = frac log beta + (1 - frac) log beta_tilde interpolates (frac in
  [0, 1]) and never extrapolates (docs/samplers.md: an out-of-range v, seen up to 13
  on the synthetic demo, gives a variance of order 1 in the last respaced steps).
  With `variance_transfer='x0_uncertainty'` (and `clip_variance` False) v is
  instead re-expressed for the steps of `sampler_tables` by `variance_transfer_fn`.
  """
  unet = build_unet(model, image_size)
  train_tables = diffusion.tables()
  transfer = None
  if variance_transfer == 'x0_uncertainty':
    assert sampler_tables is not None and not clip_variance
    transfer = variance_transfer_fn(train_tables, sampler_tables)

  def apply_fn(params, x, t):
    out = unet.apply({'params': params}, x, t, train=False)
    out = gaussian.as_eps_output(train_tables, out, x[..., -1:], t, diffusion.prediction)
    if out.shape[-1] == 2 and transfer is not None:
      out = jnp.concatenate([out[..., :1], transfer(out[..., 1:], t)], axis=-1)
    elif clip_variance and out.shape[-1] == 2:
      out = jnp.concatenate([out[..., :1], jnp.clip(out[..., 1:], -1.0, 1.0)], axis=-1)
    return out
  return apply_fn


def variance_transfer_fn(train_tables: DiffusionTables, sampler_tables: DiffusionTables
                         ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(v [R, H, W, 1] for the training chain, t_orig int [R]) -> v' [R, H, W, 1] for
  the sampler's step at t_orig (t_orig must be one of sampler_tables' kept steps).

  The learned range was trained for one step of the training chain: its variance
  is sigma^2 = exp(f log beta_t + (1 - f) log beta_tilde_t), f = (v + 1) / 2. The
  VLB-optimal step variance is beta_tilde_t + coef1_t^2 Var[x_0 | x_t] (Bao et al.
  2022, Analytic-DPM), so the model's sigma^2 says
  Var[x_0 | x_t] = (sigma^2 - beta_tilde_t) / coef1_t^2, clipped to [0, 1] (a mask
  lies in [-1, 1], whose variance is at most 1; v <= 1 always implies at most
  1 - alpha_bar_t). The sampler's step from t_orig to the previous kept step has
  its own beta_tilde' and coef1'; its variance beta_tilde' + coef1'^2 Var[x_0 | x_t]
  is returned as the v' that the learned range of `sampler_tables` maps to it. On
  the full chain this is v itself wherever the implied Var[x_0 | x_t] is in [0, 1].
  """
  step_of = np.zeros(train_tables.num_timesteps, np.int32)
  step_of[np.asarray(sampler_tables.timestep_map)] = np.arange(sampler_tables.num_timesteps)
  step_of = jnp.asarray(step_of)

  def at(table, idx, ndim):
    return table[idx].reshape((-1,) + (1,) * (ndim - 1))

  def transfer(v, t):
    n = v.ndim
    var_x0 = jnp.clip(gaussian.x0_variance_from_v(train_tables, v, t), 0.0, 1.0)
    k = step_of[t]
    s_log_beta = at(jnp.log(sampler_tables.betas), k, n)
    s_log_tilde = at(sampler_tables.posterior_log_variance_clipped, k, n)
    s_coef1 = at(sampler_tables.posterior_mean_coef1, k, n)
    s_log_var = jnp.log(jnp.exp(s_log_tilde) + jnp.square(s_coef1) * var_x0)
    # Where beta' = beta_tilde' to float32 precision (large t of a long chain) every v
    # gives the same variance; v' = 0 there avoids dividing by zero.
    width = s_log_beta - s_log_tilde
    wide = jnp.abs(width) > 1e-6
    return jnp.where(wide, 2.0 * (s_log_var - s_log_tilde) / jnp.where(wide, width, 1.0)
                     - 1.0, jnp.zeros_like(v))
  return transfer


def _divergence_hint(sampling: SamplingArgs, diffusion: DiffusionArgs) -> str:
  """What to try when an ensemble is not finite: the unclipped learned variance
  first where it was in use (respaced DDPM steps extrapolate it: docs/samplers.md)."""
  if (sampling.sampler == 'ddpm' and not sampling.clip_variance
      and sampling.variance_transfer == 'interpolate' and diffusion.variance == 'learned_range'):
    return ('the learned variance, unclipped, left [beta_tilde_t, beta_t]; sample with '
            '--config.sampling.clip_variance=True, or with clip_variance=False and '
            "--config.sampling.variance_transfer=x0_uncertainty (models trained with "
            'model.detach_variance=True sampled unclipped at DDPM-50: docs/samplers.md)')
  return ('its weights have diverged or do not fit this sampler; retrain with a lower '
          'training.learning_rate, or sample an earlier step with '
          '--config.sampling.checkpoint=STEP')


def make_ensemble_fn(model: ModelArgs, image_size: int, diffusion: DiffusionArgs,
                     sampling: SamplingArgs, num_samples: int | None = None) -> EnsembleFn:
  """(params, images [B, H, W, C] in [-1, 1], key, first_image_index) -> masks bool
  [B, N, H, W].

  N is `num_samples` (default sampling.num_samples); the sampler, its steps, eta,
  variance clipping and memory bound come from `sampling`. Image b's masks depend
  only on (key, first_image_index + b), not on how images are grouped into calls.
  Raises DivergenceError when the model's samples are not finite (a diverged model
  must not be scored as if it drew empty masks).
  """
  n = sampling.num_samples if num_samples is None else int(num_samples)
  tables = sampling.tables(diffusion.betas())
  apply_fn = denoiser(model, image_size, diffusion, sampling.clip_variance,
                      sampling.variance_transfer, tables)
  options = conv.compiler_options(model.conv_impl)

  def draw(params, images, key, first_image_index):
    x0 = samplers.sample_ensemble(
        apply_fn, params, tables, jnp.asarray(images, jnp.float32), key, n,
        sampling.max_batch, first_image_index=first_image_index, sampler=sampling.sampler,
        variance=diffusion.variance, eta=sampling.ddim_eta, compiler_options=options)
    if not bool(jnp.all(jnp.isfinite(x0))):
      raise DivergenceError(
          'the model produced non-finite samples (NaN/inf): ' + _divergence_hint(
              sampling, diffusion))
    return np.asarray(samplers.masks_from_x0(x0))[..., 0]
  return draw
