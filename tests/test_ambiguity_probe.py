"""The AMN-collapse probe computes the spread of the AMN mean across each image's expert
masks, and its ratio to sigma, as a numpy re-computation does."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cimd_jax.models.build import Networks
from cimd_jax.train import ambiguity


class MaskStats(nn.Module):
  """A stand-in latent net: mean = (mask mean, 2 x mask mean), log sigma = log 0.5."""

  @nn.compact
  def __call__(self, x):
    m = jnp.mean(x[..., -1], axis=(1, 2))
    scale = self.param('scale', nn.initializers.ones, ())
    mean = jnp.stack([m, 2 * m], -1) * scale
    return mean, jnp.full_like(mean, np.log(0.5))


def test_spread_is_the_std_over_experts_of_the_amn_mean():
  rng = np.random.default_rng(0)
  masks = np.where(rng.random((3, 4, 8, 8)) > 0.6, 1.0, -1.0).astype(np.float32)
  images = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  net = MaskStats()
  networks = Networks(unet=None, amn=net, acn=net, ambiguity='trained')
  params = {'amn': {'scale': jnp.float32(1.0)}, 'acn': {'scale': jnp.float32(1.0)}}
  got = ambiguity.amn_statistics(networks, params, jnp.asarray(images), jnp.asarray(masks))
  means = masks.mean(axis=(2, 3))                          # [B, A]
  per_dim = np.stack([means, 2 * means], -1)               # [B, A, L]
  spread = per_dim.std(axis=1).mean()
  np.testing.assert_allclose(got['amn_mean_spread'], spread, rtol=1e-5)
  np.testing.assert_allclose(got['amn_sigma'], 0.5, rtol=1e-6)
  np.testing.assert_allclose(got['spread_over_sigma'], spread / 0.5, rtol=1e-5)
  # A collapsed AMN (same output for every mask) has no spread.
  collapsed = {'amn': {'scale': jnp.float32(0.0)}, 'acn': params['acn']}
  got = ambiguity.amn_statistics(networks, collapsed, jnp.asarray(images), jnp.asarray(masks))
  assert float(got['amn_mean_spread']) == 0.0
