"""Process-level set-up done once before any JAX computation: multi-host
initialisation through `jax.distributed` and the persistent compilation cache."""

import logging as py_logging
import os

from absl import logging
import jax

_CHATTY_LIBRARIES = ('/orbax/', '/tensorflow_datasets/', '/grain/', '/jax/_src/')
# A process of a multi-process job that stops heartbeating (killed, out of memory) is
# declared dead by the coordination service after this long, and the job ends.
HEARTBEAT_TIMEOUT_S = 30


# Warnings that describe intended behaviour (read-only managers for sampling).
_EXPECTED_WARNINGS = ('read_only=True, setting save_interval_steps=0',
                      'Given directory is read only')


class _QuietLibraries(py_logging.Filter):
  """Drops INFO lines from libraries that log every save, load and read, and the
  library warnings in _EXPECTED_WARNINGS."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return not any(text in str(record.msg) for text in _EXPECTED_WARNINGS)
    return not any(part in record.pathname for part in _CHATTY_LIBRARIES)


def quiet_library_logs() -> None:
  """Keeps cimd_jax's INFO progress lines on the console, without library chatter."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def initialize_distributed(enable: bool, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           local_device_ids: list[int] | None = None) -> None:
  """Joins this process to a multi-process JAX job when asked.

  With `enable` and no explicit arguments, JAX detects the cluster (SLURM, Cloud
  TPU, ...). With a coordinator address, the given process count and id are used.
  On CPU, JAX's gloo collectives are switched on so that local processes can form
  one job.
  """
  explicit = coordinator_address is not None or num_processes is not None
  if not (enable or explicit):
    return
  if jax.config.jax_platforms in (None, '', 'cpu') or os.environ.get(
      'JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if coordinator_address is not None:
    kwargs['coordinator_address'] = coordinator_address
  if num_processes is not None:
    kwargs['num_processes'] = num_processes
  if process_id is not None:
    kwargs['process_id'] = process_id
  if local_device_ids is not None:
    kwargs['local_device_ids'] = local_device_ids
  jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S, **kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def enable_compilation_cache(cache_dir: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache so a second run does not recompile.

  Default folder: $CIMD_JAX_CACHE or ~/.cache/cimd_jax/xla. Returns the folder used.
  """
  cache_dir = cache_dir or os.environ.get('CIMD_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'cimd_jax', 'xla')
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return cache_dir


def share_from_chief(key: str, value: str | None, timeout_s: float = 3600.0) -> str | None:
  """Process 0's `value` on every process of the job (through the coordination
  service's key-value store, not a device collective: a collective here could
  interleave with the in-flight train step's collectives). Single process: `value`.
  Each `key` must be used once per job."""
  if jax.process_count() == 1:
    return value
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  full_key = f'cimd_jax/shared/{key}'
  if jax.process_index() == 0:
    client.key_value_set(full_key, '' if value is None else '=' + value)
    return value
  got = client.blocking_key_value_get(full_key, int(timeout_s * 1000))
  return got[1:] if got else None


def forget_shared(key: str) -> None:
  """Process 0: deletes a key of `share_from_chief` that every process has read."""
  if jax.process_count() == 1 or jax.process_index() != 0:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.global_state.client.key_value_delete(f'cimd_jax/shared/{key}')
  except Exception:  # pylint: disable=broad-except
    pass


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process of the job reaches `name` (a coordination-service
  barrier, not a device collective: XLA:CPU's gloo collectives give up when the
  processes reach their first collective more than 30 s apart, e.g. while process
  0 prepares a dataset or compiles more slowly). No-op with one process."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.global_state.client.wait_at_barrier(f'cimd_jax/{name}', int(timeout_s * 1000))
