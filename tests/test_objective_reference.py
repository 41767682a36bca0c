"""The CIMD objective and the EMA against hand-derived values and independent numpy.

`objective.loss_terms` runs with a PROBE in place of the UNet: a module whose output
(eps_hat, v) is its own parameters, one [H, W, 1] pair per example, whatever its
input, and which records the input (image ⊕ x_t) and timesteps it was given. The AMN
and ACN are the real networks at configs/test.py sizes. Every expected value is
computed here in float64 numpy from the formulas:
  * t_i = randint(fold_in(fold_in(rng, 0), i), 0..T-1), eps_i = normal(fold_in(
    fold_in(rng, 1), i)) (one draw per example), x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps;
  * mse_i = mean over pixels of (eps - eps_hat)^2;
  * vlb_i = T * L_t in bits/dim, L_t = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for
    t > 0 (Ho et al. posterior, improved-DDPM learned-range variance) and the
    discretised-Gaussian decoder NLL at t = 0; it must train only v (the eps channel
    enters through stop_gradient);
  * kl_i = KL(Q || P) with Q = AMN(image ⊕ x_0), P = ACN(image ⊕ clip(x0_hat, -1, 1));
  * loss = mse + lambda vlb + beta kl.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from cimd_jax.diffusion import schedule
from cimd_jax.diffusion.args import DiffusionArgs
from cimd_jax.models import build
from cimd_jax.models.latent import kl_diag_gaussians
from cimd_jax.train import objective
from cimd_jax.train import state as state_lib
from cimd_jax.train import step as step_lib

CONFIG = test_config.get_config()
T = int(CONFIG.diffusion.num_timesteps)
SIZE = int(CONFIG.data.image_size)
CHANNELS = int(CONFIG.data.image_channels)
B = 64
PIXELS = SIZE * SIZE
LAMBDA, BETA = 0.37, 2.5     # non-default weights, so the sum's weighting is visible
ARGS = objective.ObjectiveArgs(vlb_weight=LAMBDA, kl_weight=BETA, amn_input='clean',
                               acn_input='x0')
DIFFUSION = DiffusionArgs(num_timesteps=T, beta_schedule='linear', variance='learned_range',
                          prediction='eps')
# Compile with XLA's backend optimisations off: small programs, ~3x faster compiles
# on a busy CPU; the maths is unchanged.
_FAST = {'xla_backend_optimization_level': 0}


def linear_betas(num_timesteps):
  """Ho et al.'s linear schedule rescaled to T steps (improved DDPM), written here."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps)


BETAS = linear_betas(T)
ABAR = np.cumprod(1.0 - BETAS)
ABAR_PREV = np.concatenate([[1.0], ABAR[:-1]])
BETA_TILDE = BETAS * (1.0 - ABAR_PREV) / (1.0 - ABAR)
LOG_BETA_TILDE_CLIPPED = np.log(np.concatenate([[BETA_TILDE[1]], BETA_TILDE[1:]]))
# The training tables as configs/test.py builds them (cimd_jax.settings is not imported: it
# pulls in TensorFlow, seconds of import time).
TABLES = schedule.make_tables(schedule.get_beta_schedule(CONFIG.diffusion.beta_schedule, T))


# ------------------------------------------------------------------ the probe UNet
RECORDED = {}


def _record(x, t):
  RECORDED['x'] = np.asarray(x)
  RECORDED['t'] = np.asarray(t)


class ProbeUNet(nn.Module):
  """Stands in for the UNet: output = (eps_hat, v) = its parameters, [B, H, W, 1] each,
  whatever the input; records the input (image ⊕ x_t) and t it is called with."""
  batch: int
  size: int

  @nn.compact
  def __call__(self, x, t, train=False):
    shape = (self.batch, self.size, self.size, 1)
    eps = self.param('eps', nn.initializers.normal(1.0), shape)
    v = self.param('v', nn.initializers.normal(1.0), shape)
    assert x.shape[0] == self.batch and t.shape == (self.batch,)
    jax.debug.callback(_record, x, t)
    return jnp.concatenate([eps, v], axis=-1)


MODEL = build.ModelArgs(latent_filters=tuple(CONFIG.model.latent_filters),
                        latent_convs_per_block=int(CONFIG.model.latent_convs_per_block),
                        latent_dim=int(CONFIG.model.latent_dim))
