"""Sampling speed: one reverse step of a whole ensemble (B images x N samples in one
batch) and a whole ensemble through the scanned sampler."""

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cimd_jax import settings as settings_lib
from cimd_jax.bench import common
from cimd_jax.diffusion import samplers
from cimd_jax.inference import ensemble as ensemble_lib
from cimd_jax.models import build
from cimd_jax.models import conv


def _unet_params(s: settings_lib.Settings) -> Any:
  """Fresh UNet parameters of the configured model (jitted init; values do not
  change the timings)."""
  size, channels = s.data.image_size, s.data.image_channels
  unet = build.build_unet(s.model, size)
  return jax.jit(lambda k: unet.init(
      k, jnp.zeros((1, size, size, channels + 1)), jnp.zeros((1,), jnp.int32),
      train=False)['params'])(jax.random.PRNGKey(0))


def bench_sample(settings: settings_lib.Settings, num_images: int = 1, repeats: int = 5,
                 ensemble: str = 'auto', max_ensemble_s: float = 600.0) -> dict[str, Any]:
  """Seconds per reverse step of the B*N-row ensemble and per whole ensemble.

  `ensemble`: 'measure' times one whole ensemble through `sample_ensemble` (after a
  compile call), 'estimate' reports step time x steps, 'auto' measures when the
  estimate is under `max_ensemble_s`.
  """
  s = settings
  size, channels = s.data.image_size, s.data.image_channels
  params = _unet_params(s)
  tables = s.sampling.tables(s.diffusion.betas())
  n, b = s.sampling.num_samples, num_images
  rows = b * n

  apply_fn = ensemble_lib.denoiser(s.model, size, s.diffusion, s.sampling.clip_variance,
                                   s.sampling.variance_transfer, tables)

  step_fn = jax.jit(lambda p, img, keys, x, i: samplers.reverse_step(
      apply_fn, p, tables, img, keys, x, i, sampler=s.sampling.sampler,
      variance=s.diffusion.variance, eta=s.sampling.ddim_eta),
      compiler_options=conv.compiler_options(s.model.conv_impl))
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.uniform(-1, 1, (rows, size, size, channels)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((rows, size, size, 1)), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(1), rows)
  i = jnp.int32(tables.num_timesteps - 1)
  compiled, compile_s, flops = common.compile_timed(step_fn, params, image, keys, x, i)
  step_median, times = common.time_calls(lambda: compiled(params, image, keys, x, i),
                                         repeats=repeats, warmup=1)
  num_steps = tables.num_timesteps
  record = {
      'what': 'sample', 'sampler': s.sampling.sampler,
      'steps': num_steps, 'num_images': b, 'num_samples': n, 'rows': rows,
      'step_median_s': step_median, 'step_times_s': times, 'step_compile_s': compile_s,
      'flops_per_step': flops, 'gflops_per_s': flops / step_median / 1e9,
      'ensemble_estimate_s': step_median * num_steps,
  }
  measure = ensemble == 'measure' or (ensemble == 'auto' and
                                      step_median * num_steps <= max_ensemble_s)
  if measure:
    record.update(time_ensemble(s, params, b))
  else:
    record['ensemble_s'] = record['ensemble_estimate_s']
    record['ensemble_measured'] = False
  record['peak_rss_mib'] = common.peak_rss_mib()
  record['device_peak_mib'] = common.device_peak_mib()
  return record


def time_ensemble(settings: settings_lib.Settings, params: Any, num_images: int
                  ) -> dict[str, Any]:
  """One whole ensemble (num_images x sampling.num_samples masks) through the
  scanned sampler, end to end as `make_ensemble_fn` runs it: the first call
  (compile + run) and a second, timed call with another key. Returns ensemble_s,
  ensemble_compile_s (first minus second), ensemble_step_s (per step inside the
  lax.scan), ensemble_measured."""
  s = settings
  size, channels = s.data.image_size, s.data.image_channels
  images = np.asarray(np.random.default_rng(1).uniform(-1, 1, (num_images, size, size,
                                                               channels)), np.float32)
  draw = ensemble_lib.make_ensemble_fn(s.model, size, s.diffusion, s.sampling)
  t = time.perf_counter()
  draw(params, images, jax.random.PRNGKey(2), 0)  # compile + first run
  first = time.perf_counter() - t
  t = time.perf_counter()
  masks = draw(params, images, jax.random.PRNGKey(3), 0)
  seconds = time.perf_counter() - t
  n = s.sampling.num_samples
  assert masks.shape == (num_images, n, size, size), masks.shape
  steps = s.sampling.tables(s.diffusion.betas()).num_timesteps
  return {'ensemble_s': seconds, 'ensemble_compile_s': max(first - seconds, 0.0),
          'ensemble_step_s': seconds / steps, 'ensemble_measured': True}


def bench_ensemble(settings: settings_lib.Settings, num_images: int = 1) -> dict[str, Any]:
  """`--what=ensemble`: a whole ensemble timed end to end (compile apart), with the
  per-step time inside the scan, for the configured sampler and N."""
  s = settings
  params = _unet_params(s)
  record = {'what': 'ensemble', 'sampler': s.sampling.sampler,
            'steps': s.sampling.tables(s.diffusion.betas()).num_timesteps,
            'num_images': num_images, 'num_samples': s.sampling.num_samples,
            'rows': num_images * s.sampling.num_samples,
            **time_ensemble(s, params, num_images)}
  record['peak_rss_mib'] = common.peak_rss_mib()
  return record
