"""cimd_jax: CIMD (Rahman et al., CVPR 2023) for ambiguous medical image segmentation in JAX.

    import cimd_jax
    model = cimd_jax.load('runs/demo')          # latest checkpoint, EMA weights
    out = model.sample(images, num_samples=16)  # out.masks bool [B, N, H, W]
    from cimd_jax import metrics
    scores = metrics.evaluate(gts, out.masks)   # per-image CI, GED, HM-IoU, ...

Importing the package is cheap; JAX loads with the first use of `load` or `metrics`.
"""

import importlib
from typing import Any

__version__ = '0.2.0'
__all__ = ['load', 'metrics', '__version__']


def load(workdir: str, step: str | int = 'latest', use_ema: bool = True):
  """The trained model in WORKDIR (see `cimd_jax.inference.model.load`)."""
  from cimd_jax.inference import model  # pylint: disable=g-import-not-at-top
  return model.load(workdir, step=step, use_ema=use_ema)


def __getattr__(name: str) -> Any:
  if name == 'metrics':
    return importlib.import_module('cimd_jax.evaluation.metrics')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