NETWORKS = build.Networks(unet=ProbeUNet(B, SIZE), amn=build.build_latent_net(MODEL, CHANNELS),
                          acn=build.build_latent_net(MODEL, CHANNELS), ambiguity='trained')
L = MODEL.latent_dim


def make_params(seed=0):
  """Probe outputs, and real AMN / ACN params whose output biases make Q narrow and
  P wide with shifted means, so that KL(Q || P) and KL(P || Q) differ by a lot."""
  rng = np.random.default_rng(seed)
  x = jnp.zeros((1, SIZE, SIZE, CHANNELS + 1))
  shapes = jax.eval_shape(NETWORKS.amn.init, jax.random.key(0), x)['params']

  def he_normal(leaf):   # He-normal kernels, zero biases, drawn in numpy (no compilation)
    if len(leaf.shape) == 1:
      return jnp.zeros(leaf.shape, jnp.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), jnp.float32)

  def shift(p, mean, log_sigma):
    bias = jnp.concatenate([jnp.full((L,), mean), jnp.full((L,), log_sigma)])
    return dict(p, to_gaussian=dict(p['to_gaussian'], bias=bias))

  amn, acn = jax.tree.map(he_normal, shapes), jax.tree.map(he_normal, shapes)

  return {
      'unet': {'eps': jnp.asarray(rng.normal(0.0, 1.0, (B, SIZE, SIZE, 1)), jnp.float32),
               'v': jnp.asarray(rng.uniform(-1.5, 1.5, (B, SIZE, SIZE, 1)), jnp.float32)},
      'amn': shift(amn, 0.6, -1.2),
      'acn': shift(acn, -0.6, 0.8),
  }


def make_batch(seed=0):
  """Images in [-1, 1] and random disc masks in {-1, +1}, [B, H, W, ...]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:SIZE, :SIZE]
  masks = []
  for _ in range(B):
    cy, cx = rng.uniform(3, SIZE - 3, 2)
    r = rng.uniform(2, 5)
    masks.append(np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, 1.0, -1.0))
  masks = np.stack(masks)[..., None]
  images = np.clip(0.6 * masks + 0.3 * rng.standard_normal(masks.shape), -1, 1)
  images = np.repeat(images, CHANNELS, -1)
  return {'image': jnp.asarray(images, jnp.float32), 'mask': jnp.asarray(masks, jnp.float32)}


@functools.partial(jax.jit, static_argnames=('args', 'diffusion'), compiler_options=_FAST)
def terms_and_grads(params, batch, rng, args=ARGS, diffusion=DIFFUSION):
  """loss_terms' per-example terms, and the gradient of each term's batch sum w.r.t.
  all params ({'mse', 'vlb', 'kl', 'loss'} -> param tree)."""
  def f(p):
    return objective.loss_terms(p, NETWORKS, TABLES, batch, rng, args, diffusion)
  terms, vjp = jax.vjp(f, params)
  grads = {}
  for name in terms:
    (grads[name],) = vjp({k: jnp.full((B,), float(k == name)) for k in terms})
  return terms, grads


# ------------------------------------------------------------------ references
@functools.partial(jax.jit, compiler_options=_FAST)
def reference_draws(rng, ids):
  """(t [n], eps [n, H, W, 1]): example i's own draws from fold_in(fold_in(rng, 0 / 1), i)."""
  t_rng, noise_rng = jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)
  t = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(t_rng, i), (), 0, T))(ids)
  eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_rng, i),
                                             (SIZE, SIZE, 1), jnp.float32))(ids)
  return t, eps


@functools.partial(jax.jit, compiler_options=_FAST)
def latent_gaussian(params, x):
  """(mean, log_sigma) [n, L] of an AMN / ACN (same architecture) on x."""
  return NETWORKS.amn.apply({'params': params}, x)


def approx_cdf(z):
  """Improved DDPM's tanh approximation of the standard normal CDF (their decoder)."""
  return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))


def kl_numpy(mq, lsq, mp, lsp):
  """KL(N(mq, e^{2 lsq}) || N(mp, e^{2 lsp})) summed over the last axis, float64."""
  return np.sum(lsp - lsq + (np.exp(2 * lsq) + (mq - mp) ** 2) / (2 * np.exp(2 * lsp)) - 0.5,
                axis=-1)


