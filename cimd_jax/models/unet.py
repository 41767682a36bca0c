"""The guided-diffusion (improved-DDPM) UNet in Flax Linen, NHWC throughout (over 250
lines because its blocks are only used together and are checked together against
the PyTorch model).

Architecture (Dhariwal & Nichol 2021, as used by CIMD):

- sinusoidal timestep embedding of width `num_channels`, then an MLP
  Dense(4·num_channels) - SiLU - Dense(4·num_channels);
- an input conv3x3, then per level `num_res_blocks` ResBlocks (+ attention where
  the feature map is one of `attention_resolutions` pixels wide) and, except at the
  last level, a down-sampling step (stride-2 conv3x3, or a ResBlock with down=True
  when `resblock_updown`);
- a middle ResBlock - Attention - ResBlock;
- a mirrored decoder of `num_res_blocks + 1` ResBlocks per level over the
  concatenated skip activations, with up-sampling (nearest ×2 + conv3x3, or an
  up ResBlock) at the end of every level but the first;
- GroupNorm - SiLU - zero-initialised conv3x3 to the output channels.

GroupNorm uses 32 groups wherever 32 divides the width, the paper's GroupNorm(32)
(every width of the paper's configs); other widths (tiny test configs) use the
largest divisor <= 32 that keeps >= 2 channels per group (see `num_groups`).
Normalisation always runs in float32 (as guided-diffusion's GroupNorm32), whatever the
compute dtype.

Kernels use PyTorch's default initialisation (uniform, variance 1/(3·fan_in)),
biases start at zero; the convs guided-diffusion zero-initialises (last conv of
each ResBlock, attention output projection, output conv) start at zero.
Parameter names are explicit (`input_blocks_3_res`, `middle_attn`, ...) so the
parameter tree is the same with and without `remat`.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cimd_jax.models import conv as conv_lib
from cimd_jax.models import norm as norm_lib

Dtype = Any

# PyTorch's default Conv/Linear kernel init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_default = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
_zeros = nn.initializers.zeros_init()


def num_groups(channels: int) -> int:
  """GroupNorm groups for `channels`: 32 when 32 divides `channels` (the paper's
  GroupNorm(32); every width of the paper's configs); otherwise (small or odd widths,
  e.g. tiny test configs) the largest divisor of `channels` that is <= 32 and leaves
  >= 2 channels per group (8 -> 4, 16 -> 8, 24 -> 12, 48 -> 24).

  Not `channels` groups: one channel per group would normalise away the per-channel
  timestep shift added before the second GroupNorm of each ResBlock, so a tiny UNet
  without scale-shift norm would ignore t. (At exactly 32 channels the PyTorch model
  has that property too; it is kept there for parity.)
  """
  if channels % 32 == 0:
    return 32
  return max([g for g in range(1, min(32, channels // 2) + 1) if channels % g == 0],
             default=1)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of timesteps.

  Args:
    t: [B] timesteps (int or float), in the original 0..T-1 scale.
    dim: embedding width.
    max_period: controls the lowest frequency.

  Returns:
    [B, dim] float32: cos of dim//2 frequencies, then sin of them (zero-padded
    to `dim` when odd).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class Norm(nn.Module):
  """GroupNorm(num_groups(C)) in float32, eps 1e-5: [B, H, W, C] -> [B, H, W, C] (dtype
  kept). nn.GroupNorm's function and parameters ('gn/scale', 'gn/bias'), reduced per
  channel first (models/norm.py)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = norm_lib.GroupNorm(num_groups=num_groups(x.shape[-1]), epsilon=1e-5,
                           dtype=jnp.float32, param_dtype=jnp.float32, name='gn')(x)
    return y.astype(x.dtype)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, zero: bool = False,
          strides: int = 1, impl: str = 'xla') -> nn.Module:
  """conv3x3 (PyTorch padding=1, also for the stride-2 conv) or conv1x1 (no padding),
  by conv implementation `impl` (models/conv.py; the parameters do not depend on it)."""
  return conv_lib.conv(features, kernel, strides=strides, padding=1 if kernel == 3 else 0,
                       impl=impl, dtype=dtype, param_dtype=jnp.float32,
                       kernel_init=_zeros if zero else _torch_default, bias_init=_zeros,
                       name=name)


