"""Shared measuring tools: timing medians, compile time, XLA FLOPs, peak memory and
the machine's float32 matmul roofline."""

import os
import platform
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def block(tree: Any) -> Any:
  """Waits until every array in `tree` is computed."""
  return jax.block_until_ready(tree)


def time_calls(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1
               ) -> tuple[float, list[float]]:
  """Median seconds of `repeats` timed calls after `warmup` untimed ones (blocking)."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), times


def compile_timed(jitted: Any, *args) -> tuple[Any, float, float]:
  """(compiled executable, compile seconds incl. lowering, XLA flops of one call)."""
  t = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - t
  return compiled, seconds, flops_of(compiled)


def flops_of(compiled: Any) -> float:
  """FLOPs of one call of a compiled executable, all its devices together, per XLA's
  cost analysis (0 if unknown). XLA counts one device's partition of an SPMD program,
  so that figure is multiplied by the number of devices the program runs on."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', 0.0)) * num_program_devices(compiled)


def num_program_devices(compiled: Any) -> int:
  """How many devices a compiled executable's inputs and outputs are placed on (1 where
  it does not say)."""
  devices = set()
  for shardings in (getattr(compiled, 'input_shardings', ()),
                    getattr(compiled, 'output_shardings', ())):
    for sharding in jax.tree.leaves(shardings):
      devices |= set(getattr(sharding, 'device_set', ()))
  return max(len(devices), 1)


def planned_memory_mib(compiled: Any) -> dict[str, float]:
  """XLA's buffer plan for one call, MiB: arguments, outputs, temporaries (activations
  and scratch), and aliased (donated) bytes; empty where the backend does not say."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if stats is None:
    return {}
  fields = {'argument': 'argument_size_in_bytes', 'output': 'output_size_in_bytes',
            'temp': 'temp_size_in_bytes', 'alias': 'alias_size_in_bytes'}
  return {f'xla_{k}_mib': getattr(stats, v) / 2**20 for k, v in fields.items()
          if getattr(stats, v, None) is not None}


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far, MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mib() -> float | None:
  """Peak device memory (GPU/TPU) in MiB where the backend reports it."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  peak = stats.get('peak_bytes_in_use')
  return peak / 2**20 if peak else None


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Measured float32 matmul rate of this machine, GFLOP/s (the in-run roofline)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(jnp.matmul)
  median, _ = time_calls(lambda: f(a, b), repeats=repeats, warmup=2)
  return 2.0 * n ** 3 / median / 1e9


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo 'model name', else platform.processor())."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
  """Device kind, CPU model, JAX version and thread counts, stated with every figure."""
  dev = jax.devices()[0]
  return {
      'device': f'{dev.platform}:{getattr(dev, "device_kind", "")}',
      'cpu_model': cpu_model(),
      'num_devices': jax.device_count(),
      'jax_version': jax.__version__,
      'cpu_count': os.cpu_count(),
      'threads': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
      'machine': platform.machine(),
  }


def random_batch(batch: int, image_size: int, image_channels: int, seed: int = 0
                 ) -> dict[str, jax.Array]:
  """A synthetic train batch: image f32 [B, H, W, C] in [-1, 1], mask in {-1, +1}."""
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, (batch, image_size, image_size, image_channels))
  mask = np.where(rng.uniform(size=(batch, image_size, image_size, 1)) > 0.7, 1.0, -1.0)
  return {'image': jnp.asarray(image, jnp.float32), 'mask': jnp.asarray(mask, jnp.float32)}


def roofline_fraction(gflops_per_s: float, matmul_gflops: float, num_devices: int) -> float:
  """The fraction of the in-run roofline reached: gflops_per_s counts the work of all
  `num_devices` devices, matmul_gflops is one device's rate."""
  return gflops_per_s / (matmul_gflops * num_devices)


def config_name(argv: list[str]) -> str:
  """The config file's name in a command line (`--config=PATH` or `--config PATH`),
  'lidc' (the flag's default) when none is given."""
  args = argv[1:]
  for i, arg in enumerate(args):
    if arg.startswith('--config='):
      return os.path.basename(arg.split('=', 1)[1]).removesuffix('.py')
    if arg == '--config' and i + 1 < len(args):
      return os.path.basename(args[i + 1]).removesuffix('.py')
  return 'lidc'
