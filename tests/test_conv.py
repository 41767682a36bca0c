"""models/conv.py: every conv implementation equals flax.linen.Conv (forward and
gradients w.r.t. input, kernel and bias) and leaves the parameter trees of the UNet
and the AMN/ACN unchanged; 'auto' resolves per backend."""

import dataclasses

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from cimd_jax.models import build
from cimd_jax.models import conv as conv_lib

MATMUL_IMPLS = ('im2col', 'shifted')

# (batch, H, W, Cin, Cout, kernel, stride): odd and even sizes, non-square maps,
# stride 1 and 2, 1x1 and 3x3, Cin != Cout, Cin = 1.
SHAPES = [
    (2, 6, 6, 3, 5, 3, 1),
    (3, 7, 5, 4, 2, 3, 1),
    (2, 8, 8, 4, 4, 3, 2),
    (2, 7, 9, 3, 6, 3, 2),
    (2, 5, 6, 6, 3, 1, 1),
    (2, 7, 7, 2, 4, 1, 2),
    (2, 4, 4, 1, 3, 3, 1),
]


# The tests compare implementations under the same XLA options; LLVM optimisation
# level 0 compiles the tiny UNet ~3x faster.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _jit(fn):
  return jax.jit(fn, compiler_options=_FAST_COMPILE)


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _modules(cout, k, stride, impl):
  pad = 1 if k == 3 else 0
  ref = nn.Conv(cout, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)))
  return ref, conv_lib.conv(cout, k, strides=stride, padding=pad, impl=impl)


def _loss_and_grads(module, params, x, dy):
  """(y, d<y, dy>/dx, d/dparams) in one jitted call."""
  def f(p, x_):
    y = module.apply({'params': p}, x_)
    return jnp.sum(y * dy), y
  (_, y), (dp, dx) = _jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
  return y, dx, dp


@pytest.mark.parametrize('impl', MATMUL_IMPLS)
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_conv_matches_flax_conv(shape, impl):
  """Forward and gradients (input, kernel, bias) equal nn.Conv's to 1e-5 relative, and
  the parameters have nn.Conv's names, shapes and dtypes."""
  b, h, w, cin, cout, k, stride = shape
  rng = np.random.default_rng(sum(shape))
  x = jnp.asarray(rng.standard_normal((b, h, w, cin)), jnp.float32)
  ref, mod = _modules(cout, k, stride, impl)
  assert isinstance(mod, conv_lib.ConvKxK)
  shapes = jax.eval_shape(ref.init, jax.random.PRNGKey(0), x)['params']
  assert _shapes(jax.eval_shape(mod.init, jax.random.PRNGKey(0), x)['params']) == \
      _shapes(shapes) == {'kernel': ((k, k, cin, cout), jnp.float32),
                          'bias': ((cout,), jnp.float32)}
  # A random bias too (nn.Conv starts it at zero), so that a lost bias shows.
  params = _perturbed(shapes, sum(shape))
  out = jax.eval_shape(ref.apply, {'params': params}, x)
  dy = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  y0, dx0, dp0 = _loss_and_grads(ref, params, x, dy)
  y1, dx1, dp1 = _loss_and_grads(mod, params, x, dy)
  assert y1.shape == y0.shape == out.shape
  assert _rel_err(y1, y0) < 1e-5, 'forward'
  assert _rel_err(dx1, dx0) < 1e-5, 'grad input'
  assert _rel_err(dp1['kernel'], dp0['kernel']) < 1e-5, 'grad kernel'
  assert _rel_err(dp1['bias'], dp0['bias']) < 1e-5, 'grad bias'