def upsample_nearest(x: jax.Array) -> jax.Array:
  """Nearest-neighbour ×2: [B, H, W, C] -> [B, 2H, 2W, C]."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def avg_pool2(x: jax.Array) -> jax.Array:
  """2×2 average pooling, stride 2: [B, H, W, C] -> [B, H/2, W/2, C]."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Downsample(nn.Module):
  """Stride-2 conv3x3 (padding 1): [B, H, W, C] -> [B, H/2, W/2, C]."""
  dtype: Dtype = jnp.float32
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv(x.shape[-1], 3, self.dtype, 'conv', strides=2, impl=self.conv_impl)(x)


class Upsample(nn.Module):
  """Nearest ×2 then conv3x3: [B, H, W, C] -> [B, 2H, 2W, C]."""
  dtype: Dtype = jnp.float32
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv(x.shape[-1], 3, self.dtype, 'conv', impl=self.conv_impl)(upsample_nearest(x))


class ResBlock(nn.Module):
  """Residual block conditioned on the timestep embedding.

  [B, H, W, Cin], emb [B, E] -> [B, H', W', out_channels] where H' = H, H/2 (down)
  or 2H (up). in: GroupNorm-SiLU-(resample)-conv3x3; emb: SiLU-Dense(out or
  2·out for scale-shift); out: GroupNorm(-scale-shift)-SiLU-Dropout-zero conv3x3;
  skip: identity when Cin == out, else 1x1 conv.
  """
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  dtype: Dtype = jnp.float32
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    out = self.out_channels
    h = nn.silu(Norm(name='in_norm')(x))
    if self.up:
      h, x = upsample_nearest(h), upsample_nearest(x)
    elif self.down:
      h, x = avg_pool2(h), avg_pool2(x)
    h = _conv(out, 3, self.dtype, 'in_conv', impl=self.conv_impl)(h)

    e = nn.Dense(2 * out if self.use_scale_shift_norm else out, dtype=self.dtype,
                 param_dtype=jnp.float32, kernel_init=_torch_default, bias_init=_zeros,
                 name='emb_dense')(nn.silu(emb))
    e = e.astype(h.dtype)[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = Norm(name='out_norm')(h) * (1 + scale) + shift
    else:
      h = Norm(name='out_norm')(h + e)
    h = nn.silu(h)
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(out, 3, self.dtype, 'out_conv', zero=True, impl=self.conv_impl)(h)

    if x.shape[-1] != out:
      x = _conv(out, 1, self.dtype, 'skip', impl=self.conv_impl)(x)
    return x.astype(h.dtype) + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the H·W positions, with residual.

  [B, H, W, C] -> [B, H, W, C]. GroupNorm, 1x1 conv to qkv (guided-diffusion's
  legacy layout: channels ordered head-major, [q_h, k_h, v_h] per head), softmax
  attention with scale 1/sqrt(C/heads), zero-initialised 1x1 projection.
  Heads: `channels // num_head_channels` when num_head_channels > 0, else num_heads.
  """
  num_heads: int = 1
  num_head_channels: int = -1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    if self.num_head_channels > 0:
      assert c % self.num_head_channels == 0, (c, self.num_head_channels)
      heads = c // self.num_head_channels
    else:
      assert c % self.num_heads == 0, (c, self.num_heads)
      heads = self.num_heads
    ch = c // heads
    h = Norm(name='norm')(x)
    qkv = nn.Dense(3 * c, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=_torch_default, bias_init=_zeros, name='qkv')(h)
    qkv = qkv.reshape(b, hgt * wid, heads, 3, ch)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [B, L, heads, ch]
    logits = jnp.einsum('bqhc,bkhc->bhqk', q * (1.0 / math.sqrt(ch)), k,
                        preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    a = jnp.einsum('bhqk,bkhc->bqhc', weights, v).reshape(b, hgt, wid, c)
    a = nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_zeros,
                 bias_init=_zeros, name='proj_out')(a)
    return x.astype(a.dtype) + a


class UNet(nn.Module):
  """Guided-diffusion UNet for CIMD: x [B, H, W, C+1], t int32 [B] -> [B, H, W, 1 or 2].

  Input is the image (C channels) then the noisy mask (last channel); the output
  is eps, or (eps, v) with `learn_sigma`. `attention_resolutions` are feature-map
  sizes in pixels (16: where the map is 16×16). `dtype` is the compute dtype
  ('float32' or 'bfloat16'); parameters are float32 and the output is float32.
  With `remat`, every ResBlock and attention block is rematerialised in the
  backward pass. Dropout (train=True, dropout > 0) needs the 'dropout' rng.
  `conv_impl` picks how the convolutions are computed ('auto', 'xla', 'im2col',
  'shifted'; models/conv.py); the parameters and the function do not depend on it.
  With `detach_variance` (and `learn_sigma`) the output is the same, but the v
  channel's gradient reaches only the output conv's v filters, not the layers that
  the first channel shares (ModelArgs.detach_variance).
  """
  image_size: int
  num_channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  attention_resolutions: tuple[int, ...]
  num_heads: int = 1
  num_head_channels: int = -1
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  learn_sigma: bool = True
  detach_variance: bool = False
  remat: bool = False
  dtype: str = 'float32'
  conv_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False) -> jax.Array:
    assert x.ndim == 4 and t.shape == (x.shape[0],), (x.shape, t.shape)
    assert x.shape[1] == x.shape[2] == self.image_size, (x.shape, self.image_size)
    dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[self.dtype]
    res_cls, attn_cls = ResBlock, AttentionBlock
    if self.remat:
      res_cls = nn.remat(ResBlock, static_argnums=(3,))  # (self, x, emb, train)
      attn_cls = nn.remat(AttentionBlock)
    nc = self.num_channels
    impl = conv_lib.resolve_impl(self.conv_impl)

    def res(out, name, up=False, down=False):
      return res_cls(out, dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
                     up=up, down=down, dtype=dtype, conv_impl=impl, name=name)

    def attn(name):
      return attn_cls(num_heads=self.num_heads, num_head_channels=self.num_head_channels,
                      dtype=dtype, name=name)

    def dense(features, name):
      return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=_torch_default, bias_init=_zeros, name=name)

    emb = timestep_embedding(t, nc).astype(dtype)
    emb = dense(4 * nc, 'time_embed_1')(nn.silu(dense(4 * nc, 'time_embed_0')(emb)))

    h = _conv(self.channel_mult[0] * nc, 3, dtype, 'input_blocks_0', impl=impl)(x.astype(dtype))
    skips = [h]
    res_px = self.image_size
    index = 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res(mult * nc, f'input_blocks_{index}_res')(h, emb, train)
        if res_px in self.attention_resolutions:
          h = attn(f'input_blocks_{index}_attn')(h)
        skips.append(h)
        index += 1
      if level != len(self.channel_mult) - 1:
        if self.resblock_updown:
          h = res(h.shape[-1], f'input_blocks_{index}_down', down=True)(h, emb, train)
        else:
          h = Downsample(dtype, impl, name=f'input_blocks_{index}_down')(h)
        skips.append(h)
        index += 1
        res_px //= 2

    h = res(h.shape[-1], 'middle_res_0')(h, emb, train)
    h = attn('middle_attn')(h)
    h = res(h.shape[-1], 'middle_res_1')(h, emb, train)

    index = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(mult * nc, f'output_blocks_{index}_res')(h, emb, train)
        if res_px in self.attention_resolutions:
          h = attn(f'output_blocks_{index}_attn')(h)
        if level and i == self.num_res_blocks:
          if self.resblock_updown:
            h = res(h.shape[-1], f'output_blocks_{index}_up', up=True)(h, emb, train)
          else:
            h = Upsample(dtype, impl, name=f'output_blocks_{index}_up')(h)
          res_px *= 2
        index += 1
    assert not skips

    h = nn.silu(Norm(name='out_norm')(h))
    out_conv = _conv(2 if self.learn_sigma else 1, 3, dtype, 'out_conv', zero=True, impl=impl)
    out = out_conv(h)
    if self.learn_sigma and self.detach_variance:
      v = out_conv(jax.lax.stop_gradient(h))[..., 1:]
      out = jnp.concatenate([out[..., :1], v], axis=-1)
    return out.astype(jnp.float32)
