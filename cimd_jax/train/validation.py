"""Validation while training: N masks for a few validation images from the current EMA
model, scored and drawn for TensorBoard.

Every `training.eval_every` steps the loop calls `Validator(ema_unet_params, step)`;
it draws `training.eval_samples` masks for each of the first `training.eval_images`
images of the 'validation' split with the `sampling` group's sampler and returns
  scalars     val/ci, val/ged, val/hm_iou, val/sc, val/dmax, val/da (means over the
              images) and, on data with known structure frequencies (synthetic),
              val/calibration_mae; plus val/score, the `training.best_metric`
              oriented so that higher is better (ranks the best checkpoint);
  histograms  val/per_image_ci, val/per_image_ged;
  images      val/cases (image | experts | samples | frequency map of two cases) and
              val/calibration (sampled vs expert frequency) when known.
"""

import dataclasses
from typing import Any

import numpy as np

from cimd_jax.data import pipeline
from cimd_jax.data.args import DataArgs, VALIDATION
from cimd_jax.diffusion.args import DiffusionArgs
from cimd_jax.evaluation import calibration
from cimd_jax.evaluation import metrics
from cimd_jax.inference import ensemble
from cimd_jax.inference.args import SamplingArgs
from cimd_jax.models.build import ModelArgs
from cimd_jax.train.args import BEST_METRICS, TrainingArgs
from cimd_jax.utils import figures
from cimd_jax.utils.errors import ConfigError

import jax

_GRID_CASES = 2
_GRID_SAMPLES = 8


@dataclasses.dataclass
class ValidationResult:
  scalars: dict[str, float]
  histograms: dict[str, np.ndarray]
  images: dict[str, np.ndarray]     # name -> float32 [1, H, W, 3] in [0, 1]


class Validator:
  """Draws and scores validation ensembles (see the module docstring)."""

  def __init__(self, workdir: str, data: DataArgs, model: ModelArgs,
               diffusion: DiffusionArgs, sampling: SamplingArgs, training: TrainingArgs):
    splits = pipeline.prepare(data, workdir)
    if VALIDATION not in splits:
      raise ConfigError(f'training.eval_every={training.eval_every}: validation needs a '
                        "'validation' split; set data.validation_fraction > 0 (or 0 to "
                        'turn validation off)')
    batches = pipeline.eval_batches(data, workdir, VALIDATION, batch_size=8,
                                    max_examples=training.eval_images)
    self.cases = [dict(zip(b, values)) for b in batches for values in zip(*b.values())]
    self.images = np.stack([c['image'] for c in self.cases])
    self.experts = np.stack([c['masks'] > 0 for c in self.cases])
    self.best_metric = training.best_metric
    if self.best_metric == 'calibration_mae' and 'structures' not in self.cases[0]:
      raise ConfigError(f"training.best_metric='calibration_mae' needs data whose structure "
                        f'frequencies are known (synthetic); data.name={data.name!r} has '
                        "none; expected 'ci', 'ged' or another metric")
    self.num_samples = training.eval_samples
    self.draw = ensemble.make_ensemble_fn(model, data.image_size, diffusion, sampling,
                                          num_samples=training.eval_samples)
    self.chunk = sampling.images_per_chunk()
    self.seed = sampling.seed

  def __call__(self, params: Any, step: int) -> ValidationResult:
    key = jax.random.PRNGKey(self.seed)
    masks = np.concatenate([self.draw(params, self.images[s:s + self.chunk], key, s)
                            for s in range(0, len(self.images), self.chunk)])
    per_image = metrics.evaluate(self.experts, masks)
    scalars = {f'val/{k}': float(np.mean(per_image[k]))
               for k in ('ci', 'ged', 'hm_iou', 'sc', 'dmax', 'da')}
    images = {'val/cases': _grid(self.cases[:_GRID_CASES], masks[:_GRID_CASES], step)}
    if 'structures' in self.cases[0]:
      summary, truth, sampled = calibration.over_cases(
          [(c['structures'], c['structure_probs'], m) for c, m in zip(self.cases, masks)])
      scalars['val/calibration_mae'] = summary['mae_ambiguous']
      scalars['val/calibration_dispersion'] = summary['dispersion']
      images['val/calibration'] = calibration.calibration_plot(
          truth, sampled, num_samples=self.num_samples)[None].astype(np.float32) / 255.0
    metric = scalars.get(f'val/{self.best_metric}', float('nan'))
    scalars['val/score'] = metric if BEST_METRICS[self.best_metric] else -metric
    histograms = {'val/per_image_ci': np.asarray(per_image['ci']),
                  'val/per_image_ged': np.asarray(per_image['ged'])}
    return ValidationResult(scalars, histograms, images)


def _grid(cases: list[dict[str, Any]], masks: np.ndarray, step: int) -> np.ndarray:
  """image | experts | samples | frequency map, one row per case: float32 [1, H, W, 3]."""
  rows = []
  for case, m in zip(cases, masks):
    tiles = [figures.to_uint8_image(case['image'])]
    tiles += [figures.mask_to_uint8(e > 0) for e in case['masks']]
    tiles += [figures.mask_to_uint8(s) for s in m[:_GRID_SAMPLES]]
    tiles.append(figures.heat(m.mean(0)))
    cid = case['case_id']
    cid = cid.decode() if isinstance(cid, bytes) else str(cid)
    rows.append((f'{cid}: image | experts | samples | frequency (step {step})', tiles))
  grid = figures.labelled_rows(rows, per_row=max(len(r[1]) for r in rows), min_tile=64)
  return grid[None].astype(np.float32) / 255.0
