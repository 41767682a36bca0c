"""Training-step throughput: one full CIMD update (UNet + AMN + ACN forward, backward,
clipping, AdamW, EMA) on a synthetic batch, jitted and donated as in training."""

from typing import Any

import jax

from cimd_jax import settings as settings_lib
from cimd_jax.bench import common
from cimd_jax.models import build
from cimd_jax.train import loop
from cimd_jax.train import microbatch
from cimd_jax.train import state as state_lib
from cimd_jax.train import step as step_lib


def bench_train(settings: settings_lib.Settings, batch: int, repeats: int = 5,
                profile_dir: str = '') -> dict[str, Any]:
  """Median seconds per train step at global batch `batch`, compile time apart, XLA
  FLOPs per step, achieved GFLOP/s and peak memory; with `profile_dir`, also the top
  XLA ops of two further steps (bench.profile) under 'profile'."""
  s = settings
  size, channels = s.data.image_size, s.data.image_channels
  mesh = step_lib.make_mesh()
  networks = build.build_networks(s.model, size, channels)
  tx = state_lib.make_optimizer(s.training, s.model.ambiguity)
  init = loop.init_state_fn(networks, tx, size, channels)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  sharding = jax.tree.map(lambda _: step_lib.replicated(mesh), abstract)
  state = jax.jit(init, out_shardings=sharding)(jax.random.PRNGKey(0))
  data = jax.device_put(
      common.random_batch(batch, size, channels),
      step_lib.batch_sharding(mesh))
  jitted = step_lib.jit_train_step(
      mesh, sharding, networks=networks, tables=s.diffusion.tables(),
      objective_args=s.objective, diffusion=s.diffusion, tx=tx,
      lr_fn=state_lib.learning_rate_schedule(s.training),
      ema_rate=s.training.ema_rate, microbatches=s.training.microbatches)
  if isinstance(jitted, microbatch.MicrobatchedTrainStep):
    # Two programs: compile both, count the accumulation once per micro-batch.
    compile_s, flops = 0.0, 0.0
    for fn, args, calls in jitted.programs(state, data):
      _, seconds, program_flops = common.compile_timed(fn, *args)
      compile_s, flops = compile_s + seconds, flops + calls * program_flops
    compiled = jitted
  else:
    compiled, compile_s, flops = common.compile_timed(jitted, state, data)
  holder = [state]

  def one_step():
    holder[0], metrics = compiled(holder[0], data)
    return metrics['loss']

  median, times = common.time_calls(one_step, repeats=repeats, warmup=1)
  extra = {}
  if profile_dir:
    from cimd_jax.bench import profile  # pylint: disable=g-import-not-at-top
    extra['profile'] = profile.profile_calls(lambda: jax.block_until_ready(one_step()),
                                             profile_dir)
  return {**extra,
      'what': 'train', 'batch': batch, 'median_s': median, 'times_s': times,
      'images_per_s': batch / median, 'flops_per_step': flops,
      'gflops_per_s': flops / median / 1e9, 'compile_s': compile_s,
      'remat': s.model.remat, 'microbatches': s.training.microbatches,
      'compute_dtype': s.model.compute_dtype, 'ambiguity': s.model.ambiguity,
      **common.planned_memory_mib(compiled),
      'peak_rss_mib': common.peak_rss_mib(), 'device_peak_mib': common.device_peak_mib(),
  }
