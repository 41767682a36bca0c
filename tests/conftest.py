"""Test setup: four fake CPU devices for sharding tests, repo root on sys.path."""

import os
import sys

# Must be set before jax is imported anywhere: sharding tests need 4 devices.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The real-data sample: $CIMD_LIDC_SAMPLE, else ../shared/data/lidc_sample next to the
# repository; tests that need it skip when it is absent.
LIDC_SAMPLE = os.environ.get('CIMD_LIDC_SAMPLE') or os.path.join(
    os.path.dirname(ROOT), 'shared', 'data', 'lidc_sample')
