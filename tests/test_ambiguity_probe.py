"""The AMN-collapse probe computes the spread of the AMN mean across each image's expert
masks, and its ratio to sigma, as a numpy re-computation does."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cimd_jax.models.build import Networks
from cimd_jax.train import ambiguity


class MaskStats(nn.Module):
  """A stand-in latent net on x = image ⊕ mask: mean = scale·(m, 2m) + (i, −i) with m the
  mask's and i the image's pixel mean (so a mask paired with another image's picture
  changes it); log sigma = the parameter `log_sigma`."""

  @nn.compact
  def __call__(self, x):
    m = jnp.mean(x[..., -1], axis=(1, 2))
    i = jnp.mean(x[..., :-1], axis=(1, 2, 3))
    scale = self.param('scale', nn.initializers.ones, ())
    log_sigma = self.param('log_sigma', nn.initializers.zeros, ())
    mean = jnp.stack([m, 2 * m], -1) * scale + jnp.stack([i, -i], -1)
    return mean, jnp.full_like(mean, log_sigma)


def _params(amn_scale, amn_sigma, acn_sigma):
  return {'amn': {'scale': jnp.float32(amn_scale), 'log_sigma': jnp.float32(np.log(amn_sigma))},
          'acn': {'scale': jnp.float32(1.0), 'log_sigma': jnp.float32(np.log(acn_sigma))}}


def test_spread_is_the_std_over_experts_of_the_amn_mean():
  rng = np.random.default_rng(0)
  masks = np.where(rng.random((3, 4, 8, 8)) > 0.6, 1.0, -1.0).astype(np.float32)
  images = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  net = MaskStats()
  networks = Networks(unet=None, amn=net, acn=net, ambiguity='trained')
  params = _params(1.0, 0.5, 0.25)
  got = ambiguity.amn_statistics(networks, params, jnp.asarray(images), jnp.asarray(masks))
  means = masks.mean(axis=(2, 3))                          # [B, A]
  image_means = images.mean(axis=(1, 2, 3))[:, None]       # [B, 1]: one picture per image
  per_dim = np.stack([means + image_means, 2 * means - image_means], -1)   # [B, A, L]
  spread = per_dim.std(axis=1).mean()
  np.testing.assert_allclose(got['amn_mean_spread'], spread, rtol=1e-5)
  np.testing.assert_allclose(got['amn_sigma'], 0.5, rtol=1e-6)
  np.testing.assert_allclose(got['acn_sigma'], 0.25, rtol=1e-6)
  np.testing.assert_allclose(got['spread_over_sigma'], spread / 0.5, rtol=1e-5)
  # A collapsed AMN (the same output for every mask of an image) has no spread, as
  # long as each mask is paired with its own image.
  collapsed = _params(0.0, 0.5, 0.25)
  got = ambiguity.amn_statistics(networks, collapsed, jnp.asarray(images), jnp.asarray(masks))
  assert float(got['amn_mean_spread']) == 0.0