def kl_of_networks(params, image, amn_mask, acn_mask):
  """KL(AMN(image ⊕ amn_mask) || ACN(image ⊕ acn_mask)) per example, float64 [n]."""
  def gaussian(net, mask):
    return [np.asarray(a, np.float64) for a in latent_gaussian(
        params[net], jnp.asarray(np.concatenate([image, mask], -1), jnp.float32))]
  q, p = gaussian('amn', amn_mask), gaussian('acn', acn_mask)
  return kl_numpy(q[0], q[1], p[0], p[1])


def reference_terms(params, batch, rng):
  """Every term of every example, float64 numpy, from the formulas of the docstring."""
  t, eps = (np.asarray(a) for a in reference_draws(rng, jnp.arange(B)))
  eps = eps.astype(np.float64)
  x0 = np.asarray(batch['mask'], np.float64)
  image = np.asarray(batch['image'], np.float64)
  e = np.asarray(params['unet']['eps'], np.float64)
  v = np.asarray(params['unet']['v'], np.float64)
  col = lambda a: a[t].reshape(B, 1, 1, 1)
  ab, ab_prev, beta = col(ABAR), col(ABAR_PREV), col(BETAS)
  bt, log_bt_clipped = col(BETA_TILDE), col(LOG_BETA_TILDE_CLIPPED)
  x_t = np.sqrt(ab) * x0 + np.sqrt(1.0 - ab) * eps

  mse = np.mean((eps - e) ** 2, axis=(1, 2, 3))

  x0_hat = (x_t - np.sqrt(1.0 - ab) * e) / np.sqrt(ab)    # not clipped in the VLB
  c1 = beta * np.sqrt(ab_prev) / (1.0 - ab)
  c2 = (1.0 - ab_prev) * np.sqrt(1.0 - beta) / (1.0 - ab)
  mean_q, mean_p = c1 * x0 + c2 * x_t, c1 * x0_hat + c2 * x_t
  frac = (v + 1.0) / 2.0
  lv_p = frac * np.log(beta) + (1.0 - frac) * log_bt_clipped
  lv_q = np.log(np.maximum(bt, 1e-300))     # only used where t > 0
  kl_t = 0.5 * (-1.0 + lv_p - lv_q + np.exp(lv_q - lv_p) + (mean_q - mean_p) ** 2 * np.exp(-lv_p))
  sigma = np.exp(0.5 * lv_p)
  prob = np.where(x0 < 0, approx_cdf((x0 - mean_p + 1 / 255) / sigma),
                  1.0 - approx_cdf((x0 - mean_p - 1 / 255) / sigma))
  decoder = t == 0
  assert np.all(prob[decoder] > 1e-6)   # far from the implementation's 1e-12 floor
  log_px = np.log(np.where(decoder.reshape(B, 1, 1, 1), prob, 1.0))
  per_pixel = np.where(decoder.reshape(B, 1, 1, 1), -log_px, kl_t)
  vlb = T * per_pixel.mean(axis=(1, 2, 3)) / math.log(2.0)

  acn_in = np.clip(x0_hat, -1.0, 1.0)
  q = latent_gaussian(params['amn'], jnp.asarray(np.concatenate([image, x0], -1), jnp.float32))
  p = latent_gaussian(params['acn'], jnp.asarray(np.concatenate([image, acn_in], -1),
                                                 jnp.float32))
  q, p = [np.asarray(a, np.float64) for a in q], [np.asarray(a, np.float64) for a in p]
  kl = kl_numpy(q[0], q[1], p[0], p[1])
  kl_reverse = kl_numpy(p[0], p[1], q[0], q[1])

  # Hand-derived d vlb_i / d v (t > 0): d KL / d lv_p = (1 - e^{lv_q - lv_p}
  # - (mean_q - mean_p)^2 e^{-lv_p}) / 2 and d lv_p / d v = (log beta - log bt_clip) / 2.
  dkl_dlv = 0.5 * (1.0 - np.exp(lv_q - lv_p) - (mean_q - mean_p) ** 2 * np.exp(-lv_p))
  dvlb_dv = T / (PIXELS * math.log(2.0)) * dkl_dlv * 0.5 * (np.log(beta) - log_bt_clipped)
  dmse_de = -2.0 * (eps - e) / PIXELS
  return dict(t=t, eps=eps, x_t=x_t, mse=mse, vlb=vlb, kl=kl, kl_reverse=kl_reverse,
              loss=mse + LAMBDA * vlb + BETA * kl, dvlb_dv=dvlb_dv, dmse_de=dmse_de)


