"""The reverse samplers against an independent float64 numpy re-implementation, and
Monte-Carlo checks against Bayes' rule on Gaussian data.

The reference (`reference_sample`) is written from the papers' formulas, not from
cimd_jax's code or tables:
  * respacing (improved DDPM, sec. 4): keep steps s_0 < ... < s_{K-1}, new betas
    1 - abar[s_k] / abar[s_{k-1}] (abar[s_{-1}] = 1); the network is told s_k;
  * DDPM (Ho et al. 2020, eq. 6-7): x_0 prediction (x_t - sqrt(1 - abar) eps) / sqrt(abar),
    posterior mean beta sqrt(abar_prev) / (1 - abar) x_0 + (1 - abar_prev) sqrt(alpha)
    / (1 - abar) x_t, posterior variance beta_tilde = beta (1 - abar_prev) / (1 - abar);
  * variances: fixed_small beta_tilde, fixed_large beta, learned_range
    (improved DDPM eq. 15) log s2 = frac log beta + (1 - frac) log beta_tilde with
    frac = (v + 1) / 2, beta_tilde at step 0 replaced by beta_tilde at step 1;
  * DDIM (Song et al. eq. 12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps
    + s z, s = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev), with
    eps re-derived from the (clipped) x_0 prediction.
The network is a t-DEPENDENT toy model evaluated in numpy (float64) on the reference
side and in jax (float32) inside the sampler's scan; it records every (t, x_t) it is
called with, so the WHOLE trajectory of the scan (every step's state and the timestep
the network was told) is compared with the reference, not only the end point (a
stochastic sampler's end point forgets its early steps). Both sides use the same noise,
drawn here from the samplers' documented contract: x_T of row r =
normal(fold_in(row_key, 2**31 - 1)), the noise of step i = normal(fold_in(row_key, i)).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cimd_jax.diffusion import samplers
from cimd_jax.diffusion import schedule

T = 50
H = W = 5
ROWS = 3
X_T_FOLD = 2**31 - 1   # from the samplers' documented noise contract
TOL = 1e-4


def linear_betas(num_timesteps):
  """Ho et al.'s linear schedule rescaled to T steps (improved DDPM), written here."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps)


BETAS = linear_betas(T)
ABAR = np.cumprod(1.0 - BETAS)   # float64, the ORIGINAL schedule's alpha_bar


