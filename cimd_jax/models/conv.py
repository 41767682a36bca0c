"""2-D convolutions (NHWC, square kernels, symmetric zero padding) with a choice of
implementation, for the UNet and the AMN/ACN.

Implementations (`impl`), all computing the same function
y[b, i, j, o] = bias[o] + sum_{di, dj, c} x_pad[b, s*i + di, s*j + dj, c] * kernel[di, dj, c, o]
(x_pad: x zero-padded by `padding` on each spatial side; s: stride):

- 'xla': `flax.linen.Conv` itself (`lax.conv_general_dilated`, NHWC/HWIO); XLA
  picks the convolution kernel (XLA:CPU 0.10: YNNPACK).
- 'eigen': the same module and HLO as 'xla'; programs that run it must be compiled
  with `compiler_options(...)`, which keeps XLA:CPU's YNNPACK fusion off
  convolutions (dots and reductions stay on YNNPACK), so that XLA:CPU runs its own
  Eigen convolution kernels. Without those options it is exactly 'xla'. Off CPU the
  options are empty and it is 'xla'.
- 'im2col': the k*k shifted (strided) views of x_pad concatenated along channels,
  [B, Ho, Wo, k*k*Cin], then ONE matmul with the kernel reshaped to
  [k*k*Cin, Cout]. Costs a k*k-times larger temporary per conv.
- 'shifted': the sum of k*k matmuls, one per kernel tap, each
  [B*Ho*Wo, Cin] x [Cin, Cout] on a shifted view of x_pad.
  A 1x1 convolution is one matmul under both matmul impls.

'auto' is resolved per backend by `resolve_impl` (see `AUTO_IMPL`). The module
`ConvKxK` has exactly nn.Conv's parameters ('kernel' [k, k, Cin, Cout], 'bias'
[Cout], same dtypes and initialisers), so parameter trees, checkpoints and the
PyTorch-parity weight mapping do not depend on `impl`.
"""

import functools
from typing import Any, Callable

from absl import logging
import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

IMPLS = ('xla', 'eigen', 'im2col', 'shifted')

# What 'auto' means on each backend. CPU: chosen by measurement (docs/benchmarks.md,
# "Convolution implementations": 'eigen' was the fastest train step on configs A, B
# and demo, 2-3.4x 'xla', and the fastest reverse step). GPU/TPU: always XLA's own
# convolutions (cuDNN / the TPU emitter); nothing was measured there.
AUTO_IMPL = {'cpu': 'eigen'}

# XLA:CPU's default YNNPACK fusion types in jaxlib 0.10.2 are individual dots,
# reductions and individual convolutions; 'eigen' keeps the first two.
_EIGEN_CPU_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
}


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """The concrete implementation for `impl` ('auto' or one of IMPLS).

  'auto' maps to AUTO_IMPL[backend] on CPU and to 'xla' on every other backend;
  `backend` defaults to `jax.default_backend()`. Raises ValueError for unknown names.
  """
  if impl == 'auto':
    backend = backend or jax.default_backend()
    return AUTO_IMPL.get(backend, 'xla')
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be 'auto' or one of {IMPLS}, got {impl!r}")
  return impl


def compiler_options(*impls: str, backend: str | None = None) -> dict[str, str] | None:
  """XLA compiler options for a program whose networks use conv `impls` (resolved
  names or 'auto'), to pass as `jax.jit(..., compiler_options=...)`: the Eigen-conv
  options when one of them is 'eigen' and `backend` (default: jax.default_backend())
  is CPU, else None (XLA's defaults).
  """
  backend = backend or jax.default_backend()
  if (backend == 'cpu' and any(resolve_impl(i, backend) == 'eigen' for i in impls)
      and _eigen_options_accepted()):
    return dict(_EIGEN_CPU_OPTIONS)
  return None


@functools.cache
def _eigen_options_accepted() -> bool:
  """Whether this jaxlib's XLA:CPU accepts _EIGEN_CPU_OPTIONS (one tiny compile, once);
  if a later jaxlib drops the option, 'eigen' falls back to 'xla' with a warning."""
  try:
    jax.jit(lambda v: v + 1).lower(jnp.zeros((2,), jnp.float32)).compile(
        compiler_options=_EIGEN_CPU_OPTIONS)
    return True
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("conv impl 'eigen': XLA rejected %s (%s); using XLA's defaults",
                    _EIGEN_CPU_OPTIONS, e)
    return False


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
  """Output length of a VALID conv over `size + 2*padding` (lax's floor rule)."""
  return (size + 2 * padding - kernel) // stride + 1