def _rng_with_t0():
  """A key whose 64 draws include t = 0 (the decoder NLL) and t > 0 examples; found by
  scanning seeds with the reference draw."""
  for seed in range(100):
    rng = jax.random.key(seed)
    t, _ = reference_draws(rng, jnp.arange(B))
    if np.any(np.asarray(t) == 0):
      return rng
  raise AssertionError('no seed below 100 draws t = 0')


@pytest.fixture(scope='module')
def case():
  params, batch, rng = make_params(), make_batch(), _rng_with_t0()
  RECORDED.clear()
  terms, grads = terms_and_grads(params, batch, rng)
  jax.effects_barrier()
  recorded = dict(RECORDED)
  return dict(params=params, batch=batch, rng=rng, recorded=recorded,
              terms={k: np.asarray(v, np.float64) for k, v in terms.items()},
              grads=jax.tree.map(np.asarray, grads), ref=reference_terms(params, batch, rng))


# ------------------------------------------------------------------ tests
def test_tables_are_the_reference_schedule():
  """configs/test.py's tables are the linear schedule the references use."""
  np.testing.assert_allclose(np.asarray(TABLES.alphas_cumprod), ABAR, rtol=1e-6)
  assert TABLES.num_timesteps == T


def test_each_example_draws_its_own_t_and_eps(case):
  """(c) With a batch of 64 the network is told 64 timesteps that are not all equal and
  are each example's own draw randint(fold_in(fold_in(rng, 0), i)); the x_t it sees is
  q_sample with each example's own eps = normal(fold_in(fold_in(rng, 1), i))."""
  t, ref = case['recorded']['t'], case['ref']
  assert t.shape == (B,)
  assert len(np.unique(t)) >= 20, np.unique(t)   # ~36 distinct of 50 expected
  np.testing.assert_array_equal(t, ref['t'])
  x = case['recorded']['x']
  np.testing.assert_allclose(x[..., :CHANNELS], case['batch']['image'])
  np.testing.assert_allclose(x[..., CHANNELS:], ref['x_t'], atol=1e-5)
  # The MSE with the reference eps is what the objective reports.
  np.testing.assert_allclose(case['terms']['mse'], ref['mse'], rtol=1e-5)


def test_examples_do_not_see_each_other(case):
  """(c) Example i's terms depend only on example i: changing the images, masks and
  network outputs of examples 32..63 leaves the terms of examples 0..31 unchanged (and
  changes those of 32..63)."""
  params, batch = case['params'], case['batch']
  other_params = make_params(seed=5)
  other_batch = make_batch(seed=5)
  half = B // 2
  mix = lambda a, b: jnp.concatenate([a[:half], b[half:]])
  params2 = dict(params, unet=jax.tree.map(mix, params['unet'], other_params['unet']))
  batch2 = jax.tree.map(mix, batch, other_batch)
  terms2, _ = terms_and_grads(params2, batch2, case['rng'])
  for name in ('mse', 'vlb', 'kl', 'loss'):
    a, b = case['terms'][name], np.asarray(terms2[name], np.float64)
    np.testing.assert_allclose(b[:half], a[:half], rtol=1e-6, atol=1e-7, err_msg=name)
    assert not np.allclose(b[half:], a[half:]), name


def test_vlb_trains_only_v_and_mse_only_eps(case):
  """(a) d(sum vlb)/d eps_hat is exactly 0 (stop_gradient), d(sum vlb)/d v equals the
  hand-derived derivative (t > 0 examples) and is nonzero; d(sum mse)/d v is exactly 0
  and d(sum mse)/d eps_hat = -2 (eps - eps_hat) / pixels."""
  g, ref, t = case['grads'], case['ref'], case['ref']['t']
  assert np.all(g['vlb']['unet']['eps'] == 0.0), np.abs(g['vlb']['unet']['eps']).max()
  assert np.all(g['mse']['unet']['v'] == 0.0)
  assert np.all(g['kl']['unet']['v'] == 0.0)
  pos = t > 0
  assert pos.sum() >= 40 and (~pos).sum() >= 1
  np.testing.assert_allclose(g['vlb']['unet']['v'][pos], ref['dvlb_dv'][pos], rtol=2e-3,
                             atol=1e-7)
  assert np.all(np.abs(g['vlb']['unet']['v'][~pos]).sum(axis=(1, 2, 3)) > 0)
  np.testing.assert_allclose(g['mse']['unet']['eps'], ref['dmse_de'], rtol=1e-4, atol=1e-8)


