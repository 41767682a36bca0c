"""models/norm.py's GroupNorm against two independent references: a float64 numpy
two-pass GroupNorm with a hand-derived backward pass, and flax.linen.GroupNorm (whose
parameters it must share)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cimd_jax.models import norm
from cimd_jax.models import unet


def _numpy_group_norm(x, scale, bias, groups, eps):
  """float64 GroupNorm of x [B, H, W, C], two-pass variance; returns (y, x_hat, inv)
  with x_hat [B, H, W, G, C/G] and inv [B, 1, 1, G, 1]."""
  b, h, w, c = x.shape
  xg = x.astype(np.float64).reshape(b, h, w, groups, c // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  inv = 1.0 / np.sqrt(var + eps)
  x_hat = (xg - mean) * inv
  y = x_hat.reshape(b, h, w, c) * scale + bias
  return y, x_hat, inv


def _numpy_group_norm_grads(x, scale, groups, eps, dy):
  """Hand-derived gradients of sum(dy * GroupNorm(x)): (dx, dscale, dbias), float64.

  dx = inv * (g - mean_group(g) - x_hat * mean_group(g * x_hat)), g = dy * scale.
  """
  b, h, w, c = x.shape
  _, x_hat, inv = _numpy_group_norm(x, scale, np.zeros(c), groups, eps)
  dyg = dy.astype(np.float64).reshape(b, h, w, groups, c // groups)
  g = dyg * scale.reshape(groups, c // groups)
  dx = inv * (g - g.mean(axis=(1, 2, 4), keepdims=True)
              - x_hat * (g * x_hat).mean(axis=(1, 2, 4), keepdims=True))
  dscale = (dyg * x_hat).sum(axis=(0, 1, 2)).reshape(c)
  dbias = dy.astype(np.float64).sum(axis=(0, 1, 2))
  return dx.reshape(b, h, w, c), dscale, dbias


# (shape, groups): several channels per group, one per group, odd sizes, an offset mean.
CASES = [((2, 5, 3, 12), 4), ((3, 4, 4, 8), 8), ((1, 6, 7, 6), 2), ((2, 3, 5, 10), 1)]


def _inputs(shape, seed=0):
  rng = np.random.RandomState(seed)
  c = shape[-1]
  # Channels with different means and spreads, so that groups differ from channels.
  x = (rng.randn(*shape) * rng.uniform(0.5, 3.0, c) + rng.uniform(-2, 2, c)).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
  bias = rng.randn(c).astype(np.float32)
  dy = rng.randn(*shape).astype(np.float32)
  return x, scale, bias, dy


@pytest.mark.parametrize('shape,groups', CASES)
def test_forward_matches_two_pass_float64(shape, groups):
  x, scale, bias, _ = _inputs(shape)
  want, _, _ = _numpy_group_norm(x, scale, bias, groups, 1e-5)
  got = jax.jit(norm.group_norm, static_argnums=(3, 4))(x, scale, bias, groups, 1e-5)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize('shape,groups', CASES)
def test_gradients_match_hand_derived(shape, groups):
  x, scale, bias, dy = _inputs(shape, seed=1)

  def loss(x, scale, bias):
    return jnp.sum(norm.group_norm(x, scale, bias, groups, 1e-5) * dy)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
  want = _numpy_group_norm_grads(x, scale, groups, 1e-5, dy)
  for g, w, name in zip(got, want, ('dx', 'dscale', 'dbias')):
    np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=2e-4 * max(1.0, np.abs(w).max()),
                               err_msg=name)


def test_epsilon_enters_under_the_square_root():
  # A spread of std 1e-3 (variance 1e-6) against eps = 1e-2: the output depends on
  # eps, and on where it is added (under the square root, to the variance).
  rng = np.random.RandomState(2)
  x = (1e-3 * rng.randn(1, 4, 4, 4)).astype(np.float32)
  scale, bias = np.ones(4, np.float32), np.zeros(4, np.float32)
  want, _, _ = _numpy_group_norm(x, scale, bias, 2, 1e-2)
  got = norm.group_norm(x, scale, bias, 2, 1e-2)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)


def test_module_has_flax_groupnorm_parameters_and_outputs():
  x, scale, bias, _ = _inputs((2, 6, 6, 64), seed=3)
  ours, flax_gn = norm.GroupNorm(num_groups=32), nn.GroupNorm(num_groups=32, epsilon=1e-5)
  params = ours.init(jax.random.PRNGKey(0), x)
  flax_params = flax_gn.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_params)
  np.testing.assert_array_equal(params['params']['scale'], flax_params['params']['scale'])
  np.testing.assert_array_equal(params['params']['bias'], flax_params['params']['bias'])
  trained = {'params': {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}}
  np.testing.assert_allclose(np.asarray(ours.apply(trained, x)),
                             np.asarray(flax_gn.apply(trained, x)), rtol=0, atol=1e-5)


def test_unet_norm_keeps_dtype_and_parameter_names():
  x = jnp.asarray(_inputs((1, 4, 4, 48))[0], jnp.bfloat16)
  params = unet.Norm().init(jax.random.PRNGKey(0), x)
  assert set(params['params']) == {'gn'}
  assert set(params['params']['gn']) == {'scale', 'bias'}
  y = unet.Norm().apply(params, x)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape


def test_channels_that_do_not_split_are_refused():
  with pytest.raises(ValueError, match='12 channels do not split into 5 groups'):
    norm.group_norm(jnp.zeros((1, 2, 2, 12)), jnp.ones(12), jnp.zeros(12), 5, 1e-5)
