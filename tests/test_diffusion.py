"""The Gaussian diffusion core against closed forms and independent float64 computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import stats

from cimd_jax.diffusion import gaussian
from cimd_jax.diffusion import schedule


@pytest.fixture(scope='module')
def betas100():
  return schedule.get_beta_schedule('linear', 100)


@pytest.fixture(scope='module')
def tables100(betas100):
  return schedule.make_tables(betas100)


# ------------------------------------------------------------------ schedules
def test_linear_schedule_endpoints_scale_with_t():
  b = schedule.get_beta_schedule('linear', 1000)
  assert b.dtype == np.float64 and b.shape == (1000,)
  np.testing.assert_allclose(b[[0, -1]], [1e-4, 0.02], rtol=1e-12)
  b = schedule.get_beta_schedule('linear', 100)
  np.testing.assert_allclose(b[[0, -1]], [1e-3, 0.2], rtol=1e-12)
  assert np.all(np.diff(b) > 0)


def test_cosine_schedule_endpoints():
  t = 1000
  b = schedule.get_beta_schedule('cosine', t)
  f = lambda s: math.cos((s / t + 0.008) / 1.008 * math.pi / 2) ** 2
  np.testing.assert_allclose(b[0], 1 - f(1) / f(0), rtol=1e-12)
  assert b[-1] == pytest.approx(0.999)  # clipped
  assert np.all(b <= 0.999) and np.all(np.diff(b) > 0)
  ac = np.cumprod(1 - b)
  # alpha_bar follows the cosine curve wherever no beta was clipped.
  np.testing.assert_allclose(ac[:-1], [f(i + 1) / f(0) for i in range(t - 1)], rtol=1e-9)


def test_bad_schedule_raises():
  with pytest.raises(ValueError):
    schedule.get_beta_schedule('quadratic', 10)
  with pytest.raises(ValueError):
    schedule.get_beta_schedule('linear', 10)  # scale 100 -> betas > 1


def test_make_tables_against_float64(betas100, tables100):
  tb = tables100
  assert tb.num_timesteps == 100
  assert tb.timestep_map.dtype == jnp.int32
  np.testing.assert_array_equal(tb.timestep_map, np.arange(100))
  for name in ('betas', 'alphas_cumprod', 'posterior_mean_coef1', 'posterior_variance'):
    assert getattr(tb, name).dtype == jnp.float32 and getattr(tb, name).shape == (100,)
  b = betas100
  ac = np.cumprod(1 - b)
  np.testing.assert_allclose(tb.alphas_cumprod, ac, rtol=1e-6)
  np.testing.assert_allclose(tb.alphas_cumprod_prev[1:], ac[:-1], rtol=1e-6)
  assert float(tb.alphas_cumprod_prev[0]) == 1.0
  np.testing.assert_allclose(tb.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / ac - 1), rtol=1e-5)
  np.testing.assert_allclose(tb.log_one_minus_alphas_cumprod, np.log(1 - ac), rtol=1e-5)
  assert float(tb.posterior_variance[0]) == 0.0
  np.testing.assert_allclose(tb.posterior_log_variance_clipped[0],
                             np.log(tb.posterior_variance[1]), rtol=1e-6)
  assert isinstance(jax.tree.leaves(tb), list) and len(jax.tree.leaves(tb)) == 13


# ------------------------------------------------------------------ q_sample
def test_q_sample_mean_and_variance_monte_carlo(tables100):
  t = jnp.array([0, 10, 50, 99])
  x0 = jnp.array([0.8, -1.0, 0.3, 1.0]).reshape(4, 1, 1, 1) * jnp.ones((4, 100, 100, 1))
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  xt = np.asarray(gaussian.q_sample(tables100, x0, t, noise)).reshape(4, -1)
  ac = np.asarray(tables100.alphas_cumprod)[np.asarray(t)]
  want_mean = np.sqrt(ac) * np.asarray(x0[:, 0, 0, 0])
  want_std = np.sqrt(1 - ac)
  n = xt.shape[1]
  assert np.all(np.abs(xt.mean(1) - want_mean) < 5 * want_std / np.sqrt(n))
  np.testing.assert_allclose(xt.std(1), want_std, rtol=0.05)


def test_predict_xstart_eps_roundtrip(tables100):
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  x0 = jax.random.uniform(k1, (5, 6, 6, 1), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 30, 70, 99])
  xt = gaussian.q_sample(tables100, x0, t, eps)
  np.testing.assert_allclose(gaussian.predict_xstart_from_eps(tables100, xt, t, eps), x0,
                             atol=2e-4)
  np.testing.assert_allclose(gaussian.predict_eps_from_xstart(tables100, xt, t, x0), eps,
                             atol=2e-4)


# ------------------------------------------------------------------ posterior
@pytest.mark.parametrize('t', [1, 5, 50, 99])
def test_posterior_is_bayes_rule_on_a_grid(betas100, tables100, t):
  """q(x_{t-1}|x_t, x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), normalised numerically."""
  ac = np.cumprod(1 - betas100)
  x0, xt = 0.7, -0.4
  grid = np.linspace(-8, 8, 400001)
  prior = stats.norm.logpdf(grid, np.sqrt(ac[t - 1]) * x0, np.sqrt(1 - ac[t - 1]))
  lik = stats.norm.logpdf(xt, np.sqrt(1 - betas100[t]) * grid, np.sqrt(betas100[t]))
  logp = prior + lik
  p = np.exp(logp - logp.max())
  p /= np.trapezoid(p, grid)
  mean = np.trapezoid(grid * p, grid)
  var = np.trapezoid((grid - mean) ** 2 * p, grid)
  m, v, lv = gaussian.q_posterior_mean_variance(
      tables100, jnp.full((1, 1, 1, 1), x0), jnp.full((1, 1, 1, 1), xt), jnp.array([t]))
  np.testing.assert_allclose(float(m[0, 0, 0, 0]), mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(v[0, 0, 0, 0]), var, rtol=1e-3)
  np.testing.assert_allclose(float(lv[0, 0, 0, 0]), np.log(var), atol=1e-3)


def test_posterior_at_t0_is_x0(tables100):
  x0 = jnp.full((2, 3, 3, 1), 0.25)
  xt = jnp.full((2, 3, 3, 1), -2.0)
  m, v, _ = gaussian.q_posterior_mean_variance(tables100, x0, xt, jnp.array([0, 0]))
  np.testing.assert_allclose(m, x0, atol=1e-6)
  np.testing.assert_array_equal(v, 0.0)


# ------------------------------------------------------------------ KL, likelihood
def test_normal_kl_zero_for_equal_and_matches_closed_form():
  m, lv = jnp.array([0.3, -2.0]), jnp.array([-1.0, 0.5])
  np.testing.assert_allclose(gaussian.normal_kl(m, lv, m, lv), 0.0, atol=1e-7)
  m1, s1, m2, s2 = 0.4, 0.7, -0.5, 1.3
  closed = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
  integral, _ = integrate.quad(
      lambda x: stats.norm.pdf(x, m1, s1) * (stats.norm.logpdf(x, m1, s1)
                                             - stats.norm.logpdf(x, m2, s2)), -20, 20)
  got = float(gaussian.normal_kl(m1, 2 * math.log(s1), m2, 2 * math.log(s2)))
  np.testing.assert_allclose(got, closed, rtol=1e-5)
  np.testing.assert_allclose(closed, integral, rtol=1e-7)


def test_approx_cdf_close_to_exact():
  x = np.linspace(-5, 5, 101)
  np.testing.assert_allclose(gaussian.approx_standard_normal_cdf(jnp.asarray(x)),
                             stats.norm.cdf(x), atol=1e-3)


@pytest.mark.parametrize('mean,log_scale', [(0.1, -2.0), (-0.95, -4.0), (0.99, 0.5)])
def test_discretized_log_likelihood_sums_to_one(mean, log_scale):
  levels = -1 + 2 * jnp.arange(256, dtype=jnp.float32) / 255
  x = levels.reshape(1, 16, 16, 1)
  lp = gaussian.discretized_gaussian_log_likelihood(
      x, jnp.full(x.shape, mean), jnp.full(x.shape, log_scale))
  assert lp.shape == x.shape
  np.testing.assert_allclose(np.exp(np.asarray(lp, np.float64)).sum(), 1.0, atol=1e-4)


def test_discretized_log_likelihood_binary_mask_confident():
  x = jnp.array([-1.0, 1.0]).reshape(2, 1, 1, 1)
  lp = gaussian.discretized_gaussian_log_likelihood(x, x, jnp.full(x.shape, -8.0))
  np.testing.assert_allclose(lp, 0.0, atol=1e-5)


# ------------------------------------------------------------------ p_mean_variance
def test_learned_range_hits_beta_and_beta_tilde(tables100):
  t = jnp.array([0, 1, 40, 99])
  xt = jax.random.normal(jax.random.PRNGKey(2), (4, 4, 4, 1))
  eps = jax.random.normal(jax.random.PRNGKey(3), xt.shape)
  logb = np.log(np.asarray(tables100.betas))[np.asarray(t)]
  logbt = np.asarray(tables100.posterior_log_variance_clipped)[np.asarray(t)]
  for v, want in ((1.0, logb), (-1.0, logbt), (0.0, 0.5 * (logb + logbt))):
    out = gaussian.p_mean_variance(
        tables100, jnp.concatenate([eps, jnp.full(xt.shape, v)], -1), xt, t, 'learned_range')
    np.testing.assert_allclose(out['log_variance'][:, 0, 0, 0], want, rtol=1e-5)
    np.testing.assert_allclose(out['variance'], jnp.exp(out['log_variance']), rtol=1e-6)
  for k in ('mean', 'variance', 'log_variance', 'pred_xstart', 'eps'):
    assert out[k].shape == xt.shape


def test_fixed_variances(tables100):
  t = jnp.array([0, 1, 99])
  xt = jnp.zeros((3, 2, 2, 1))
  eps = jnp.zeros_like(xt)
  small = gaussian.p_mean_variance(tables100, eps, xt, t, 'fixed_small')
  large = gaussian.p_mean_variance(tables100, eps, xt, t, 'fixed_large')
  pv = np.asarray(tables100.posterior_variance)
  b = np.asarray(tables100.betas)
  np.testing.assert_allclose(small['variance'][:, 0, 0, 0], [pv[1], pv[1], pv[99]], rtol=1e-5)
  np.testing.assert_allclose(large['variance'][:, 0, 0, 0], [pv[1], b[1], b[99]], rtol=1e-5)
  with pytest.raises(ValueError):
    gaussian.p_mean_variance(tables100, eps, xt, t, 'learned')


def test_p_mean_variance_exact_eps_gives_posterior_mean(tables100):
  k1, k2 = jax.random.split(jax.random.PRNGKey(4))
  x0 = jax.random.uniform(k1, (3, 5, 5, 1), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 20, 99])
  xt = gaussian.q_sample(tables100, x0, t, eps)
  out = gaussian.p_mean_variance(tables100, eps, xt, t, 'fixed_small')
  want, _, _ = gaussian.q_posterior_mean_variance(tables100, x0, xt, t)
  np.testing.assert_allclose(out['pred_xstart'], x0, atol=2e-4)
  np.testing.assert_allclose(out['mean'], want, atol=2e-4)


# ------------------------------------------------------------------ vlb
def test_vlb_terms(tables100):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
  x0 = jnp.where(jax.random.bernoulli(k1, 0.5, (4, 8, 8, 1)), 1.0, -1.0)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 30, 99])
  xt = gaussian.q_sample(tables100, x0, t, eps)
  v = jax.random.uniform(k3, x0.shape, minval=-1, maxval=1)
  out = jnp.concatenate([eps, v], -1)
  vlb = jax.jit(gaussian.vlb_terms, static_argnums=5)(tables100, x0, xt, t, out,
                                                      'learned_range')
  assert vlb.shape == (4,) and np.all(np.isfinite(vlb)) and np.all(vlb >= -1e-6)
  # By hand: t > 0 -> KL in bits per dim, t = 0 -> decoder NLL in bits per dim.
  pm = gaussian.p_mean_variance(tables100, out, xt, t, 'learned_range', clip_denoised=False)
  qm, _, qlv = gaussian.q_posterior_mean_variance(tables100, x0, xt, t)
  kl = np.asarray(gaussian.normal_kl(qm, qlv, pm['mean'], pm['log_variance'])).mean((1, 2, 3))
  nll = -np.asarray(gaussian.discretized_gaussian_log_likelihood(
      x0, pm['mean'], 0.5 * pm['log_variance'])).mean((1, 2, 3))
  want = np.where(np.asarray(t) == 0, nll, kl) / math.log(2)
  np.testing.assert_allclose(vlb, want, rtol=1e-5, atol=1e-7)
  # Exact eps and v = -1 (beta_tilde): the model posterior equals q's, so KL = 0 (t > 0).
  exact = jnp.concatenate([eps, -jnp.ones_like(eps)], -1)
  vlb0 = gaussian.vlb_terms(tables100, x0, xt, t, exact, 'learned_range')
  np.testing.assert_allclose(vlb0[1:], 0.0, atol=1e-4)
  # With eps detached by the caller, the gradient reaches only v.
  def loss(o):
    o = jnp.concatenate([jax.lax.stop_gradient(o[..., :1]), o[..., 1:]], -1)
    return gaussian.vlb_terms(tables100, x0, xt, t, o, 'learned_range').sum()
  g = jax.grad(loss)(out)
  assert np.all(np.asarray(g[..., 0]) == 0) and np.any(np.asarray(g[..., 1]) != 0)


# ------------------------------------------------------------------ respacing
def test_space_timesteps_counts_and_ddim():
  assert schedule.space_timesteps(1000, 'ddim50') == list(range(0, 1000, 20))
  assert len(schedule.space_timesteps(1000, 'ddim30')) == 30
  kept = schedule.space_timesteps(1000, '100')
  assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999 and kept == sorted(kept)
  assert schedule.space_timesteps(1000, 100) == kept
  kept = schedule.space_timesteps(100, '10,10,5')
  assert len(kept) == 25 and kept[:2] == [0, 4] and kept[-1] == 99
  assert [k for k in kept if 34 <= k < 67] == [34, 38, 41, 45, 48, 52, 55, 59, 62, 66]
  assert schedule.space_timesteps(50, '50') == list(range(50))
  with pytest.raises(ValueError):
    schedule.space_timesteps(100, '200')
  with pytest.raises(ValueError):
    schedule.space_timesteps(100, 'ddim99')  # no integer stride gives 99 of 100


@pytest.mark.parametrize('counts', ['10', '10,10,5', 'ddim10', 'ddim25', '100'])
def test_respaced_tables_keep_alphas_cumprod(betas100, tables100, counts):
  kept = schedule.space_timesteps(100, counts)
  new_betas, tmap = schedule.respace(betas100, kept)
  assert new_betas.dtype == np.float64 and tmap.dtype == np.int32
  np.testing.assert_array_equal(tmap, kept)
  np.testing.assert_allclose(np.cumprod(1 - new_betas), np.cumprod(1 - betas100)[kept],
                             rtol=1e-12)
  rt = schedule.respaced_tables(betas100, counts)
  assert rt.num_timesteps == len(kept)
  np.testing.assert_array_equal(rt.timestep_map, kept)
  np.testing.assert_allclose(rt.alphas_cumprod, tables100.alphas_cumprod[np.asarray(kept)],
                             rtol=1e-6)
  np.testing.assert_allclose(rt.alphas_cumprod_prev[1:], rt.alphas_cumprod[:-1], rtol=1e-6)