def test_vlb_term_matches_numpy(case):
  """The VLB term equals T * L_t in bits/dim computed here (posterior KL for t > 0,
  decoder NLL for t = 0)."""
  t, ref, got = case['ref']['t'], case['ref'], case['terms']['vlb']
  for sel in (t > 0, t == 0):
    assert sel.any()
    np.testing.assert_allclose(got[sel], ref['vlb'][sel], rtol=2e-4)


def test_kl_term_is_kl_q_given_expert_to_p_given_prediction(case):
  """(b) The KL term is KL(Q || P), Q = AMN(image ⊕ expert mask), P = ACN(image ⊕
  clip(x0_hat)), summed over latent dims; the params are chosen so that KL(P || Q)
  differs from it by a wide margin (so the direction is tested)."""
  got, ref = case['terms']['kl'], case['ref']
  gap = np.abs(ref['kl'] - ref['kl_reverse'])
  assert np.all(gap > 0.5 * np.maximum(ref['kl'], ref['kl_reverse'])), (ref['kl'][:4],
                                                                      ref['kl_reverse'][:4])
  np.testing.assert_allclose(got, ref['kl'], rtol=1e-4, atol=1e-5)


def test_kl_inputs_noisy_mask_and_predicted_eps(case):
  """With amn_input='noisy' and acn_input='eps' (the official code's inputs) the KL
  term is KL(Q || P), Q = AMN(image ⊕ x_t), P = ACN(image ⊕ eps_hat): the ACN sees
  the network's eps prediction (not the true noise), so the KL reaches eps_hat."""
  args = objective.ObjectiveArgs(vlb_weight=LAMBDA, kl_weight=BETA, amn_input='noisy',
                                 acn_input='eps')
  terms, grads = terms_and_grads(case['params'], case['batch'], case['rng'], args=args)
  ref, params = case['ref'], case['params']
  image = np.asarray(case['batch']['image'], np.float64)
  e = np.asarray(params['unet']['eps'], np.float64)
  np.testing.assert_allclose(terms['kl'], kl_of_networks(params, image, ref['x_t'], e),
                             rtol=1e-4, atol=1e-5)
  assert not np.allclose(terms['kl'], ref['kl'], rtol=1e-2)   # the inputs matter
  assert np.all(np.abs(np.asarray(grads['kl']['unet']['eps'])).sum(axis=(1, 2, 3)) > 0)


def test_x0_prediction_regresses_the_unclipped_output(case):
  """With prediction='x0' the probe's first channel is x0_hat itself, drawn here with
  most values outside [-1, 1]: mse = mean((x_0 - x0_hat)²) and its gradient
  -2 (x_0 - x0_hat) / pixels at every pixel (a clip before the loss would zero it
  outside [-1, 1]); the ACN sees clip(x0_hat, -1, 1)."""
  params = dict(case['params'])
  rng = np.random.default_rng(7)
  x0_hat = rng.normal(0.0, 2.0, (B, SIZE, SIZE, 1))
  params['unet'] = dict(params['unet'], eps=jnp.asarray(x0_hat, jnp.float32))
  x0_hat = np.asarray(params['unet']['eps'], np.float64)
  assert np.mean(np.abs(x0_hat) > 1) > 0.5
  diffusion = dataclasses.replace(DIFFUSION, prediction='x0')
  terms, grads = terms_and_grads(params, case['batch'], case['rng'], diffusion=diffusion)
  x0 = np.asarray(case['batch']['mask'], np.float64)
  np.testing.assert_allclose(terms['mse'], np.mean((x0 - x0_hat) ** 2, axis=(1, 2, 3)),
                             rtol=1e-5)
  np.testing.assert_allclose(grads['mse']['unet']['eps'], -2.0 * (x0 - x0_hat) / PIXELS,
                             rtol=1e-4, atol=1e-8)
  image = np.asarray(case['batch']['image'], np.float64)
  np.testing.assert_allclose(terms['kl'], kl_of_networks(params, image, x0,
                                                         np.clip(x0_hat, -1.0, 1.0)),
                             rtol=1e-4, atol=1e-5)


