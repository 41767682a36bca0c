"""The trained UNet as a denoiser for the samplers, and ensembles of N masks per image."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cimd_jax.diffusion import gaussian
from cimd_jax.diffusion import samplers
from cimd_jax.diffusion.args import DiffusionArgs
from cimd_jax.inference.args import SamplingArgs
from cimd_jax.models import conv
from cimd_jax.models.build import ModelArgs, build_unet
from cimd_jax.utils.errors import DivergenceError

EnsembleFn = Callable[[Any, np.ndarray, jax.Array, int], np.ndarray]


def denoiser(model: ModelArgs, image_size: int, diffusion: DiffusionArgs,
             clip_variance: bool = True
             ) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """apply_fn(params, x [R, H, W, C+1], t_orig int [R]) -> eps-form output [R, H, W, 2|1].

  `t_orig` indexes the full T-step tables of `diffusion`; with prediction 'x0' the
  UNet's x_0 output is turned into eps there (gaussian.as_eps_output). With
  `clip_variance` the learned-range channel v is clipped to [-1, 1], so that
  log sigma^2 = frac log beta + (1 - frac) log beta_tilde interpolates (frac in
  [0, 1]) and never extrapolates (docs/samplers.md: an out-of-range v, seen up to 13
  on the synthetic demo, gives a variance of order 1 in the last respaced steps).
  """
  unet = build_unet(model, image_size)
  train_tables = diffusion.tables()

  def apply_fn(params, x, t):
    out = unet.apply({'params': params}, x, t, train=False)
    out = gaussian.as_eps_output(train_tables, out, x[..., -1:], t, diffusion.prediction)
    if clip_variance and out.shape[-1] == 2:
      out = jnp.concatenate([out[..., :1], jnp.clip(out[..., 1:], -1.0, 1.0)], axis=-1)
    return out
  return apply_fn


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
  apply_fn = denoiser(model, image_size, diffusion, sampling.clip_variance)
  options = conv.compiler_options(model.conv_impl)

  def draw(params, images, key, first_image_index):
    x0 = samplers.sample_ensemble(
        apply_fn, params, tables, jnp.asarray(images, jnp.float32), key, n,
        sampling.max_batch, first_image_index=first_image_index, sampler=sampling.sampler,
        variance=diffusion.variance, eta=sampling.ddim_eta, compiler_options=options)
    if not bool(jnp.all(jnp.isfinite(x0))):
      raise DivergenceError(
          'the model produced non-finite samples (NaN/inf): its weights have diverged or '
          'do not fit this sampler; retrain with a lower training.learning_rate, or '
          'sample an earlier step with --config.sampling.checkpoint_step')
    return np.asarray(samplers.masks_from_x0(x0))[..., 0]
  return draw