def kept_steps(steps):
  """The original steps a spacing keeps: all T for '', K evenly spaced (rounded,
  both ends included) for 'K', every (T // K)-th from 0 for 'ddimK'."""
  if not steps:
    return list(range(T))
  if steps.startswith('ddim'):
    k = int(steps[4:])
    return list(range(0, T, T // k))[:k]
  return sorted(set(int(s) for s in np.round(np.linspace(0, T - 1, int(steps)))))


# ------------------------------------------------------------------ the toy model
DATA_STD = 0.35


def toy_model(xp, abar, x, t):
  """(eps, v) from concat(image, x_t) and the ORIGINAL timestep t [R].

  The exact E[eps | x_t] for data x_0 ~ N(image, DATA_STD^2), plus a t-dependent bias:
    eps = sqrt(1 - abar_t) (x_t - sqrt(abar_t) image) / (abar_t DATA_STD^2 + 1 - abar_t)
          + 0.3 tanh(0.7 x_t + 1.5 sin(0.37 t) - 0.3),
    v   = tanh(0.6 x_t - 0.4 image + 1.2 cos(0.23 t)).
  Samples stay near [-1, 1] (clipping does not hide differences), DDIM with eta = 0
  maps x_T to x_0 one-to-one, and the output depends on t at O(1) through abar_t and
  the sin / cos terms: telling it the respaced index instead of the original step
  changes it a lot. `xp` is numpy (reference, float64 `abar`) or jax.numpy (sampler).
  """
  img, xt = x[..., :1], x[..., 1:]
  ab = abar[t].reshape((-1, 1, 1, 1))
  tf = xp.asarray(t).astype(xt.dtype).reshape((-1, 1, 1, 1))
  eps = (xp.sqrt(1.0 - ab) * (xt - xp.sqrt(ab) * img) / (ab * DATA_STD**2 + 1.0 - ab)
         + 0.3 * xp.tanh(0.7 * xt + 1.5 * xp.sin(0.37 * tf) - 0.3))
  v = xp.tanh(0.6 * xt - 0.4 * img + 1.2 * xp.cos(0.23 * tf))
  return xp.concatenate([eps, v], axis=-1)


def numpy_toy(x, t):
  """The toy model on the reference side (float64)."""
  return toy_model(np, ABAR, x, t)


TOY_PARAMS = {'abar': jnp.asarray(ABAR, jnp.float32)}
CALLS = []   # (t [R], x_t [R, H, W, 1]) of every call of `jax_toy`, in order


def _record(t, x_t):
  CALLS.append((np.asarray(t), np.asarray(x_t, np.float64)))


def jax_toy(params, x, t):
  """The toy model as a sampler `apply_fn` (params = TOY_PARAMS); records each call."""
  assert t.dtype == jnp.int32 and t.shape == x.shape[:1]
  jax.debug.callback(_record, t, x[..., 1:], ordered=True)
  return toy_model(jnp, params['abar'], x, t)


# `samplers.sample` / `reverse_step` jitted like `samplers.sample_jit`, but compiled
# with XLA's backend optimisations off: the programs are tiny, and this cuts each
# compilation ~3x on a busy CPU (the maths, hence what is tested, is unchanged).
_FAST = {'xla_backend_optimization_level': 0}
_STATIC = ('apply_fn', 'sampler', 'variance', 'clip_denoised')
sample_fast = jax.jit(samplers.sample, static_argnames=_STATIC, compiler_options=_FAST)
reverse_step_fast = jax.jit(samplers.reverse_step, static_argnames=_STATIC,
                            compiler_options=_FAST)


def _split_fast(seed, num):
  """`jax.random.split(jax.random.key(seed), num)`, compiled like the samplers."""
  return jax.jit(lambda k: jax.random.split(k, num), compiler_options=_FAST)(
      jax.random.key(seed))


def _inputs(seed=0):
  """Conditioning images [R, H, W, 1] (numpy float64) and row keys [R]."""
  rng = np.random.default_rng(seed)
  image = rng.uniform(-0.6, 0.6, (ROWS, H, W, 1))
  return image, _split_fast(seed + 11, ROWS)


@functools.lru_cache(maxsize=None)
def _row_noise_all(seed):
  """(x_T [R, H, W, 1], noise [T, R, H, W, 1]) for `_inputs(seed)`'s keys, from the
  documented per-row contract; step i's noise does not depend on the step count."""
  keys = _inputs(seed)[1]

  @functools.partial(jax.jit, compiler_options=_FAST)
  def draw(keys):
    def normal(key, fold):
      return jax.random.normal(jax.random.fold_in(key, fold), (H, W, 1), jnp.float32)
    x_big_t = jax.vmap(lambda k: normal(k, X_T_FOLD))(keys)
    noise = jax.vmap(lambda i: jax.vmap(lambda k: normal(k, i))(keys))(jnp.arange(T))
    return x_big_t, noise

  x_big_t, noise = draw(keys)
  return np.asarray(x_big_t, np.float64), np.asarray(noise, np.float64)


def row_noise(seed, num_steps):
  """x_T and the noise of steps 0..num_steps-1 for `_inputs(seed)`."""
  x_big_t, noise = _row_noise_all(seed)
  return x_big_t, noise[:num_steps]


# ------------------------------------------------------------------ the reference
def reference_tables(kept):
  """float64 (abar, abar_prev, beta, beta_tilde clipped) [K] of the process over `kept`."""
  abar = ABAR[np.asarray(kept)]
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  beta = 1.0 - abar / abar_prev
  beta_tilde = beta * (1.0 - abar_prev) / (1.0 - abar)
  beta_tilde_clipped = np.concatenate([[beta_tilde[1]], beta_tilde[1:]])
  return abar, abar_prev, beta, beta_tilde_clipped


def reference_step(model, x, image, t_orig, k, noise_k, tabs, *, sampler, variance, eta,
                   clip):
  """One reverse step from step index k (network told t_orig), float64 -> x_{k-1}."""
  abar, abar_prev, beta, bt = (a[k] for a in tabs)
  out = model(np.concatenate([image, x], axis=-1), np.full(x.shape[0], t_orig))
  assert out.shape == x.shape[:-1] + (2,)
  eps, v = out[..., :1], out[..., 1:]
  x0 = (x - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
  if clip:
    x0 = np.clip(x0, -1.0, 1.0)
  keep_noise = 1.0 if k > 0 else 0.0
  if sampler == 'ddpm':
    mean = (beta * np.sqrt(abar_prev) / (1.0 - abar) * x0
            + (1.0 - abar_prev) * np.sqrt(1.0 - beta) / (1.0 - abar) * x)
    if variance == 'fixed_small':
      log_var = np.log(bt)
    elif variance == 'fixed_large':
      log_var = np.log(beta) if k > 0 else np.log(bt)
    else:
      frac = (v + 1.0) / 2.0
      log_var = frac * np.log(beta) + (1.0 - frac) * np.log(bt)
    return mean + keep_noise * np.exp(0.5 * log_var) * noise_k
  eps_used = (x - np.sqrt(abar) * x0) / np.sqrt(1.0 - abar)
  sigma = eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar)) * np.sqrt(1.0 - abar / abar_prev)
  return (np.sqrt(abar_prev) * x0 + np.sqrt(1.0 - abar_prev - sigma**2) * eps_used
          + keep_noise * sigma * noise_k)


def reference_sample(model, kept, image, x_big_t, noise, *, sampler, variance, eta, clip):
  """The whole reverse loop, float64: returns [x_K, x_{K-1}, ..., x_0] (x_K = x_T)."""
  tabs = reference_tables(kept)
  xs = [np.asarray(x_big_t, np.float64)]
  for k in reversed(range(len(kept))):
    xs.append(reference_step(model, xs[-1], image, kept[k], k, noise[k], tabs,
                             sampler=sampler, variance=variance, eta=eta, clip=clip))
  return xs


def tables_for(steps, sampler):
  """The sampler's tables for a spacing (DDIM spacings are allowed for DDPM here)."""
  if steps.startswith('ddim') and sampler == 'ddpm':
    return schedule.respaced_tables(BETAS, steps)
  tables, kind = samplers.sampler_from_name(BETAS, steps, sampler)
  assert kind == sampler
  return tables


# ------------------------------------------------------------------ tests
def test_reference_spacing_matches_timestep_map():
  """The reference's kept steps are the tables' timestep_map (otherwise the trajectory
  comparisons below would compare different processes)."""
  for steps, sampler in (('', 'ddpm'), ('10', 'ddpm'), ('7', 'ddpm'), ('ddim10', 'ddim')):
    tables, _ = samplers.sampler_from_name(BETAS, steps, sampler)
    np.testing.assert_array_equal(np.asarray(tables.timestep_map), kept_steps(steps))


# (steps, sampler, variance, clip_denoised, etas). The compiled sampler depends only on
# (step count, sampler, variance, clip), so '10' and 'ddim10' tables share a
# compilation, and so do all etas: 7 compilations cover every case.
CASES = [
    ('', 'ddpm', 'learned_range', False, (0.0,)),
    ('10', 'ddpm', 'learned_range', False, (0.0,)),
    ('ddim10', 'ddpm', 'learned_range', False, (0.0,)),
    ('10', 'ddpm', 'fixed_small', False, (0.0,)),
    ('10', 'ddpm', 'fixed_large', False, (0.0,)),
    ('7', 'ddpm', 'learned_range', True, (0.0,)),
    ('', 'ddim', 'learned_range', False, (0.0, 1.0)),
    ('ddim10', 'ddim', 'learned_range', True, (0.0, 0.5, 1.0)),
    ('10', 'ddim', 'learned_range', True, (0.0, 1.0)),
]


@pytest.mark.parametrize('steps,sampler,variance,clip,etas', CASES)
def test_sampler_trajectory_matches_numpy_reference(steps, sampler, variance, clip, etas):
  """The scan's whole trajectory equals the float64 reference's to 1e-4: at every step
  the network is told the original timestep s_k and sees the reference's x_k, and the
  returned x_0 is the reference's (same noise, same t-dependent toy model). Full /
  respaced DDPM with each variance, DDIM with eta 0 (1/2) and 1. Fails when the network
  is told the wrong timestep, when the noise is scaled, or when a mean / variance /
  sigma formula is wrong; the message names the first step that differs."""
  tables = tables_for(steps, sampler)
  kept = kept_steps(steps)
  image, keys = _inputs()
  x_big_t, noise = row_noise(0, len(kept))
  for eta in etas:
    ref = reference_sample(numpy_toy, kept, image, x_big_t, noise, sampler=sampler,
                           variance=variance, eta=eta, clip=clip)
    CALLS.clear()
    out = sample_fast(jax_toy, TOY_PARAMS, tables, jnp.asarray(image, jnp.float32), keys,
                      sampler=sampler, variance=variance, eta=jnp.float32(eta),
                      clip_denoised=clip)
    out = np.asarray(out, np.float64)
    jax.effects_barrier()
    assert len(CALLS) == len(kept), (len(CALLS), len(kept))
    for j, (t, x_t) in enumerate(CALLS):
      k = len(kept) - 1 - j   # the j-th call is step index k, which sees x_{k+1} = ref[j]
      where = f'eta={eta}: step index {k} (original step {kept[k]})'
      np.testing.assert_array_equal(t, np.full(ROWS, kept[k]), err_msg=where)
      np.testing.assert_allclose(x_t, ref[j], atol=TOL, rtol=TOL, err_msg=where)
    np.testing.assert_allclose(out, ref[-1], atol=TOL, rtol=TOL, err_msg=f'eta={eta}: x_0')
    assert np.all(np.isfinite(out)) and np.max(np.abs(out)) < 3.0


def test_trajectory_comparison_is_sensitive():
  """The references are not trivially matched: perturbing x_T by 0.01 moves the DDIM
  (eta = 0) end point, and scaling the step noise by 1.01 moves the DDPM one, by far
  more than the tolerance."""
  image, _ = _inputs()
  for steps, sampler in (('ddim10', 'ddim'), ('10', 'ddpm')):
    kept = kept_steps(steps)
    x_big_t, noise = row_noise(0, len(kept))
    kw = dict(sampler=sampler, variance='learned_range', eta=0.0, clip=True)
    ref = reference_sample(numpy_toy, kept, image, x_big_t, noise, **kw)[-1]
    if sampler == 'ddim':
      moved = reference_sample(numpy_toy, kept, image, x_big_t + 0.01, noise, **kw)[-1]
    else:
      moved = reference_sample(numpy_toy, kept, image, x_big_t, 1.01 * noise, **kw)[-1]
    assert np.max(np.abs(moved - ref)) > 10 * TOL, steps


# ------------------------------------------------ Monte Carlo against Bayes' rule
# Data x_0 ~ N(0, 1) per pixel. Then every x_t ~ N(0, 1), and since
# x_t = sqrt(alpha) x_{t-1} + sqrt(beta) n, Bayes' rule gives the exact reverse step
#   x_{t-1} | x_t ~ N(sqrt(alpha) x_t, beta)          (alpha = 1 - beta of that step),
# with E[eps | x_t] = sqrt(1 - abar_t) x_t and E[x_0 | x_t] = sqrt(abar_t) x_t.
# Neither fact uses the samplers' posterior formulas.

def gaussian_oracle(params, x, t):
  """E[eps | x_t] for N(0, 1) data at ORIGINAL timestep t; v = +1 (variance beta)."""
  abar = params['abar'][t].reshape((-1, 1, 1, 1))
  eps = jnp.sqrt(1.0 - abar) * x[..., 1:]
  return jnp.concatenate([eps, jnp.ones_like(eps)], axis=-1)


ORACLE_PARAMS = {'abar': jnp.asarray(ABAR, jnp.float32)}
MC_ROWS, MC_SIZE = 64, 16   # 16384 independent pixels per check


def _regress(x_prev, x_t):
  """(slope, its standard error, residual variance, n) of x_prev on x_t, pixelwise."""
  y = np.asarray(x_prev, np.float64).ravel()
  x = np.asarray(x_t, np.float64).ravel()
  slope = np.dot(x, y) / np.dot(x, x)
  resid = y - slope * x
  return slope, np.sqrt(resid.var() / np.dot(x, x)), resid.var(), y.size


@pytest.mark.parametrize('steps,sampler,k,eta', [
    ('10', 'ddpm', 5, 0.0),
    ('10', 'ddpm', 8, 0.0),
    ('ddim10', 'ddim', 6, 1.0),
    ('ddim10', 'ddim', 3, 0.5),
])
def test_one_step_mean_and_variance_bayes(steps, sampler, k, eta):
  """One reverse step at step index k from x_t ~ N(0, 1) with the exact-eps oracle.

  DDPM with variance beta (learned_range with v = +1) is the exact reverse step:
  x_prev = sqrt(alpha) x_t + N(0, beta). DDIM's step variance is eta^2 beta_tilde with
  beta_tilde = beta (1 - abar_prev) / (1 - abar) (Ho et al.'s posterior variance), and
  with eta = 1 its mean is the DDPM posterior mean, sqrt(alpha) x_t here. Regression of
  x_prev on x_t over 16384 pixels; tolerances 6 standard errors."""
  tables = tables_for(steps, sampler)
  kept = kept_steps(steps)
  abar, abar_prev = ABAR[kept[k]], ABAR[kept[k - 1]]
  beta = 1.0 - abar / abar_prev
  beta_tilde = beta * (1.0 - abar_prev) / (1.0 - abar)
  x_t = jnp.asarray(np.random.default_rng(3).standard_normal((MC_ROWS, MC_SIZE, MC_SIZE, 1)),
                    jnp.float32)
  keys = _split_fast(4, MC_ROWS)
  x_prev = reverse_step_fast(gaussian_oracle, ORACLE_PARAMS, tables, jnp.zeros_like(x_t),
                             keys, x_t, jnp.int32(k), sampler=sampler,
                             variance='learned_range', eta=jnp.float32(eta),
                             clip_denoised=False)
  slope, slope_se, var, n = _regress(x_prev, x_t)
  want_var = beta if sampler == 'ddpm' else eta**2 * beta_tilde
  if sampler == 'ddpm' or eta == 1.0:
    assert abs(slope - np.sqrt(1.0 - beta)) < 6 * slope_se, (slope, np.sqrt(1.0 - beta))
  assert abs(var / want_var - 1.0) < 6 * np.sqrt(2.0 / n), (var, want_var)


@pytest.mark.parametrize('steps', ['10', 'ddim10'])
def test_full_ddpm_chain_keeps_the_gaussian_marginal(steps):
  """The whole respaced DDPM chain with the exact-eps oracle and variance beta
  (learned_range with v = +1) is exact for N(0, 1) data: every x_k stays N(0, 1),
  and the last (noise-free) step returns E[x_0 | x_1] = sqrt(abar_0) x_1, so
  x_0 ~ N(0, abar_0) with abar_0 = 1 - beta_0 of the ORIGINAL schedule (respacing
  keeps step 0). Mean and variance of 16384 independent pixels, to 6 standard errors."""
  tables = tables_for(steps, 'ddpm')
  image = jnp.zeros((MC_ROWS, MC_SIZE, MC_SIZE, 1), jnp.float32)
  keys = _split_fast(5, MC_ROWS)
  x0 = sample_fast(gaussian_oracle, ORACLE_PARAMS, tables, image, keys, sampler='ddpm',
                   variance='learned_range', clip_denoised=False)
  x0 = np.asarray(x0, np.float64).ravel()
  want_var = 1.0 - BETAS[0]
  n = x0.size
  assert abs(x0.mean()) < 6 * np.sqrt(want_var / n), x0.mean()
  assert abs(x0.var() / want_var - 1.0) < 6 * np.sqrt(2.0 / n), x0.var()


# ------------------------------------------- binary masks: the exact denoiser keeps the area
# Data: every pixel independently +1 with probability P_FG, else -1 (a binary mask
# with no spatial structure). With x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, Bayes'
# rule gives P(x_0 = +1 | x_t) = sigmoid(2 sqrt(abar) x_t / (1 - abar) + logit(P_FG)),
#   E[x_0 | x_t] = tanh(sqrt(abar) x_t / (1 - abar) + atanh(2 P_FG - 1)),
# an exact x_0 denoiser written without the samplers' formulas. An exact denoiser in
# the ancestral chain over all T = 1000 steps must draw foreground with frequency
# P_FG: the sampler itself neither erodes nor grows masks (docs/samplers.md, "Why
# DDPM-1000 draws smaller masks": the area the trained model loses there is its own).

P_FG = 0.3
BIN_ROWS, BIN_SIZE = 64, 32   # 65536 independent pixels per run


def _binary_oracle(table_abar, p_fg):
  """apply_fn giving the exact E[x_0 | x_t] of the binary data above, in eps form,
  with a constant v channel (the params)."""
  def apply_fn(v, x, t):
    abar = table_abar[t].reshape((-1, 1, 1, 1))
    x_t = x[..., 1:]
    x0 = jnp.tanh(jnp.sqrt(abar) * x_t / (1.0 - abar) + np.arctanh(2 * p_fg - 1))
    eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
    return jnp.concatenate([eps, v * jnp.ones_like(eps)], axis=-1)
  return apply_fn


@pytest.mark.parametrize('variance,v', [('learned_range', -1.0), ('learned_range', 1.0),
                                        ('learned_range', 0.0), ('fixed_large', 0.0)])
def test_full_ddpm_chain_keeps_the_foreground_frequency_of_binary_masks(variance, v):
  """The 1000-step ancestral chain with the exact denoiser of Bernoulli(0.3) pixels
  in {-1, +1}, x_0 predictions clipped as in sampling: the fraction of x_0 > 0 is 0.3
  to 6 standard errors (0.011) over 65536 pixels, and every pixel ends within 0.05 of
  -1 or +1."""
  betas = linear_betas(1000)
  tables = schedule.make_tables(betas)
  apply_fn = _binary_oracle(jnp.asarray(np.cumprod(1.0 - betas), jnp.float32), P_FG)
  image = jnp.zeros((BIN_ROWS, BIN_SIZE, BIN_SIZE, 1), jnp.float32)
  keys = _split_fast(6, BIN_ROWS)
  x0 = np.asarray(sample_fast(apply_fn, jnp.float32(v), tables, image, keys,
                              sampler='ddpm', variance=variance, clip_denoised=True))
  n = x0.size
  freq = float(np.mean(x0 > 0))
  assert abs(freq - P_FG) < 6 * np.sqrt(P_FG * (1 - P_FG) / n), (freq, P_FG)
  assert np.all(np.abs(np.abs(x0) - 1.0) < 0.05), np.abs(np.abs(x0) - 1.0).max()