def _taps(x: jax.Array, kernel_size: int, stride: int, padding: int) -> list[jax.Array]:
  """The k*k shifted views of zero-padded x, tap-major (di, then dj).

  x [B, H, W, C] -> k*k arrays [B, Ho, Wo, C], view (di, dj) holding
  x_pad[:, di + s*i, dj + s*j, :].
  """
  _, h, w, _ = x.shape
  ho = _output_size(h, kernel_size, stride, padding)
  wo = _output_size(w, kernel_size, stride, padding)
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  views = []
  for di in range(kernel_size):
    for dj in range(kernel_size):
      views.append(jax.lax.slice(
          x, (0, di, dj, 0),
          (x.shape[0], di + stride * (ho - 1) + 1, dj + stride * (wo - 1) + 1, x.shape[3]),
          (1, stride, stride, 1)))
  return views


def _matmul(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
  """[..., K] x [K, N] -> [..., N] as one dot_general."""
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: int = 1, padding: int = 0,
           impl: str = 'xla', precision: Any = None) -> jax.Array:
  """Convolution without bias: x [B, H, W, Cin], kernel [k, k, Cin, Cout] ->
  [B, Ho, Wo, Cout], Ho = (H + 2*padding - k) // strides + 1 (same for W).

  `impl` is one of IMPLS (resolve 'auto' first); x and kernel must share a dtype.
  """
  k, k2, cin, cout = kernel.shape
  if k != k2 or x.shape[-1] != cin:
    raise ValueError(f'conv2d: kernel {kernel.shape} does not fit x {x.shape}')
  if impl in ('xla', 'eigen'):
    return jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), ((padding, padding), (padding, padding)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)
  if impl not in ('im2col', 'shifted'):
    raise ValueError(f'conv2d: unknown impl {impl!r}')
  views = _taps(x, k, strides, padding)
  if len(views) == 1:
    return _matmul(views[0], kernel.reshape(cin, cout), precision)
  if impl == 'im2col':
    patches = jnp.concatenate(views, axis=-1)          # [B, Ho, Wo, k*k*Cin]
    return _matmul(patches, kernel.reshape(k * k * cin, cout), precision)
  taps = kernel.reshape(k * k, cin, cout)
  y = _matmul(views[0], taps[0], precision)
  for t in range(1, k * k):
    y = y + _matmul(views[t], taps[t], precision)
  return y


class ConvKxK(nn.Module):
  """k x k convolution with bias, NHWC, by a matmul `impl` ('im2col' or 'shifted';
  'xla'/'eigen' work too): x [B, H, W, Cin] -> [B, Ho, Wo, features].

  Parameters as flax.linen.Conv: 'kernel' [k, k, Cin, features] and 'bias'
  [features] in `param_dtype`; computation in `dtype` (None: promoted from the
  input and parameters, like nn.Conv).
  """
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  impl: str = 'im2col'
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.linear.default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    assert x.ndim == 4, x.shape
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = flax_dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, strides=self.strides, padding=self.padding, impl=self.impl,
               precision=self.precision)
    if bias is not None:
      y = y + bias.reshape(1, 1, 1, -1)
    return y


def conv(features: int, kernel_size: int, *, strides: int = 1, padding: int = 0,
         impl: str = 'xla', name: str | None = None, **kwargs) -> nn.Module:
  """A conv layer x [B, H, W, Cin] -> [B, Ho, Wo, features] by `impl` ('auto' or
  one of IMPLS): nn.Conv for 'xla' and 'eigen', else ConvKxK; the same parameters
  either way.

  kwargs (dtype, param_dtype, kernel_init, bias_init, use_bias, precision) go to the
  module.
  """
  impl = resolve_impl(impl)
  if impl in ('xla', 'eigen'):
    return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                   padding=((padding, padding), (padding, padding)), name=name, **kwargs)
  return ConvKxK(features, kernel_size, strides=strides, padding=padding, impl=impl,
                 name=name, **kwargs)
