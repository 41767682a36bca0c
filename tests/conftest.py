"""Test setup: four fake CPU devices for sharding tests, repo root on sys.path."""

import os
import shutil
import sys
import tempfile

# Must be set before jax is imported anywhere: sharding tests need 4 devices.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The tests compile many small programs and run each a few steps: XLA's expensive
# optimisations cost more compile time than they save (tiny UNet gradient: 6.9 s
# instead of 9.0 s to compile; init 3.1 s instead of 5.3 s). Inherited by the
# `main.py` subprocesses; the long-running reduced demo turns them back on.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The real-data sample: $CIMD_LIDC_SAMPLE, else ../shared/data/lidc_sample next to the
# repository; tests that need it skip when it is absent.
LIDC_SAMPLE = os.environ.get('CIMD_LIDC_SAMPLE') or os.path.join(
    os.path.dirname(ROOT), 'shared', 'data', 'lidc_sample')

# One persistent XLA compilation cache for the whole session, shared by the xdist
# workers and by the `main.py` subprocesses the end-to-end tests start (they inherit
# $CIMD_JAX_CACHE): the same tiny programs are compiled once, not once per test.
# A fresh folder per session (removed at the end), so nothing carries over between
# runs; a folder set by the caller is used as it is.
_OWN_CACHE = 'CIMD_JAX_CACHE' not in os.environ
if _OWN_CACHE:
  os.environ['CIMD_JAX_CACHE'] = tempfile.mkdtemp(prefix='cimd_jax_test_xla_cache_')

from cimd_jax.utils import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

runtime.enable_compilation_cache(os.environ['CIMD_JAX_CACHE'])


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, 'workerinput'):  # the controller, not a worker
    shutil.rmtree(os.environ['CIMD_JAX_CACHE'], ignore_errors=True)


# The longest files, longest first (seconds per file on a 2-core Zen3, 2026-12-05:
# the reduced demo ~570, reliability ~480, train ~320, kill/resume ~170, the LIDC
# end-to-end ~150, multihost ~150, bench ~110). Handing them out first (xdist's
# loadfile gives files to workers in collection order) keeps one long file from
# running alone at the end.
LONGEST_FIRST = ('test_demo_calibration.py', 'test_reliability.py', 'test_train.py',
                 'test_kill_resume.py', 'test_lidc_end_to_end.py', 'test_multihost.py',
                 'test_bench.py')


def pytest_collection_modifyitems(items):
  """Files of LONGEST_FIRST first, in that order; the order is otherwise unchanged."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
