"""Model size and cost: parameter counts of the three networks and the UNet's forward
FLOPs per image from XLA's cost analysis (`python -m cimd_jax.bench --what=model`)."""

import time
from typing import Any

import jax
import jax.numpy as jnp

from cimd_jax.models import build


def _flops(cost: Any) -> float:
  """The 'flops' entry of a cost analysis (a dict, or a list of per-module dicts)."""
  if isinstance(cost, (list, tuple)):
    return float(sum((c or {}).get('flops', 0.0) for c in cost))
  return float((cost or {}).get('flops', 0.0))


def unet_forward_flops(model: build.ModelArgs, image_size: int, image_channels: int,
                       compile_it: bool = True) -> tuple[float, str, float]:
  """(FLOPs of one UNet forward at batch 1, 'compiled'|'lowered', seconds spent).

  Nothing is initialised: parameters are abstract (`jax.eval_shape`). XLA counts
  2 FLOPs per multiply-add and skips the taps that fall on SAME padding, so the
  figure reads a little below the analytic 2·MAC count. The compiled analysis is
  used when `compile_it` and available, else the (pre-optimisation) lowered one.
  """
  unet = build.build_unet(model, image_size)
  size, chans = image_size, image_channels + 1
  x = jax.ShapeDtypeStruct((1, size, size, chans), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros(x.shape),
                                            jnp.zeros(t.shape, jnp.int32), train=False))
  fwd = jax.jit(lambda p, x, t: unet.apply(p, x, t, train=False))
  start = time.perf_counter()
  lowered = fwd.lower(params, x, t)
  if compile_it:
    flops = _flops(lowered.compile().cost_analysis())
    if flops > 0:
      return flops, 'compiled', time.perf_counter() - start
  return _flops(lowered.cost_analysis()), 'lowered', time.perf_counter() - start


def bench_model(model: build.ModelArgs, image_size: int, image_channels: int,
                compile_it: bool = True) -> dict[str, Any]:
  """Parameter counts of UNet/AMN/ACN and the UNet forward FLOPs per image.

  Returns a dict with `unet_params`, `amn_params`, `acn_params`, `total_params`,
  `unet_forward_flops` (per image, batch 1), `unet_forward_gflops`, `flops_source`
  ('compiled' or 'lowered') and `flops_analysis_s` (lowering + compile seconds).
  """
  networks = build.build_networks(model, image_size, image_channels)
  shapes = jax.eval_shape(lambda: build.init_params(
      networks, jax.random.PRNGKey(0), image_size, image_channels))
  counts = {f'{k}_params': build.count_params(v) for k, v in shapes.items()}
  flops, source, seconds = unet_forward_flops(model, image_size, image_channels, compile_it)
  return {
      **counts,
      'total_params': sum(counts.values()),
      'unet_forward_flops': flops,
      'unet_forward_gflops': flops / 1e9,
      'flops_source': source,
      'flops_analysis_s': seconds,
      'image_size': image_size,
      'compute_dtype': model.compute_dtype,
  }
