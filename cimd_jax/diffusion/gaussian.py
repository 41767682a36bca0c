"""Gaussian diffusion math as small pure functions over arrays (NHWC); over 250 lines
because each formula keeps its docstring with shapes next to it.

All functions take a `DiffusionTables` and step indices `t` int [B] into *those*
tables (for respaced tables that is the step index 0..K-1, not the original
timestep; the network is told `tables.timestep_map[t]`). Masks live in [-1, 1]
as `[B, H, W, 1]`; the functions accept any `[B, ...]` shape.

The reverse-process parametrisation follows improved DDPM (Nichol & Dhariwal 2021):
the network predicts eps and, for the 'learned_range' variance, a second channel v
with `log sigma^2 = frac * log beta_t + (1 - frac) * log beta_tilde_t`, `frac = (v+1)/2`.
"""

import math

import jax
import jax.numpy as jnp

from cimd_jax.diffusion.schedule import DiffusionTables

VARIANCES = ('learned_range', 'fixed_small', 'fixed_large')
# What the network's first output channel(s) predict: the noise (the paper) or x_0.
PREDICTIONS = ('eps', 'x0')


def _extract(arr: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """`arr[t]` shaped [B, 1, ..., 1] (ndim dims) to broadcast against a [B, ...] array.

  Args:
    arr: [T] per-step table.
    t: int [B] step indices into `arr`.
    ndim: rank of the array the result will broadcast against (4 for [B, H, W, 1]).
  """
  assert arr.ndim == 1, arr.shape
  assert t.ndim == 1, t.shape
  return arr[t].reshape((t.shape[0],) + (1,) * (ndim - 1))


def _check_batch(t: jax.Array, *xs: jax.Array) -> None:
  assert t.ndim == 1, t.shape
  for x in xs:
    assert x.ndim >= 1 and x.shape[0] == t.shape[0], (x.shape, t.shape)


def q_sample(tables: DiffusionTables, x_start: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I).

  Args:
    x_start: [B, H, W, 1] clean masks x_0.
    t: int [B] step indices.
    noise: [B, H, W, 1] standard normal eps.

  Returns:
    x_t [B, H, W, 1] = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps.
  """
  assert x_start.shape == noise.shape, (x_start.shape, noise.shape)
  _check_batch(t, x_start)
  n = x_start.ndim
  return (_extract(tables.sqrt_alphas_cumprod, t, n) * x_start
          + _extract(tables.sqrt_one_minus_alphas_cumprod, t, n) * noise)


def q_posterior_mean_variance(tables: DiffusionTables, x_start: jax.Array, x_t: jax.Array,
                              t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean and variance of the forward posterior q(x_{t-1} | x_t, x_0).

  Args:
    x_start: [B, H, W, 1] x_0.
    x_t: [B, H, W, 1].
    t: int [B] step indices.

  Returns:
    (mean, variance, log_variance_clipped), each [B, H, W, 1]:
    mean = coef1_t x_0 + coef2_t x_t, variance = beta_tilde_t (0 at t = 0), and
    log(beta_tilde) with the t = 0 entry replaced by log(beta_tilde_1).
  """
  assert x_start.shape == x_t.shape, (x_start.shape, x_t.shape)
  _check_batch(t, x_t)
  n = x_t.ndim
  mean = (_extract(tables.posterior_mean_coef1, t, n) * x_start
          + _extract(tables.posterior_mean_coef2, t, n) * x_t)
  var = jnp.broadcast_to(_extract(tables.posterior_variance, t, n), x_t.shape)
  log_var = jnp.broadcast_to(_extract(tables.posterior_log_variance_clipped, t, n), x_t.shape)
  return mean, var, log_var


def predict_xstart_from_eps(tables: DiffusionTables, x_t: jax.Array, t: jax.Array,
                            eps: jax.Array) -> jax.Array:
  """x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), all [B, H, W, 1]; t int [B]."""
  assert x_t.shape == eps.shape, (x_t.shape, eps.shape)
  _check_batch(t, x_t)
  n = x_t.ndim
  return (_extract(tables.sqrt_recip_alphas_cumprod, t, n) * x_t
          - _extract(tables.sqrt_recipm1_alphas_cumprod, t, n) * eps)


def predict_eps_from_xstart(tables: DiffusionTables, x_t: jax.Array, t: jax.Array,
                            pred_xstart: jax.Array) -> jax.Array:
  """eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t), all [B, H, W, 1]; t int [B]."""
  assert x_t.shape == pred_xstart.shape, (x_t.shape, pred_xstart.shape)
  _check_batch(t, x_t)
  n = x_t.ndim
  return ((_extract(tables.sqrt_recip_alphas_cumprod, t, n) * x_t - pred_xstart)
          / _extract(tables.sqrt_recipm1_alphas_cumprod, t, n))


def as_eps_output(tables: DiffusionTables, model_output: jax.Array, x_t: jax.Array,
                  t: jax.Array, prediction: str) -> jax.Array:
  """The network output with its first channel(s) expressed as eps.

  With prediction 'x0' the network's first channel(s) are an x_0 prediction, turned
  into eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t) so that everything downstream
  (posterior mean, VLB, samplers) stays eps-based; p_mean_variance recovers the same
  x_0. With 'eps' the output is returned unchanged.

  Args:
    model_output: [B, H, W, C] or [B, H, W, 2C] (with v).
    x_t: [B, H, W, C]; t: int [B] indices into `tables`.
  """
  if prediction not in PREDICTIONS:
    raise ValueError(f'prediction must be one of {PREDICTIONS}, got {prediction!r}')
  if prediction == 'eps':
    return model_output
  c = x_t.shape[-1]
  eps = predict_eps_from_xstart(tables, x_t, t, model_output[..., :c])
  return jnp.concatenate([eps, model_output[..., c:]], axis=-1)


def p_mean_variance(tables: DiffusionTables, model_output: jax.Array, x_t: jax.Array,
                    t: jax.Array, variance: str,
                    clip_denoised: bool = True) -> dict[str, jax.Array]:
  """The reverse step p(x_{t-1} | x_t) from the network's output.

  Args:
    model_output: [B, H, W, 2] = (eps, v) for 'learned_range'; [B, H, W, 1] = eps
      (or [B, H, W, 2], whose v channel is then ignored) for the fixed variances.
    x_t: [B, H, W, 1].
    t: int [B] step indices into `tables`.
    variance: 'learned_range' (log var = frac log beta_t + (1 - frac) log beta_tilde_t,
      frac = (v + 1) / 2, beta_tilde clipped at t = 0), 'fixed_small' (beta_tilde,
      clipped at t = 0) or 'fixed_large' (beta_t, with beta_0 replaced by beta_tilde_1).
    clip_denoised: clip the x_0 prediction to [-1, 1] before forming the mean.

  Returns:
    dict of [B, H, W, 1] arrays: 'mean', 'variance', 'log_variance', 'pred_xstart'
    (clipped when asked), 'eps' (the network's raw eps).
  """
  if variance not in VARIANCES:
    raise ValueError(f'variance must be one of {VARIANCES}, got {variance!r}')
  c = x_t.shape[-1]
  assert model_output.shape[:-1] == x_t.shape[:-1], (model_output.shape, x_t.shape)
  _check_batch(t, x_t)
  n = x_t.ndim
  if variance == 'learned_range':
    assert model_output.shape[-1] == 2 * c, (model_output.shape, x_t.shape)
    eps, v = model_output[..., :c], model_output[..., c:]
    min_log = _extract(tables.posterior_log_variance_clipped, t, n)
    max_log = _extract(jnp.log(tables.betas), t, n)
    frac = (v + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
  else:
    assert model_output.shape[-1] in (c, 2 * c), (model_output.shape, x_t.shape)
    eps = model_output[..., :c]
    if variance == 'fixed_small':
      log_table = tables.posterior_log_variance_clipped
    else:
      # beta_t, with beta_0 replaced by beta_tilde_1 = exp(posterior_log_variance_clipped[0]).
      log_table = jnp.concatenate(
          [tables.posterior_log_variance_clipped[:1], jnp.log(tables.betas[1:])])
    log_var = jnp.broadcast_to(_extract(log_table, t, n), x_t.shape)
  pred_xstart = predict_xstart_from_eps(tables, x_t, t, eps)
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
  mean, _, _ = q_posterior_mean_variance(tables, pred_xstart, x_t, t)
  out = dict(mean=mean, variance=jnp.exp(log_var), log_variance=log_var,
             pred_xstart=pred_xstart, eps=eps)
  for k, val in out.items():
    assert val.shape == x_t.shape, (k, val.shape, x_t.shape)
  return out


def x0_variance_from_v(tables: DiffusionTables, v: jax.Array, t: jax.Array) -> jax.Array:
  """Var[x_0 | x_t] [B, H, W, C] that a learned-range v [B, H, W, C] at steps t int [B]
  implies, unclipped: (sigma_v^2 - beta_tilde_t) / coef1_t^2, with sigma_v^2 the
  variance `p_mean_variance` builds from v (the VLB's optimum is beta_tilde_t +
  coef1_t^2 E[(x_0 - x_hat_0)^2 | x_t]; Bao et al. 2022, Analytic-DPM)."""
  n = v.ndim
  log_beta = _extract(jnp.log(tables.betas), t, n)
  log_tilde = _extract(tables.posterior_log_variance_clipped, t, n)
  coef1 = _extract(tables.posterior_mean_coef1, t, n)
  frac = (v + 1.0) / 2.0
  model_var = jnp.exp(frac * log_beta + (1.0 - frac) * log_tilde)
  return (model_var - jnp.exp(log_tilde)) / jnp.square(coef1)


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array,
              logvar2: jax.Array) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

  All arguments broadcast together; the result has their broadcast shape.
  """
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """Phi(x) by the tanh approximation 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
  """log P(x) of data quantised to 256 levels in [-1, 1] under N(means, exp(log_scales)^2).

  Each level x owns the bin [x - 1/255, x + 1/255]; the lowest level owns (-inf, ...]
  and the highest [..., +inf), so the 256 probabilities sum to 1. Binary masks in
  {-1, +1} are the two edge levels.

  Args:
    x: [B, H, W, 1] data in [-1, 1] on the 256-level grid.
    means: [B, H, W, 1].
    log_scales: [B, H, W, 1] log standard deviations (0.5 * log variance).

  Returns:
    [B, H, W, 1] log-probabilities in nats.
  """
  assert x.shape == means.shape == log_scales.shape, (x.shape, means.shape, log_scales.shape)
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_bits(x: jax.Array) -> jax.Array:
  """Mean over all but the batch axis, nats -> bits: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim))) / math.log(2.0)


def vlb_terms(tables: DiffusionTables, x_start: jax.Array, x_t: jax.Array, t: jax.Array,
              model_output: jax.Array, variance: str,
              clip_denoised: bool = False) -> jax.Array:
  """Per-example variational bound term L_t in bits per dimension, [B].

  L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL
  -log p(x_0 | x_1) (discretised Gaussian, 256 levels) at t = 0; both averaged over
  pixels and divided by log 2. `T * L_t` with t uniform is an unbiased estimate of the
  full bound (prior term excluded; it has no parameters).

  In improved DDPM's hybrid loss the VLB trains *only the variance*: the caller must
  pass `model_output` whose eps channel already has `jax.lax.stop_gradient` applied
  (e.g. `concat([stop_gradient(eps_hat), v], -1)`); this function does not detach
  anything itself.

  Args:
    x_start: [B, H, W, 1] x_0 in [-1, 1].
    x_t: [B, H, W, 1] = q_sample(x_start, t, noise).
    t: int [B] step indices into `tables`.
    model_output: [B, H, W, 2] (eps, v) or [B, H, W, 1] eps, as in `p_mean_variance`.
    variance: 'learned_range' | 'fixed_small' | 'fixed_large'.
    clip_denoised: clip the x_0 prediction (improved DDPM trains without).

  Returns:
    float [B], bits per dimension.
  """
  assert x_start.shape == x_t.shape, (x_start.shape, x_t.shape)
  _check_batch(t, x_t)
  true_mean, _, true_log_var = q_posterior_mean_variance(tables, x_start, x_t, t)
  out = p_mean_variance(tables, model_output, x_t, t, variance, clip_denoised)
  kl = _mean_bits(normal_kl(true_mean, true_log_var, out['mean'], out['log_variance']))
  nll = _mean_bits(-discretized_gaussian_log_likelihood(
      x_start, out['mean'], 0.5 * out['log_variance']))
  result = jnp.where(t == 0, nll, kl)
  assert result.shape == (x_t.shape[0],), result.shape
  return result
