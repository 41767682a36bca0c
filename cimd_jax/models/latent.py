"""AMN / ACN: the Probabilistic U-Net's axis-aligned convolutional Gaussian, and the
closed-form KL between two diagonal Gaussians. NHWC throughout."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from cimd_jax.models import conv as conv_lib

# Kaiming-normal (fan_in, ReLU gain) kernels as in the Probabilistic U-Net; zero biases.
_he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class AxisAlignedConvGaussian(nn.Module):
  """Conv encoder to a diagonal Gaussian: x [B, H, W, Cin] -> (mean [B, L], log_sigma [B, L]).

  `len(filters)` blocks of `convs_per_block` 3×3 convs (padding 1) + ReLU, with
  2×2 average pooling (stride 2; odd sizes round up, like PyTorch's ceil_mode)
  before every block except the first; then the spatial mean and a 1×1 conv
  (a Dense) to 2·latent_dim, split into mean and log_sigma. Used for both the
  AMN (image ⊕ expert mask) and the ACN (image ⊕ predicted mask). Runs in float32.
  `conv_impl` picks how the 3×3 convs are computed (models/conv.py); the parameters
  ('blockI_convJ/kernel' [3, 3, Cin, Cout], '.../bias') do not depend on it.
  """
  filters: tuple[int, ...]
  convs_per_block: int
  latent_dim: int
  input_channels: int | None = None   # checked against x when given
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    assert x.ndim == 4, x.shape
    if self.input_channels is not None and x.shape[-1] != self.input_channels:
      raise ValueError(f'latent net expects {self.input_channels} input channels, '
                       f'got x of shape {x.shape}')
    h = x.astype(jnp.float32)
    for i, features in enumerate(self.filters):
      if i:
        h = _avg_pool2_ceil(h)
      for j in range(self.convs_per_block):
        h = conv_lib.conv(features, 3, padding=1, impl=self.conv_impl,
                          kernel_init=_he_normal, name=f'block{i}_conv{j}')(h)
        h = nn.relu(h)
    h = jnp.mean(h, axis=(1, 2))
    out = nn.Dense(2 * self.latent_dim, kernel_init=_he_normal, name='to_gaussian')(h)
    return out[:, :self.latent_dim], out[:, self.latent_dim:]


def _avg_pool2_ceil(x: jax.Array) -> jax.Array:
  """2×2/2 average pool, [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]; a window cut
  by the border averages only its in-image pixels (PyTorch ceil_mode, padding 0)."""
  _, h, w, _ = x.shape
  if h % 2 == 0 and w % 2 == 0:
    b, _, _, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
  window, strides = (1, 2, 2, 1), (1, 2, 2, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  count = jax.lax.reduce_window(jnp.ones_like(x[:1, ..., :1]), 0.0, jax.lax.add, window,
                                strides, pad)
  return total / count


def kl_diag_gaussians(mean_q: jax.Array, log_sigma_q: jax.Array, mean_p: jax.Array,
                      log_sigma_p: jax.Array) -> jax.Array:
  """KL(Q ‖ P) of diagonal Gaussians given [B, L] means and log standard deviations,
  summed over the L latent dims -> [B].

  KL = Σ log σp − log σq + (σq² + (μq − μp)²) / (2σp²) − 1/2.
  """
  var_ratio = jnp.exp(2.0 * (log_sigma_q - log_sigma_p))
  mahal = jnp.square(mean_q - mean_p) * jnp.exp(-2.0 * log_sigma_p)
  return jnp.sum(log_sigma_p - log_sigma_q + 0.5 * (var_ratio + mahal) - 0.5, axis=-1)