def test_loss_is_the_weighted_sum(case):
  """(d) loss = mse + lambda vlb + beta kl per example, with lambda = 0.37 and beta = 2.5,
  against the independently computed terms; and the loss gradient is the same
  weighted sum of the terms' gradients."""
  got, ref = case['terms'], case['ref']
  np.testing.assert_allclose(got['loss'], ref['loss'], rtol=2e-4)
  g = case['grads']
  for path in (('unet', 'eps'), ('unet', 'v')):
    parts = [g[name][path[0]][path[1]] for name in ('loss', 'mse', 'vlb', 'kl')]
    np.testing.assert_allclose(parts[0], parts[1] + LAMBDA * parts[2] + BETA * parts[3],
                               rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ kl_diag_gaussians
def test_kl_diag_gaussians_numpy_and_monte_carlo():
  """(b) `kl_diag_gaussians(mq, lsq, mp, lsp)` equals the closed form KL(Q || P) in
  numpy and a Monte-Carlo estimate E_{z~Q}[log q(z) - log p(z)] (200k draws, 6 standard
  errors), which is far from the reverse direction's estimate."""
  rng = np.random.default_rng(0)
  mq, mp = rng.normal(0, 1, (2, L)), rng.normal(0, 1, (2, L))
  lsq, lsp = rng.uniform(-1.5, -0.5, (2, L)), rng.uniform(0.0, 0.8, (2, L))
  got = np.asarray(kl_diag_gaussians(*(jnp.asarray(a, jnp.float32) for a in (mq, lsq, mp, lsp))))
  np.testing.assert_allclose(got, kl_numpy(mq, lsq, mp, lsp), rtol=1e-5)

  def log_density(z, m, ls):
    return np.sum(-0.5 * ((z - m) / np.exp(ls)) ** 2 - ls - 0.5 * np.log(2 * np.pi), -1)

  for row in range(2):
    def mc(m1, ls1, m2, ls2):
      z = m1[row] + np.exp(ls1[row]) * rng.standard_normal((200_000, L))
      d = log_density(z, m1[row], ls1[row]) - log_density(z, m2[row], ls2[row])
      return d.mean(), d.std() / np.sqrt(d.size)
    est, se = mc(mq, lsq, mp, lsp)
    assert abs(got[row] - est) < 6 * se, (got[row], est, se)
    reverse, _ = mc(mp, lsp, mq, lsq)
    assert abs(reverse - est) > 100 * se, (reverse, est)


# ------------------------------------------------------------------ EMA
def test_ema_update_closed_form():
  """`ema_update` k times towards constant p from e0 gives r^k e0 + (1 - r^k) p, and
  towards a sequence p_1..p_k gives r^k e0 + (1 - r) sum_j r^(k - j) p_j, leaf by leaf."""
  rng = np.random.default_rng(0)
  tree = lambda: {'a': rng.normal(size=(3,)), 'b': {'c': rng.normal(size=(2, 2))}}
  r, k = 0.8, 7
  e0, p = tree(), tree()
  ema = jax.tree.map(jnp.asarray, e0)
  for _ in range(k):
    ema = state_lib.ema_update(ema, jax.tree.map(jnp.asarray, p), r)
  want = jax.tree.map(lambda e, q: r**k * e + (1 - r**k) * q, e0, p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), ema, want)

  seq = [tree() for _ in range(k)]
  ema = jax.tree.map(jnp.asarray, e0)
  for q in seq:
    ema = state_lib.ema_update(ema, jax.tree.map(jnp.asarray, q), r)
  want = jax.tree.map(lambda e, *qs: r**k * e + (1 - r) * sum(r**(k - 1 - j) * q
                                                                for j, q in enumerate(qs)),
                      e0, *seq)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ema, want)


