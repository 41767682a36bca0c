"""Speed of the metric evaluator (`python -m cimd_jax.bench --what=metrics`).

Times `metrics.evaluate` end to end on host NumPy bool masks (input checks, bit
packing, transfer, the jitted kernel and the per-image host Hungarian step) against
the plain loop reference `tests/metrics_reference.py` on the same data, in the same
run, and checks that the two agree. The reference lives with the tests: the
comparison runs from a repository checkout (the repository root on sys.path) and is
left out, with a note, where the tests are not available.
"""

import importlib
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from cimd_jax.evaluation import metrics


def _reference():
  """tests/metrics_reference.py of the repository checkout, or None."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if os.path.isfile(os.path.join(root, 'tests', 'metrics_reference.py')):
    if root not in sys.path:
      sys.path.insert(0, root)
    return importlib.import_module('tests.metrics_reference')
  return None


def random_masks(num_images: int, num_masks: int, size: int, seed: int) -> np.ndarray:
  """Blob-like ambiguous masks, bool [B, K, size, size]: a disc per image whose
  centre and radius jitter per mask, plus ~1% speckle."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  centre = rng.uniform(0.3, 0.7, (num_images, 1, 2)) * size
  centre = centre + rng.normal(0, 0.03 * size, (num_images, num_masks, 2))
  radius = rng.uniform(0.05, 0.25, (num_images, 1)) * size
  radius = radius * rng.uniform(0.7, 1.3, (num_images, num_masks))
  dist2 = ((yy - centre[..., 0, None, None]) ** 2 + (xx - centre[..., 1, None, None]) ** 2)
  masks = dist2 <= radius[..., None, None] ** 2
  return masks ^ (rng.random(masks.shape) < 0.01)


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def bench_metrics(num_images: int = 256, num_experts: int = 4, num_samples: int = 16,
                  size: int = 128, repeats: int = 5, seed: int = 0,
                  reference_images: int = 32) -> dict[str, Any]:
  """Images per second of `metrics.evaluate` and of the loop reference.

  Args:
    num_images: B, images per `evaluate` call.
    num_experts: M expert masks per image.
    num_samples: N predicted masks per image.
    size: H = W.
    repeats: timed runs (median), each after one untimed warm-up call.
    seed: data seed.
    reference_images: the reference is timed on the first this-many images (it
      scales linearly in B) and its rate is images / its median seconds.

  Returns:
    {'what': 'metrics', 'batch': B, 'images_per_s', 'median_s', 'times_s',
    'compile_s' (first call minus the median: jit compile and first-call
    overheads), 'first_call_s', 'reference_images_per_s', 'reference_median_s',
    'reference_images' (images the reference was timed on, then scaled),
    'speedup', 'max_abs_diff' (largest gap to the reference on those images),
    and the problem sizes}.
  """
  gts = random_masks(num_images, num_experts, size, seed)
  preds = random_masks(num_images, num_samples, size, seed + 1)
  start = time.perf_counter()
  out = metrics.evaluate(gts, preds)
  first = time.perf_counter() - start
  median, times = _median_time(lambda: metrics.evaluate(gts, preds), repeats)

  rate = num_images / median
  reference = _reference()
  compared = {'reference': 'tests/metrics_reference.py not found (not a checkout)'}
  if reference is not None:
    ref_n = max(1, min(reference_images, num_images))
    ref_median, _ = _median_time(
        lambda: reference.evaluate(gts[:ref_n], preds[:ref_n]), max(1, min(repeats, 3)))
    ref = reference.evaluate(gts[:ref_n], preds[:ref_n])
    compared = {
        'reference_images_per_s': ref_n / ref_median,
        'reference_median_s': ref_median,
        'reference_images': ref_n,
        'speedup': rate / (ref_n / ref_median),
        'max_abs_diff': max(float(np.max(np.abs(out[k][:ref_n] - ref[k]))) for k in ref),
    }
  return {
      'what': 'metrics',
      'batch': num_images,
      'num_experts': num_experts,
      'num_samples': num_samples,
      'image_size': size,
      'images_per_s': rate,
      'median_s': median,
      'times_s': times,
      'compile_s': max(0.0, first - median),
      'first_call_s': first,
      **compared,
  }
