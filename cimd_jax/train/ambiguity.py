"""Does the AMN still tell expert masks apart? A probe logged while training.

The KL between AMN and ACN has a trivial minimiser when nothing decodes z: both
networks output one constant, whatever the mask. The probe shows it: for a fixed
set of training images, the AMN's mean is computed for every expert's mask of each
image; its spread across the experts of an image (the standard deviation over the
A masks, averaged over latent dimensions and images) is compared with the AMN's own
sigma. A collapsed AMN has spread ~ 0 (e.g. 0.01 against sigma ~ 1). The probe feeds
the clean expert masks, as the AMN sees them with objective.amn_input='clean' (the
default); with 'noisy' it trains on x_t, so the probe measures it on inputs it never saw.

Scalars: ambiguity/amn_mean_spread, ambiguity/amn_sigma,
ambiguity/spread_over_sigma (the ratio), ambiguity/acn_sigma.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cimd_jax.data import pipeline
from cimd_jax.data.args import DataArgs, TRAIN
from cimd_jax.models import conv
from cimd_jax.models.build import Networks

PROBE_IMAGES = 8


def amn_statistics(networks: Networks, params: dict[str, Any], images: jax.Array,
                   masks: jax.Array) -> dict[str, jax.Array]:
  """Spread of the AMN mean across the experts' masks of each image.

  Args:
    images: [B, H, W, C] in [-1, 1]; masks: [B, A, H, W] in {-1, +1}.

  Returns:
    amn_mean_spread (mean over images and latent dims of the std over the A masks),
    amn_sigma (mean AMN sigma), spread_over_sigma, acn_sigma (mean ACN sigma over
    the same inputs), float32 scalars.
  """
  b, a, h, w = masks.shape
  rep = jnp.repeat(images, a, axis=0)                       # [B*A, H, W, C]
  flat = masks.reshape(b * a, h, w, 1)
  x = jnp.concatenate([rep, flat], axis=-1)
  mean, log_sigma = networks.amn.apply({'params': params['amn']}, x)
  _, acn_log_sigma = networks.acn.apply({'params': params['acn']}, x)
  spread = jnp.mean(jnp.std(mean.reshape(b, a, -1), axis=1))
  sigma = jnp.mean(jnp.exp(log_sigma))
  return {'amn_mean_spread': spread, 'amn_sigma': sigma,
          'spread_over_sigma': spread / sigma,
          'acn_sigma': jnp.mean(jnp.exp(acn_log_sigma))}


class AmbiguityProbe:
  """Scalars of `amn_statistics` on the first PROBE_IMAGES training images (those with
  more than one distinct expert mask are what the spread is about, but all count)."""

  def __init__(self, networks: Networks, data: DataArgs, workdir: str):
    batch = next(pipeline.eval_batches(data, workdir, TRAIN, batch_size=PROBE_IMAGES,
                                       max_examples=PROBE_IMAGES))
    self.images = jnp.asarray(batch['image'])
    self.masks = jnp.asarray(batch['masks'])
    self._stats = jax.jit(lambda p, x, m: amn_statistics(networks, p, x, m),
                          compiler_options=conv.compiler_options(networks.amn.conv_impl))

  def __call__(self, params: dict[str, Any]) -> dict[str, float]:
    stats = jax.device_get(self._stats(params, self.images, self.masks))
    return {f'ambiguity/{k}': float(np.asarray(v)) for k, v in stats.items()}