def test_conv2d_functional_matches_lax():
  """conv2d (no bias) of every impl equals lax.conv_general_dilated, stride 2, odd size."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, 3)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
  ref = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  for impl in conv_lib.IMPLS:
    y = conv_lib.conv2d(x, kernel, strides=2, padding=1, impl=impl)
    assert _rel_err(y, ref) < 1e-5, impl


def test_eigen_options_move_convolutions_off_ynnpack():
  """conv.compiler_options('eigen') compiles nn.Conv without YNNPACK fusions (so
  XLA:CPU's Eigen convolution runs) and gives nn.Conv's numbers; the train step's
  helper derives them from the networks."""
  from cimd_jax.train import step  # pylint: disable=g-import-not-at-top
  options = conv_lib.compiler_options('eigen', backend='cpu')
  assert options and conv_lib.compiler_options('xla', 'im2col', backend='cpu') is None
  assert conv_lib.compiler_options('xla', 'eigen', backend='cpu') == options  # one eigen net
  assert conv_lib.compiler_options('eigen', backend='gpu') is None
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 20)), jnp.float32)   # > 16 channels: YNN-able
  module = conv_lib.conv(24, 3, strides=2, padding=1, impl='eigen')
  params = _perturbed(jax.eval_shape(module.init, jax.random.PRNGKey(0), x), 4)
  fn = lambda p, x_: module.apply(p, x_)
  eigen = jax.jit(fn).lower(params, x).compile(compiler_options=options)
  assert '__ynn_fusion' not in eigen.as_text()
  assert _rel_err(eigen(params, x), jax.jit(fn)(params, x)) < 1e-5
  if jax.default_backend() == 'cpu':
    nets = build.build_networks(dataclasses.replace(TINY, conv_impl='eigen'), 8, 1)
    assert step.conv_compiler_options(nets) == options
    assert step.conv_compiler_options(build.build_networks(TINY, 8, 1)) is None


def test_resolve_impl():
  assert conv_lib.resolve_impl('auto', 'cpu') == conv_lib.AUTO_IMPL['cpu']
  assert conv_lib.resolve_impl('auto', 'gpu') == 'xla'
  assert conv_lib.resolve_impl('auto', 'tpu') == 'xla'
  for impl in conv_lib.IMPLS:
    assert conv_lib.resolve_impl(impl, 'gpu') == impl
  with pytest.raises(ValueError):
    conv_lib.resolve_impl('cudnn')


# A tiny UNet and latent net (8 px, 1 image channel) with XLA's convolutions.
TINY = build.ModelArgs(num_channels=4, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(), use_scale_shift_norm=True,
                       latent_filters=(4, 8), latent_convs_per_block=2, latent_dim=3,
                       conv_impl='xla')

def _unet(model):
  return build.build_unet(model, 8)


def _latent(model):
  return build.build_latent_net(model, 1)


def _perturbed(shapes, seed):
  """Parameters for an eval_shape tree: N(0, 0.1²) around zero (one for GroupNorm
  scales), so that no conv is zero (zero-initialised convs would hide errors)."""
  rng = np.random.default_rng(seed)

  def leaf(path, p):
    base = 1.0 if jax.tree_util.keystr(path).endswith("'scale']") else 0.0
    return jnp.asarray(base + 0.1 * rng.standard_normal(p.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _shapes(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _primitives(jaxpr) -> set[str]:
  """Names of all primitives in a closed jaxpr, sub-jaxprs included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


@pytest.mark.parametrize('impl', MATMUL_IMPLS)
def test_every_conv_takes_the_impl(impl):
  """With a matmul conv_impl no convolution is left in the UNet or the latent net (the
  impl reaches every conv), and the parameter trees are those of conv_impl='xla'."""
  x = jnp.zeros((2, 8, 8, 2))
  t = jnp.array([3, 700], jnp.int32)
  for make, call in ((_unet, lambda net: (lambda v: net.apply(v, x, t))),
                     (_latent, lambda net: (lambda v: net.apply(v, x)))):
    init_args = (x, t) if make is _unet else (x,)
    ref, mine = make(TINY), make(dataclasses.replace(TINY, conv_impl=impl))
    shapes = jax.eval_shape(lambda: ref.init(jax.random.PRNGKey(0), *init_args))
    assert _shapes(jax.eval_shape(lambda: mine.init(jax.random.PRNGKey(0), *init_args))) \
        == _shapes(shapes)
    assert 'conv_general_dilated' in _primitives(jax.make_jaxpr(call(ref))(shapes).jaxpr)
    assert 'conv_general_dilated' not in _primitives(
        jax.make_jaxpr(call(mine))(shapes).jaxpr)


def test_unet_same_outputs_and_grads():
  """Given the same parameters, the UNet with conv_impl='im2col' gives the output and
  gradients (w.r.t. parameters and input) of conv_impl='xla'. ('shifted' is wired the
  same way: test_every_conv_takes_the_impl; each impl's convs: the tests above.)"""
  ref = _unet(TINY)
  mine = _unet(dataclasses.replace(TINY, conv_impl='im2col'))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 2))
  t = jnp.array([3, 700], jnp.int32)
  params = _perturbed(jax.eval_shape(lambda: ref.init(jax.random.PRNGKey(0), x, t))['params'],
                      2)

  def run(unet):
    def f(p, x_):
      out = unet.apply({'params': p}, x_, t)
      return jnp.sum(out * jnp.cos(out)), out
    return _jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
  (_, out0), (dp0, dx0) = run(ref)
  (_, out1), (dp1, dx1) = run(mine)
  # Through the whole UNet (about 20 convs, GroupNorms and the time embedding) the
  # two float32 programs differ by rounding alone: against a float64 run of the same
  # parameters the worst parameter gradient is 6.3e-6 off (xla) and 9.6e-6 (im2col)
  # on a Zen4 (AVX-512) CPU, and they differed from each other by 1.14e-5 under the
  # test flags. So 5e-5 here; each conv is held to 1e-5 above, and a wiring error
  # (a conv's padding, stride or bias lost) is off by far more.
  assert _rel_err(out1, out0) < 5e-5
  assert _rel_err(dx1, dx0) < 5e-5
  errs = jax.tree.map(_rel_err, dp1, dp0)
  assert max(jax.tree.leaves(errs)) < 5e-5, errs


@pytest.mark.parametrize('impl', MATMUL_IMPLS)
def test_latent_same_outputs_and_grads(impl):
  """AMN/ACN with conv_impl=impl: the outputs and gradients of conv_impl='xla'."""
  ref = _latent(TINY)
  mine = _latent(dataclasses.replace(TINY, conv_impl=impl))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 7, 2))   # odd: ceil-mode pooling
  params = _perturbed(jax.eval_shape(lambda: ref.init(jax.random.PRNGKey(0), x))['params'], 3)

  def run(net):
    def f(p, x_):
      mean, log_sigma = net.apply({'params': p}, x_)
      return jnp.sum(mean ** 2) + jnp.sum(jnp.sin(log_sigma)), (mean, log_sigma)
    return _jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
  (_, out0), (dp0, dx0) = run(ref)
  (_, out1), (dp1, dx1) = run(mine)
  for a, b in zip(out1, out0):
    assert _rel_err(a, b) < 1e-5
  assert _rel_err(dx1, dx0) < 1e-5
  errs = jax.tree.map(_rel_err, dp1, dp0)
  assert max(jax.tree.leaves(errs)) < 1e-5, errs
