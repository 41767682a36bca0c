"""GroupNorm over NHWC activations whose statistics are reduced channel by channel.

The same function and parameters as `flax.linen.GroupNorm` (its default one-pass
variance E[x²] − E[x]², clipped at zero; y = (x − mean) · rsqrt(var + eps) · scale
+ bias; parameters 'scale' [C] (ones) and 'bias' [C] (zeros)), computed in another
order: first one sum per (example, channel) over the H·W positions, then the sums of
each group's channels. nn.GroupNorm reduces [B, H, W, G, C/G] over (H, W, C/G) in one
strided reduction, which XLA:CPU 0.10 runs 3–10× slower than the per-channel one
(docs/benchmarks.md, "GroupNorm"); the backward pass, derived by autodiff from this
form, reduces per channel too. Groups are contiguous channels, as in flax and PyTorch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               epsilon: float) -> jax.Array:
  """GroupNorm of x [B, H, W, C] with `num_groups` groups of C/num_groups consecutive
  channels, scale and bias [C] -> [B, H, W, C] (x's dtype; compute in that dtype)."""
  b, h, w, c = x.shape
  if c % num_groups:
    raise ValueError(f'group_norm: {c} channels do not split into {num_groups} groups')
  per_group = c // num_groups
  count = h * w * per_group
  flat = x.reshape(b, h * w, c)
  # [B, C] per-channel sums, then [B, G] group means.
  mean = jnp.sum(flat, axis=1).reshape(b, num_groups, per_group).sum(-1) / count
  mean_sq = jnp.sum(jnp.square(flat), axis=1).reshape(b, num_groups, per_group).sum(-1) / count
  var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
  inv = jax.lax.rsqrt(var + epsilon)
  # Back to one value per (example, channel): [B, 1, 1, C].
  mean_c = jnp.repeat(mean, per_group, axis=1)[:, None, None, :]
  mul_c = (jnp.repeat(inv, per_group, axis=1) * scale)[:, None, None, :]
  return (x - mean_c) * mul_c + bias


class GroupNorm(nn.Module):
  """GroupNorm with flax.linen.GroupNorm's parameters: x [B, H, W, C] -> [B, H, W, C].

  Computes in `dtype` (the input is cast to it); parameters in `param_dtype`.
  """
  num_groups: int
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    assert x.ndim == 4, x.shape
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones_init(), (channels,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (channels,), self.param_dtype)
    return group_norm(x.astype(self.dtype), scale.astype(self.dtype),
                      bias.astype(self.dtype), self.num_groups, self.epsilon)
