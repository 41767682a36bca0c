"""Micro-benchmark of convolution implementations on the conv shapes of configs A, B
and demo (cimd_jax.models.conv), interleaved, with the in-run matmul roofline.

  python -m cimd_jax.bench.conv_bench [--configs=A,B,demo] [--rounds=5] [--json=PATH]
  python -m cimd_jax.bench.conv_bench --what=scan [--configs=demo,B] [--batch=16] [--steps=4]

Variants per shape (float32; forward, and forward + backward w.r.t. input, kernel
and bias):
  xla        lax.conv_general_dilated NHWC/HWIO as nn.Conv emits it (baseline);
  xla_nchw   the same convolution with NCHW/OIHW operands (input given as NCHW);
  xla_eigen  'xla' compiled with conv.compiler_options('eigen') (YNNPACK fusion
             kept off convolutions), so XLA:CPU's own (Eigen) convolution runs;
  im2col     conv.conv2d(impl='im2col') (one matmul over [B, Ho, Wo, 9*Cin]);
  shifted    conv.conv2d(impl='shifted') (nine [B*Ho*Wo, Cin] x [Cin, Cout] matmuls);
  dot        1x1 convs as one dot_general (what both matmul impls emit for 1x1).
Each round times every variant once (A, B, C, A, B, C, ...) and a 2048^2 float32
matmul; the table reports medians. GFLOP/s count 2*B*Ho*Wo*k*k*Cin*Cout per
forward and 3x that for forward + backward. Caution: YNNPACK ('xla') and Eigen
('xla_eigen') programs run alternately in one process slow each other down (their
thread pools compete); whole programs are better compared one process per variant.

--what=scan: a UNet forward (the sampler's reverse-step network call) `steps` times
inside one jitted `lax.scan` vs the same jitted forward called `steps` times from
Python, per conv impl; ms per forward.
"""

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cimd_jax.models import build
from cimd_jax.models import conv as conv_lib

# (config, batch, H, Cin, Cout, k, stride): the heaviest conv shapes of each config
# plus its stride-2, 1x1 and small-Cin convs (UNet and AMN/ACN).
SHAPES = {
    'A': [(4, 128, 128, 128, 3, 1), (4, 128, 256, 128, 3, 1), (4, 32, 256, 256, 3, 1),
          (4, 8, 512, 512, 3, 1), (4, 128, 128, 128, 3, 2), (4, 128, 256, 128, 1, 1),
          (4, 128, 5, 128, 3, 1), (4, 128, 32, 32, 3, 1)],
    'B': [(20, 64, 32, 32, 3, 1), (20, 64, 96, 32, 3, 1), (20, 32, 64, 64, 3, 1),
          (20, 8, 128, 128, 3, 1), (20, 64, 32, 32, 3, 2), (20, 64, 96, 32, 1, 1),
          (20, 64, 5, 32, 3, 1)],
    'demo': [(32, 32, 32, 32, 3, 1), (32, 16, 64, 64, 3, 1), (32, 8, 64, 64, 3, 1),
             (32, 32, 32, 32, 3, 2), (32, 32, 96, 32, 1, 1), (32, 32, 2, 16, 3, 1)],
}

EIGEN_CONV = conv_lib.compiler_options('eigen', backend='cpu')


def _conv_fn(variant: str, k: int, stride: int):
  """(fn(x, kernel, bias) -> y, compiler options, layout) for one variant."""
  pad = 1 if k == 3 else 0
  if variant == 'xla_nchw':
    def fn(x, w, b):
      y = jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                       dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
      return y + b.reshape(1, -1, 1, 1)
    return fn, None, 'nchw'
  impl = {'xla': 'xla', 'xla_eigen': 'xla', 'im2col': 'im2col', 'shifted': 'shifted',
          'dot': 'im2col'}[variant]

  def fn(x, w, b):
    return conv_lib.conv2d(x, w, strides=stride, padding=pad, impl=impl) + b
  return fn, (EIGEN_CONV if variant == 'xla_eigen' else None), 'nhwc'


def _variants(k: int) -> list[str]:
  return ['xla', 'xla_nchw', 'xla_eigen'] + (['im2col', 'shifted'] if k == 3 else ['dot'])


def _compile(fn, args, options):
  lowered = jax.jit(fn).lower(*args)
  return lowered.compile(compiler_options=options) if options else lowered.compile()


def _time_once(compiled, args) -> float:
  t = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - t


