"""The training image summary: input image | experts | a few samples from the current
EMA model | per-pixel variance, for a few fixed test cases."""

from typing import Any, Callable

import jax
import numpy as np

from cimd_jax import figures
from cimd_jax.models import build


def make_image_summary_fn(data_args: Any, unet_args: build.UNetArgs, betas: np.ndarray,
                          workdir: str, num_samples: int, sampler_steps: int,
                          variance: str, prediction: str = 'eps', num_cases: int = 2,
                          seed: int = 0
                          ) -> Callable[[Any, int], dict[str, np.ndarray]]:
  """Returns f(ema_unet_params, step) -> {'samples': float32 [1, H', W', 3] in [0, 1]}.

  Samples with DDIM (eta 0) over `sampler_steps` respaced steps; the cases are the first
  `num_cases` of the test split (falling back to train).
  """
  from cimd_jax import sample  # pylint: disable=g-import-not-at-top
  from cimd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  steps = str(max(min(sampler_steps, len(betas)), 1))  # evenly respaced, any count
  sampler = sample.SamplerArgs(sampler='ddim', steps=steps, eta=0.0, variance=variance,
                               max_batch=num_cases * num_samples, prediction=prediction)
  draw = sample.make_ensemble_fn(unet_args, betas, sampler, num_samples)
  cases: list = []

  def summary(params: Any, step: int) -> dict[str, np.ndarray]:
    if not cases:
      split = 'test' if pipeline.num_examples(data_args, workdir, 'test') else 'train'
      batches = pipeline.eval_batches(data_args, workdir, split, batch_size=num_cases,
                                      max_examples=num_cases)
      cases.extend(sample.cases_from_batches(batches))
    images = np.stack([c.image for c in cases])
    masks = draw(params, images, jax.random.PRNGKey(seed), 0)
    rows = []
    for case, m in zip(cases, masks):
      tiles = [figures.to_uint8_image(case.image)]
      if case.experts is not None:
        tiles += [figures.mask_to_uint8(e) for e in case.experts]
      tiles += [figures.mask_to_uint8(s) for s in m]
      tiles.append(figures.heat(4 * m.astype(np.float32).var(0)))
      rows.append((f'{case.case_id}: image | experts | samples | variance (step {step})',
                   tiles))
    grid = figures.labelled_rows(rows, per_row=max(len(r[1]) for r in rows), min_tile=64)
    return {'samples': grid[None].astype(np.float32) / 255.0}
  return summary