def test_train_step_ema_uses_the_new_params():
  """In the jitted `train_step`, the EMA after one step is rate * old_ema + (1 - rate) *
  new_params. configs/test.py's optimizer (learning rate raised to 1e-2 so the params
  move visibly) and tables, the real AMN / ACN, the probe UNet (the real UNet's train
  step takes ~90 s to compile on a busy 2-core CPU; the EMA does not depend on it).
  The old EMA is moved away from the params, and the rate is not the config's, so
  using the old params, the rate the wrong way round, or the config's rate all fail."""
  from cimd_jax.train.args import TrainingArgs  # pylint: disable=g-import-not-at-top
  training = CONFIG.training
  tx = state_lib.make_optimizer(TrainingArgs(
      learning_rate=1e-2, lr_schedule=training.lr_schedule,
      warmup_steps=int(training.warmup_steps), num_steps=int(training.num_steps),
      weight_decay=float(training.weight_decay),
      grad_clip_norm=float(training.grad_clip_norm)))
  args = objective.ObjectiveArgs(**CONFIG.objective)
  params = make_params()
  state = state_lib.create_train_state(params, tx, jax.random.key(0))
  state = state.replace(ema_params=jax.tree.map(lambda p: p + 0.5, state.params))
  rate = 0.75
  assert rate != float(training.ema_rate)
  step = jax.jit(functools.partial(
      step_lib.train_step, networks=NETWORKS, tables=TABLES, objective_args=args,
      diffusion=DIFFUSION, tx=tx,
      lr_fn=lambda count: 1e-2, ema_rate=rate), compiler_options=_FAST)
  old_ema = jax.device_get(state.ema_params)
  old_params = jax.device_get(state.params)
  new_state, metrics = step(state, make_batch())
  assert np.isfinite(float(metrics['loss']))
  new_params = jax.device_get(new_state.params)
  for name in ('unet', 'amn', 'acn'):
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(new_params[name]), jax.tree.leaves(old_params[name])))
    assert moved > 1e-3, (name, moved)
  want = jax.tree.map(lambda e, p: rate * e + (1 - rate) * p, old_ema, new_params)
  got = jax.device_get(new_state.ema_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), got, want)
  assert int(new_state.step) == 1


def test_truncated_snr_weighting_is_the_larger_of_the_two_errors(case):
  """objective.mse_weighting='truncated_snr' (eps prediction): each example's mse term
  is max(mean (eps - eps_hat)^2, mean (x_0 - x0_hat)^2), x0_hat from eps_hat in float64
  here; both branches occur in the batch (small t: the eps error is larger)."""
  args = objective.ObjectiveArgs(vlb_weight=LAMBDA, kl_weight=BETA, amn_input='clean',
                                 acn_input='x0', mse_weighting='truncated_snr')
  terms, _ = terms_and_grads(case['params'], case['batch'], case['rng'], args=args)
  ref = case['ref']
  e = np.asarray(case['params']['unet']['eps'], np.float64)
  ab = ABAR[ref['t']].reshape(B, 1, 1, 1)
  x0_hat = (ref['x_t'] - np.sqrt(1.0 - ab) * e) / np.sqrt(ab)
  x0 = np.asarray(case['batch']['mask'], np.float64)
  mse_x0 = np.mean((x0 - x0_hat) ** 2, axis=(1, 2, 3))
  assert np.any(mse_x0 > ref['mse']) and np.any(mse_x0 < ref['mse'])
  np.testing.assert_allclose(np.asarray(terms['mse']), np.maximum(ref['mse'], mse_x0),
                             rtol=1e-4)
  np.testing.assert_allclose(np.asarray(terms['loss']),
                             np.maximum(ref['mse'], mse_x0) + LAMBDA * ref['vlb']
                             + BETA * ref['kl'], rtol=1e-4)


def test_truncated_snr_weight_of_the_x0_loss():
  """With x_0 prediction the same loss is the x_0 error weighted by max(1, SNR_t)
  (||eps - eps_hat||^2 = SNR_t ||x_0 - x0_hat||^2); 'uniform' weighs every t by 1."""
  t = jnp.arange(T)
  snr = ABAR / (1.0 - ABAR)
  for prediction, want in (('x0', np.maximum(1.0, snr)), ('eps', np.maximum(1.0, 1 / snr))):
    got = objective.mse_weight(TABLES, t, prediction, 'truncated_snr')
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, err_msg=prediction)
  assert np.all(np.asarray(objective.mse_weight(TABLES, t, 'x0', 'uniform')) == 1.0)
