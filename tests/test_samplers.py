"""Samplers: exact-eps stub recovers x_0, scan == Python loop, ensembles, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cimd_jax.diffusion import samplers
from cimd_jax.diffusion import schedule

T = 50
H = W = 6


@pytest.fixture(scope='module')
def betas():
  return schedule.get_beta_schedule('linear', T)


def exact_eps_stub(params, x, t):
  """Oracle denoiser: the image channel *is* x_0; returns the exact eps (and v = 0).

  eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t) with ab from the ORIGINAL T-step
  schedule indexed by t_orig, so it also checks the timestep_map of respaced tables.
  """
  assert x.shape[-1] == 2 and t.dtype == jnp.int32 and t.shape == x.shape[:1]
  x0, xt = x[..., :1], x[..., 1:]
  ab = params['alphas_cumprod'][t][:, None, None, None]
  eps = (xt - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
  return jnp.concatenate([eps, jnp.zeros_like(eps)], -1)


TRACES = {'random_stub': 0}


def random_stub(params, x, t):
  """A small nonlinear 'network' with (eps, v) outputs; counts its traces."""
  TRACES['random_stub'] += 1
  assert x.shape[-1] == 2 and t.shape == x.shape[:1]
  tf = t.astype(jnp.float32)[:, None, None, None] / T
  h = jnp.tanh(params['w'] * x[..., 1:] + params['u'] * x[..., :1] + params['c'] * tf)
  return jnp.concatenate([h, jnp.tanh(0.5 * h + params['c'])], -1)


RANDOM_PARAMS = {'w': jnp.float32(0.9), 'u': jnp.float32(0.4), 'c': jnp.float32(0.3)}


def _x0_images(n, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (n, H, W, 1), minval=-0.9, maxval=0.9)


def _keys(n, seed=1):
  return jax.random.split(jax.random.key(seed), n)


@pytest.mark.parametrize('steps,sampler,eta,tol', [
    ('', 'ddpm', 0.0, 1e-4),       # ancestral, all T = 50 steps
    ('10', 'ddpm', 0.0, 1e-4),     # respaced DDPM
    ('ddim10', 'ddim', 0.0, 1e-4),  # deterministic DDIM
    ('ddim10', 'ddim', 1.0, 1e-4),
])
def test_exact_eps_stub_recovers_x0(betas, steps, sampler, eta, tol):
  """With the oracle eps every x_0 prediction is exact; the last step has
  coef1 = 1, coef2 = 0 and no noise, so every sampler ends at x_0 up to float error."""
  tables, kind = samplers.sampler_from_name(betas, steps, sampler)
  assert kind == sampler
  params = {'alphas_cumprod': jnp.asarray(np.cumprod(1 - betas), jnp.float32)}
  x0 = _x0_images(3)
  out = samplers.sample_jit(exact_eps_stub, params, tables, x0, _keys(3), sampler=sampler,
                            variance='learned_range', eta=eta)
  assert out.shape == (3, H, W, 1) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, x0, atol=tol)


@pytest.mark.parametrize('steps,sampler,variance,eta', [
    ('', 'ddpm', 'learned_range', 0.0),
    ('7', 'ddpm', 'fixed_large', 0.0),
    ('ddim5', 'ddim', 'learned_range', 0.5),
])
def test_scan_equals_python_loop(betas, steps, sampler, variance, eta):
  tables, _ = samplers.sampler_from_name(betas, steps, sampler)
  image = _x0_images(2, seed=3)
  kw = dict(sampler=sampler, variance=variance, eta=eta)
  scanned = samplers.sample_jit(random_stub, RANDOM_PARAMS, tables, image, _keys(2), **kw)
  loop = samplers.sample_reference_loop(random_stub, RANDOM_PARAMS, tables, image, _keys(2),
                                        **kw)
  assert np.all(np.isfinite(scanned))
  np.testing.assert_allclose(scanned, loop, atol=1e-5)
  # Raw uint32 keys work too and give the same numbers as the equivalent typed keys.
  raw = jax.random.key_data(_keys(2))
  np.testing.assert_allclose(
      samplers.sample_jit(random_stub, RANDOM_PARAMS, tables, image, raw, **kw), scanned,
      atol=1e-6)


def test_ensemble_shape_determinism_and_chunking(betas):
  tables, _ = samplers.sampler_from_name(betas, '10', 'ddpm')
  images = _x0_images(3, seed=4)
  key = jax.random.key(7)
  kw = dict(sampler='ddpm', variance='learned_range')
  a = samplers.sample_ensemble(random_stub, RANDOM_PARAMS, tables, images, key, 4, 5, **kw)
  assert a.shape == (3, 4, H, W, 1)
  b = samplers.sample_ensemble(random_stub, RANDOM_PARAMS, tables, images, key, 4, 5, **kw)
  np.testing.assert_array_equal(a, b)
  # A raw uint32 key (jax.random.PRNGKey) with the same key data gives the same samples.
  raw = samplers.sample_ensemble(random_stub, RANDOM_PARAMS, tables, images,
                                 jax.random.PRNGKey(7), 4, 5, **kw)
  np.testing.assert_allclose(raw, a, atol=1e-6)
  # Chunk size does not matter (12 rows in one chunk vs chunks of 5 with padding).
  c = samplers.sample_ensemble(random_stub, RANDOM_PARAMS, tables, images, key, 4, 64, **kw)
  np.testing.assert_allclose(a, c, atol=1e-6)
  # Image b's samples do not depend on the batch it arrives in.
  d = samplers.sample_ensemble(random_stub, RANDOM_PARAMS, tables, images[2:], key, 4, 5,
                               first_image_index=2, **kw)
  np.testing.assert_allclose(d[0], a[2], atol=1e-6)
  # Different samples of one image differ, and so do different keys.
  masks = np.asarray(samplers.masks_from_x0(a))
  assert masks.dtype == bool and masks.shape == a.shape
  for i in range(3):
    assert len({m.tobytes() for m in masks[i]}) == 4
  e = samplers.sample_ensemble(random_stub, RANDOM_PARAMS, tables, images, jax.random.key(8),
                               4, 5, **kw)
  assert not np.allclose(a, e)
  # Rows are the (b, n) pairs with key fold_in(fold_in(key, b), n).
  row = samplers.sample_jit(random_stub, RANDOM_PARAMS, tables, images[1:2],
                            jax.random.fold_in(jax.random.fold_in(key, 1), 3)[None], **kw)
  np.testing.assert_allclose(row[0], a[1, 3], atol=1e-6)


def test_ensemble_compiles_once(betas):
  tables, _ = samplers.sampler_from_name(betas, 'ddim5', 'ddim')
  kw = dict(sampler='ddim', variance='learned_range', eta=0.0)
  images = _x0_images(2, seed=5)
  samplers.sample_ensemble(random_stub, RANDOM_PARAMS, tables, images, jax.random.key(0), 3,
                           4, **kw)
  traced = TRACES['random_stub']
  other = jax.tree.map(lambda p: p + 0.1, RANDOM_PARAMS)
  for i in range(3):
    # New key, params values, eta, first image index, and another (B, N) with the same
    # chunk size (2 x 3 and 3 x 2 rows, both run as chunks of 4): no new trace.
    samplers.sample_ensemble(random_stub, other, tables, _x0_images(3, seed=i),
                             jax.random.key(i + 1), 2, 4, first_image_index=i + 10,
                             **dict(kw, eta=0.3 * i))
  assert TRACES['random_stub'] == traced


def test_sampler_from_name(betas):
  full, kind = samplers.sampler_from_name(betas, '', 'ddpm')
  assert full.num_timesteps == T and kind == 'ddpm'
  np.testing.assert_array_equal(full.timestep_map, np.arange(T))
  r, _ = samplers.sampler_from_name(betas, '10', 'ddpm')
  assert r.num_timesteps == 10
  d, kind = samplers.sampler_from_name(betas, 'ddim5', 'ddim')
  assert kind == 'ddim'
  np.testing.assert_array_equal(d.timestep_map, [0, 10, 20, 30, 40])
  with pytest.raises(ValueError):
    samplers.sampler_from_name(betas, 'ddim5', 'ddpm')
  with pytest.raises(ValueError):
    samplers.sampler_from_name(betas, '', 'plms')
