"""UNet / AMN / ACN: parameter-count parity with the official PyTorch model, forward
cost, shapes, initialisation, attention placement, KL, and speed of a tiny config."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cimd_jax.bench import model_bench
from cimd_jax.models import build
from cimd_jax.models import latent
from cimd_jax.models import unet as unet_lib
from cimd_jax.utils.errors import ConfigError

@dataclasses.dataclass(frozen=True)
class Arch:
  """A model config with the image shape it is built for."""
  model: build.ModelArgs
  image_size: int
  image_channels: int

  def replace(self, **model_changes) -> 'Arch':
    return Arch(dataclasses.replace(self.model, **model_changes), self.image_size,
                self.image_channels)


# Paper's config (PERF.md config A) and the small config B, 4 image channels.
CONFIG_A = Arch(build.ModelArgs(num_channels=128, channel_mult=(1, 1, 2, 3, 4),
                                num_res_blocks=2, attention_resolutions=(16,), num_heads=1,
                                learn_sigma=True), 128, 4)
CONFIG_B = Arch(build.ModelArgs(num_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=1,
                                attention_resolutions=(16,)), 64, 4)
# AMN/ACN over a 1-channel image + mask (2 input channels).
LATENT = Arch(build.ModelArgs(latent_filters=(32, 64, 128, 192), latent_convs_per_block=3,
                              latent_dim=6), 128, 1)
TINY = Arch(build.ModelArgs(num_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                            attention_resolutions=(8,), latent_filters=(8, 16),
                            latent_convs_per_block=2, latent_dim=3), 16, 1)


def _unet(arch: Arch):
  return build.build_unet(arch.model, arch.image_size)


def _networks(arch: Arch):
  return build.build_networks(arch.model, arch.image_size, arch.image_channels)


def _unet_shapes(arch: Arch):
  return build.unet_param_shapes(arch.model, arch.image_size, arch.image_channels)


def _inputs(args: Arch, batch: int = 2, seed: int = 0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(k1, (batch, args.image_size, args.image_size, args.image_channels + 1))
  t = jax.random.randint(k2, (batch,), 0, 1000)
  return x, t


def _perturb(params, seed: int = 1, scale: float = 0.1):
  """params + N(0, scale²) noise (numpy: no XLA compiles); works on eval_shape trees too."""
  rng = np.random.default_rng(seed)
  def add(path, p):
    base = np.zeros(p.shape, np.float32) if isinstance(p, jax.ShapeDtypeStruct) else p
    if isinstance(p, jax.ShapeDtypeStruct) and jax.tree_util.keystr(path).endswith("'scale']"):
      base = base + 1.0  # GroupNorm scale starts at one
    return jnp.asarray(base + scale * rng.standard_normal(p.shape).astype(np.float32))
  return jax.tree_util.tree_map_with_path(add, params)


def _fwd(unet):
  """Jitted (params, x, t, train=False) -> UNet output (one compile beats eager op-by-op)."""
  return jax.jit(lambda p, x, t: unet.apply({'params': p}, x, t, train=False))


def _random_params(args: Arch, seed: int = 1):
  """Random (non-zero output) UNet params without running the initialisers."""
  return _perturb(_unet_shapes(args), seed)


@pytest.fixture(scope='module')
def tiny():
  """(unet module, random params) of the tiny config (non-zero outputs)."""
  return _unet(TINY), _random_params(TINY)


@pytest.fixture(scope='module')
def tiny_fwd(tiny):
  return _fwd(tiny[0])


@pytest.fixture(scope='module')
def tiny_grad(tiny):
  """Jitted (params, x, t) -> (loss, grads) of the tiny UNet in training mode."""
  unet, _ = tiny
  return jax.jit(jax.value_and_grad(
      lambda p, x, t: jnp.mean(unet.apply({'params': p}, x, t, train=True) ** 2)))


# ---- parity with the official PyTorch model ---------------------------------------


def test_param_count_paper_config():
  assert build.count_params(_unet_shapes(CONFIG_A)) == 85_603_842


def test_param_count_small_config():
  assert build.count_params(_unet_shapes(CONFIG_B)) == 2_999_234


def test_param_count_latent_nets():
  networks = _networks(LATENT)
  x = jnp.zeros((1, 128, 128, 2))
  for net in (networks.amn, networks.acn):
    shapes = jax.eval_shape(lambda n=net: n.init(jax.random.PRNGKey(0), x))
    assert build.count_params(shapes) == 1_368_108


def test_forward_flops_paper_config():
  record = model_bench.bench_model(CONFIG_A.model, 128, 4)
  assert record['unet_params'] == 85_603_842
  assert record['amn_params'] == record['acn_params']
  # 132.17 GFLOP (2 x MAC) per 128x128 image in the official model; XLA skips the
  # multiply-adds on padding, so it reads slightly lower.
  assert abs(record['unet_forward_gflops'] / 132.17 - 1) < 0.05, record
  assert record['unet_forward_flops'] == pytest.approx(record['unet_forward_gflops'] * 1e9)


def test_init_params_keys_and_counts():
  networks = _networks(CONFIG_B)
  shapes = jax.eval_shape(lambda: build.init_params(networks, jax.random.PRNGKey(0), 64, 4))
  assert set(shapes) == {'unet', 'amn', 'acn'}
  assert build.count_params(shapes['unet']) == 2_999_234
  # 5 input channels instead of 2: first conv has 3 more input maps.
  assert build.count_params(shapes['amn']) == 1_368_108 + 3 * 9 * 32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))


def test_init_params_zero_output_at_init():
  channels = 2  # learn_sigma: (eps, v)
  networks = _networks(TINY)
  params = jax.jit(lambda r: build.init_params(networks, r, 16, 1))(jax.random.PRNGKey(0))
  shapes = jax.eval_shape(lambda: build.init_params(networks, jax.random.PRNGKey(0), 16, 1))
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  amn, acn = jax.tree.leaves(params['amn']), jax.tree.leaves(params['acn'])
  assert not all(np.array_equal(a, b) for a, b in zip(amn, acn))  # own rngs
  x, t = _inputs(TINY, batch=3)
  fwd = _fwd(networks.unet)
  out = fwd(params['unet'], x, t)
  assert out.shape == (3, 16, 16, channels) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # zero-initialised output conv
  out = fwd(_perturb(params['unet']), x, t)
  assert out.shape == (3, 16, 16, channels)
  assert float(jnp.abs(out).max()) > 1e-3


@pytest.mark.parametrize('learn_sigma,channels', [(True, 2), (False, 1)])
def test_output_shape(learn_sigma, channels):
  args = TINY.replace(learn_sigma=learn_sigma)
  unet = _unet(args)
  x, t = _inputs(args, batch=3)
  out = jax.eval_shape(lambda: unet.apply(unet.init(jax.random.PRNGKey(0), x, t), x, t))
  assert out.shape == (3, 16, 16, channels) and out.dtype == jnp.float32
  assert _unet_shapes(args)['out_conv']['kernel'].shape == (3, 3, 8, channels)


def test_detach_variance_stops_only_v_gradients_at_the_output_conv():
  """model.detach_variance: the same parameters and output; the gradient of the v
  channel is zero in every layer but the output conv, where it equals the plain
  UNet's; the first (x_0 / eps) channel's gradient is unchanged everywhere."""
  plain, detached = TINY, TINY.replace(detach_variance=True)
  assert jax.tree.map(lambda a: a.shape, _unet_shapes(plain)) == jax.tree.map(
      lambda a: a.shape, _unet_shapes(detached))
  x, t = _inputs(plain, batch=2)
  params = _perturb(_unet_shapes(plain))
  u_plain, u_detached = _unet(plain), _unet(detached)

  @functools.partial(jax.jit, static_argnums=1)
  def output_and_grads(p, detach):
    """UNet output and the gradients of sum(output[..., c] * cos(x)) for c = 0, 1 (one
    compile per UNet: eagerly, the two outputs and four gradients take ~35 s)."""
    unet = u_detached if detach else u_plain
    out, vjp = jax.vjp(lambda q: unet.apply({'params': q}, x, t), p)
    weight = jnp.cos(x[..., :1, 0])[..., None]
    return out, [vjp(jnp.zeros_like(out).at[..., c].set(weight[..., 0]))[0] for c in (0, 1)]

  out_plain, (x0_plain, v_plain) = output_and_grads(params, False)
  out_detached, (x0_detached, v_detached) = output_and_grads(params, True)
  np.testing.assert_array_equal(out_plain, out_detached)
  for name in params:
    for leaf_plain, leaf_detached in zip(jax.tree.leaves(v_plain[name]),
                                         jax.tree.leaves(v_detached[name])):
      if name == 'out_conv':
        np.testing.assert_allclose(leaf_detached, leaf_plain, rtol=1e-6, atol=1e-6)
      else:
        assert float(jnp.abs(leaf_plain).max()) > 0, name   # the check can fail
        assert float(jnp.abs(leaf_detached).max()) == 0, name
  for a, b in zip(jax.tree.leaves(x0_plain), jax.tree.leaves(x0_detached)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_attention_placement_paper_config():
  names = {k for k in _unet_shapes(CONFIG_A) if k.endswith('attn')}
  # 16 px is level 3 (128 -> 64 -> 32 -> 16): input blocks 10, 11; decoder 3, 4, 5.
  assert names == {'input_blocks_10_attn', 'input_blocks_11_attn', 'middle_attn',
                   'output_blocks_3_attn', 'output_blocks_4_attn', 'output_blocks_5_attn'}


def test_attention_placement_follows_config():
  names = {k for k in _unet_shapes(TINY) if k.endswith('attn')}
  assert names == {'input_blocks_3_attn', 'middle_attn', 'output_blocks_0_attn',
                   'output_blocks_1_attn'}
  names = {k for k in _unet_shapes(TINY.replace(attention_resolutions=(16, 8)))
           if k.endswith('attn')}
  assert {'input_blocks_1_attn', 'output_blocks_2_attn', 'output_blocks_3_attn'} <= names
  names = {k for k in _unet_shapes(TINY.replace(attention_resolutions=()))
           if k.endswith('attn')}
  assert names == {'middle_attn'}
  # A size that is no feature map (TINY's maps: 16, 8 px) would give no attention.
  with pytest.raises(ConfigError, match=r'^model.attention_resolutions=\(4,\): expected '
                                        r'feature-map sizes .* some of \(16, 8\)'):
    _unet(TINY.replace(attention_resolutions=(4,)))


def test_heads_from_num_head_channels(tiny):
  one_head_unet, params = tiny
  unet = _unet(TINY.replace(num_head_channels=4))
  x, t = _inputs(TINY, batch=1)
  out = _fwd(unet)(params, x, t)
  one_head = _fwd(one_head_unet)(params, x, t)
  assert out.shape == one_head.shape
  assert not np.allclose(out, one_head, atol=1e-5)  # 4 heads of 4 channels differ


# ---- forward semantics ------------------------------------------------------------


def test_timestep_changes_output(tiny, tiny_fwd):
  _, params = tiny
  x, _ = _inputs(TINY, batch=2)
  a = tiny_fwd(params, x, jnp.array([0, 0], jnp.int32))
  b = tiny_fwd(params, x, jnp.array([500, 0], jnp.int32))
  assert float(jnp.abs(a[0] - b[0]).max()) > 1e-4
  np.testing.assert_allclose(a[1], b[1], atol=1e-6)  # per-example: other row unchanged


def test_image_channels_change_output(tiny, tiny_fwd):
  _, params = tiny
  x, t = _inputs(TINY, batch=2)
  a = tiny_fwd(params, x, t)
  b = tiny_fwd(params, x.at[..., 0].add(1.0), t)
  c = tiny_fwd(params, x.at[..., -1].add(1.0), t)
  assert float(jnp.abs(a - b).max()) > 1e-4 and float(jnp.abs(a - c).max()) > 1e-4


def test_dropout_only_in_training(tiny):
  _, params = tiny
  unet = _unet(TINY.replace(dropout=0.5))
  x, t = _inputs(TINY)
  @jax.jit
  def run(rng):
    ev = unet.apply({'params': params}, x, t, train=False, rngs={'dropout': rng})
    tr = unet.apply({'params': params}, x, t, train=True, rngs={'dropout': rng})
    return ev, tr

  (ev1, tr1), (ev2, tr2) = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
  np.testing.assert_array_equal(ev1, ev2)
  assert float(jnp.abs(tr1 - tr2).max()) > 1e-4


def test_remat_same_params_and_gradients(tiny, tiny_grad):
  _, params = tiny
  args = TINY.replace(remat=True)
  rem = _unet(args)
  assert jax.tree.structure(_unet_shapes(args)) == jax.tree.structure(params)
  x, t = _inputs(TINY, batch=4)
  loss0, g0 = tiny_grad(params, x, t)
  loss1, g1 = jax.jit(jax.value_and_grad(
      lambda p: jnp.mean(rem.apply({'params': p}, x, t, train=True) ** 2)))(params)
  np.testing.assert_allclose(loss0, loss1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute(tiny, tiny_fwd):
  _, params = tiny
  bf = _unet(TINY.replace(compute_dtype='bfloat16'))
  x, t = _inputs(TINY)
  ref = tiny_fwd(params, x, t)
  out = _fwd(bf)(params, x, t)
  assert out.dtype == jnp.float32
  err = float(jnp.abs(out - ref).max()) / float(jnp.abs(ref).max())
  assert err < 0.1, err
  with pytest.raises(ValueError, match='model.compute_dtype'):
    TINY.replace(compute_dtype='float16')


@pytest.mark.parametrize('scale_shift,updown', [(True, False), (True, True)])
def test_variants_scale_shift_and_resblock_updown(scale_shift, updown):
  args = TINY.replace(use_scale_shift_norm=scale_shift, resblock_updown=updown)
  shapes = _unet_shapes(args)
  emb = shapes['input_blocks_1_res']['emb_dense']['kernel']
  assert emb.shape == (32, 16 if scale_shift else 8)  # 4*8 -> (2x) out
  if updown:
    assert 'in_conv' in shapes['input_blocks_2_down']  # a ResBlock, not a bare conv
    assert 'in_conv' in shapes['output_blocks_1_up']
  else:
    assert set(shapes['input_blocks_2_down']) == {'conv'}
  unet = _unet(args)
  x, t = _inputs(args)
  out = _fwd(unet)(_perturb(shapes), x, t)
  assert out.shape == (2, 16, 16, 2) and bool(jnp.all(jnp.isfinite(out)))


def test_resblock_updown_param_count():
  # Analytic count: each down/up ResBlock (C -> C, no skip) adds, over a stride-2 conv
  # (9C^2 + C), 2 GroupNorms + emb Dense + a second conv3x3.
  base = build.count_params(_unet_shapes(TINY))
  updown = build.count_params(_unet_shapes(TINY.replace(resblock_updown=True)))
  c, e = 8, 32  # down at 8 channels (level 0); up at 16 channels (level 1)
  extra_down = 2 * 2 * c + (e * c + c) + (9 * c * c + c)
  c = 16
  extra_up = 2 * 2 * c + (e * c + c) + (9 * c * c + c)
  assert updown - base == extra_down + extra_up


def test_downsample_pads_like_pytorch():
  # PyTorch padding=1 pads both sides; XLA 'SAME' at stride 2 would pad only after.
  down = unet_lib.Downsample()
  x = jnp.ones((1, 4, 4, 1))
  params = down.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(jnp.ones_like, params)
  params['params']['conv']['bias'] = jnp.zeros((1,))
  out = down.apply(params, x)
  assert out.shape == (1, 2, 2, 1)
  np.testing.assert_allclose(out[0, :, :, 0], [[4., 6.], [6., 9.]])


def test_upsample_nearest():
  x = jnp.arange(4.).reshape(1, 2, 2, 1)
  np.testing.assert_array_equal(
      unet_lib.upsample_nearest(x)[0, :, :, 0],
      [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


def test_timestep_embedding_formula():
  t = jnp.array([0, 7, 999])
  emb = unet_lib.timestep_embedding(t, 8)
  freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
  args = np.array([0, 7, 999])[:, None] * freqs[None]
  np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], 1),
                             rtol=1e-5, atol=1e-5)
  assert unet_lib.timestep_embedding(t, 7).shape == (3, 7)


def test_attention_block_matches_numpy():
  block = unet_lib.AttentionBlock(num_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 64))
  params = _perturb(jax.eval_shape(block.init, jax.random.PRNGKey(1), x), scale=0.1)
  out = np.asarray(block.apply(params, x))
  p = jax.tree.map(np.asarray, params['params'])
  xs = np.asarray(x).reshape(2, 9, 64)
  g = xs.reshape(2, 9, 32, 2)  # 32 groups of 2 channels
  mu, var = g.mean(axis=(1, 3), keepdims=True), g.var(axis=(1, 3), keepdims=True)
  h = ((g - mu) / np.sqrt(var + 1e-5)).reshape(2, 9, 64)
  h = h * p['norm']['gn']['scale'] + p['norm']['gn']['bias']
  qkv = h @ p['qkv']['kernel'] + p['qkv']['bias']  # [B, L, 3C], head-major [q, k, v]
  heads = []
  for head in range(2):
    q, k, v = np.split(qkv[..., head * 96:(head + 1) * 96], 3, axis=-1)
    w = np.einsum('bqc,bkc->bqk', q, k) / np.sqrt(32)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    heads.append(np.einsum('bqk,bkc->bqc', w, v))
  a = np.concatenate(heads, -1) @ p['proj_out']['kernel'] + p['proj_out']['bias']
  np.testing.assert_allclose(out, (xs + a).reshape(2, 3, 3, 64), rtol=1e-4, atol=1e-4)


# ---- AMN / ACN and KL ---------------------------------------------------------------


def test_latent_net_shapes():
  net = build.build_latent_net(TINY.model, 1)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 2))
  params = _perturb(jax.eval_shape(net.init, jax.random.PRNGKey(1), x))
  mean, log_sigma = jax.jit(net.apply)(params, x)
  assert mean.shape == (3, 3) and log_sigma.shape == (3, 3)
  assert mean.dtype == log_sigma.dtype == jnp.float32
  assert float(jnp.abs(mean - log_sigma).max()) > 0
  # Odd sizes pool with ceil like PyTorch; channel mismatch is an error.
  mean, _ = jax.eval_shape(net.apply, params, x[:, :15, :15])
  assert mean.shape == (3, 3)
  with pytest.raises(ValueError):
    net.apply(params, jnp.zeros((1, 16, 16, 3)))


def test_latent_pooling_before_every_block_but_first():
  net = build.build_latent_net(LATENT.model, 1)
  x = jnp.zeros((1, 128, 128, 2))
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
  _, state = jax.eval_shape(lambda p: net.apply(p, x, capture_intermediates=True), params)
  inter = state['intermediates']
  sizes = [inter[f'block{i}_conv0']['__call__'][0].shape[1] for i in range(4)]
  assert sizes == [128, 64, 32, 16]


def test_kl_equal_gaussians_is_zero():
  mean = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
  log_sigma = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (4, 6))
  kl = latent.kl_diag_gaussians(mean, log_sigma, mean, log_sigma)
  assert kl.shape == (4,)
  np.testing.assert_allclose(kl, 0.0, atol=1e-6)


def test_kl_matches_numpy_closed_form():
  rng = np.random.default_rng(0)
  mq, mp = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
  lq, lp = 0.5 * rng.normal(size=(5, 6)), 0.5 * rng.normal(size=(5, 6))
  sq, sp = np.exp(lq), np.exp(lp)
  expected = np.sum(np.log(sp / sq) + (sq ** 2 + (mq - mp) ** 2) / (2 * sp ** 2) - 0.5, -1)
  kl = latent.kl_diag_gaussians(*(jnp.asarray(a, jnp.float32) for a in (mq, lq, mp, lp)))
  np.testing.assert_allclose(kl, expected, rtol=1e-5)
  assert bool(jnp.all(kl > 0))
  # Asymmetric: KL(Q||P) != KL(P||Q) in general.
  rev = latent.kl_diag_gaussians(*(jnp.asarray(a, jnp.float32) for a in (mp, lp, mq, lq)))
  assert not np.allclose(kl, rev)


# ---- gradients ----------------------------------------------------------------------


def test_tiny_forward_and_grad_finite(tiny, tiny_grad):
  _, params = tiny
  x, t = _inputs(TINY, batch=4)
  loss, grads = jax.block_until_ready(tiny_grad(params, x, t))
  assert np.isfinite(float(loss)) and build.count_params(grads) == build.count_params(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_ambiguity_off_builds_no_latent_nets():
  networks = _networks(TINY.replace(ambiguity='off'))
  assert networks.amn is None and networks.acn is None
  shapes = jax.eval_shape(lambda: build.init_params(networks, jax.random.PRNGKey(0), 16, 1))
  assert set(shapes) == {'unet'}