def bench_shape(batch, h, cin, cout, k, stride, rounds, matmul):
  """Median seconds per variant and mode, and the median matmul GFLOP/s of the rounds."""
  rng = np.random.default_rng(0)
  ho = (h + 2 * (1 if k == 3 else 0) - k) // stride + 1
  x = jnp.asarray(rng.standard_normal((batch, h, h, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
  b = jnp.asarray(rng.standard_normal((cout,)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((batch, ho, ho, cout)), jnp.float32)
  programs = {}
  for variant in _variants(k):
    fn, options, layout = _conv_fn(variant, k, stride)
    if layout == 'nchw':
      args = (x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), b)
      cot = dy.transpose(0, 3, 1, 2)
    else:
      args, cot = (x, w, b), dy

    def fwd_bwd(x_, w_, b_, dy_, fn=fn):
      y, vjp = jax.vjp(fn, x_, w_, b_)
      return y, vjp(dy_)
    programs[(variant, 'fwd')] = (_compile(fn, args, options), args)
    programs[(variant, 'fwd+bwd')] = (_compile(fwd_bwd, args + (cot,), options), args + (cot,))
  for compiled, args in programs.values():   # warm-up
    jax.block_until_ready(compiled(*args))
  times = {key: [] for key in programs}
  mm = []
  for _ in range(rounds):
    for key, (compiled, args) in programs.items():
      times[key].append(_time_once(compiled, args))
    mm.append(2.0 * 2048 ** 3 / _time_once(*matmul) / 1e9)
  return {key: statistics.median(v) for key, v in times.items()}, statistics.median(mm)


# (model, image size, image channels) of configs A, B and the demo.
UNETS = {
    'A': (build.ModelArgs(num_channels=128, channel_mult=(1, 1, 2, 3, 4), num_res_blocks=2,
                          attention_resolutions=(16,)), 128, 4),
    'B': (build.ModelArgs(num_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=1,
                          attention_resolutions=(16,)), 64, 4),
    'demo': (build.ModelArgs(num_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                             attention_resolutions=(8,), use_scale_shift_norm=True), 32, 1),
}


def bench_scan(unet: tuple[build.ModelArgs, int, int], batch: int, steps: int, rounds: int):
  """{variant: (ms per forward in a lax.scan, ms per forward from a Python loop)}."""
  model, size, chans = unet
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, chans)), jnp.float32)
  x0 = jnp.asarray(rng.standard_normal((batch, size, size, 1)), jnp.float32)
  params = None
  programs = {}
  for variant in ('xla', 'eigen', 'im2col', 'shifted'):
    impl = variant
    unet = build.build_unet(dataclasses.replace(model, conv_impl=impl), size)
    if params is None:
      params = jax.jit(lambda k, unet=unet: unet.init(
          k, jnp.zeros((1, size, size, chans + 1)), jnp.zeros((1,), jnp.int32)))(
              jax.random.PRNGKey(0))

    def forward(p, x, t, unet=unet):
      out = unet.apply(p, jnp.concatenate([image, x], -1), jnp.full((batch,), t, jnp.int32))
      return out[..., :1]

    def scanned(p, x, forward=forward):
      return jax.lax.scan(lambda c, t: (forward(p, c, t), None), x,
                          jnp.arange(steps, dtype=jnp.int32))[0]
    options = conv_lib.compiler_options(impl)
    t0 = jnp.asarray(0, jnp.int32)
    programs[variant] = (_compile(scanned, (params, x0), options),
                         _compile(forward, (params, x0, t0), options))
  for scan_c, step_c in programs.values():   # warm-up
    jax.block_until_ready(scan_c(params, x0))
    jax.block_until_ready(step_c(params, x0, jnp.asarray(0, jnp.int32)))
  times = {k: ([], []) for k in programs}
  ts = [jnp.asarray(t, jnp.int32) for t in range(steps)]
  for _ in range(rounds):
    for variant, (scan_c, step_c) in programs.items():
      t = time.perf_counter()
      jax.block_until_ready(scan_c(params, x0))
      times[variant][0].append((time.perf_counter() - t) / steps)
      t = time.perf_counter()
      x = x0
      for ti in ts:
        x = step_c(params, x, ti)
      jax.block_until_ready(x)
      times[variant][1].append((time.perf_counter() - t) / steps)
  return {k: (statistics.median(a) * 1e3, statistics.median(b) * 1e3)
          for k, (a, b) in times.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--what', default='shapes', choices=('shapes', 'scan'))
  parser.add_argument('--configs', default='A,B,demo')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  if args.what == 'scan':
    print(f'{"config":6} {"variant":10} {"scan ms/fwd":>12} {"loop ms/fwd":>12}', flush=True)
    for config in args.configs.split(','):
      res = bench_scan(UNETS[config], args.batch, args.steps, args.rounds)
      for variant, (scan_ms, loop_ms) in res.items():
        print(f'{config:6} {variant:10} {scan_ms:12.1f} {loop_ms:12.1f}', flush=True)
    return
  a = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), jnp.float32)
  mm_compiled = jax.jit(jnp.matmul).lower(a, a).compile()
  jax.block_until_ready(mm_compiled(a, a))
  matmul = (mm_compiled, (a, a))
  rows = []
  print(f'{"config":6} {"shape (B,H,Cin,Cout,k,s)":28} {"variant":10} {"fwd GF/s":>9} '
        f'{"f+b GF/s":>9} {"fwd ms":>9} {"f+b ms":>9} {"matmul GF/s":>11}', flush=True)
  for config in args.configs.split(','):
    for shape in SHAPES[config]:
      batch, h, cin, cout, k, stride = shape
      ho = (h + 2 * (1 if k == 3 else 0) - k) // stride + 1
      flops = 2.0 * batch * ho * ho * k * k * cin * cout
      med, mm = bench_shape(*shape, rounds=args.rounds, matmul=matmul)
      for variant in _variants(k):
        fwd, fb = med[(variant, 'fwd')], med[(variant, 'fwd+bwd')]
        row = {'config': config, 'shape': shape, 'variant': variant,
               'fwd_gflops': flops / fwd / 1e9, 'fwd_bwd_gflops': 3 * flops / fb / 1e9,
               'fwd_s': fwd, 'fwd_bwd_s': fb, 'matmul_gflops': mm}
        rows.append(row)
        print(f'{config:6} {str(shape):28} {variant:10} {row["fwd_gflops"]:9.1f} '
              f'{row["fwd_bwd_gflops"]:9.1f} {fwd * 1e3:9.2f} {fb * 1e3:9.2f} {mm:11.1f}',
              flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
