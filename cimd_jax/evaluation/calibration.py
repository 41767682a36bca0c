"""Calibration against known truth: does each ambiguous structure appear in the same
fraction of sampled masks as in the experts' masks?

A sample *includes* a structure when it covers at least `cover` (default half) of the
structure's pixels. For each valid structure of each image, the sampled frequency is
the fraction of the N samples that include it; the truth is the generator's
inclusion probability (synthetic data stores it per case).

With N masks even a perfect sampler's frequencies scatter around the truth p with
variance p (1 - p) / N (binomial), so the MAE alone cannot tell a sampler whose
per-image probabilities are wrong from one drawn with too few masks. The *dispersion*
(mean squared error / mean p (1 - p) / N over the ambiguous structures) is 1 for
independent draws at the true probabilities, above 1 when they scatter further.
"""

import numpy as np

from cimd_jax.evaluation import metrics


def included(masks: np.ndarray, region: np.ndarray, cover: float = 0.5) -> np.ndarray:
  """Whether each mask covers >= `cover` of `region`: masks [N, H, W] (bool, or 0/1
  values; anything else, e.g. {-1, 1} masks still in diffusion space, is a
  ValueError), region [H, W] -> bool [N]."""
  return _covers(metrics.as_masks(masks, 'masks', '[N, H, W]'), region, cover)


def _covers(masks: np.ndarray, region: np.ndarray, cover: float) -> np.ndarray:
  """`included` for masks already checked (bool [N, H, W])."""
  region = np.asarray(region) > 0
  area = int(region.sum())
  if area == 0:
    raise ValueError('structure region is empty')
  inside = np.logical_and(masks, region[None]).reshape(len(masks), -1).sum(1)
  return inside >= cover * area


def structure_frequencies(masks: np.ndarray, structures: np.ndarray, probs: np.ndarray,
                          cover: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """(true probability, sampled frequency) of each valid structure of one image.

  Args:
    masks: [N, H, W] sampled masks (bool or 0/1, as for `included`).
    structures: [S, H, W] structure regions (zero-padded).
    probs: float [S] true inclusion probabilities; padded entries are < 0 or have an
      empty region and are skipped.
  """
  masks = metrics.as_masks(masks, 'masks', '[N, H, W]')   # checked once, not per structure
  if len(structures) != len(probs):
    raise ValueError(f'structure_frequencies: {len(structures)} structure regions but '
                     f'{len(probs)} probabilities; expected one per region')
  truth, sampled = [], []
  for region, p in zip(structures, probs):
    if p < 0 or not np.any(region):
      continue
    truth.append(float(p))
    sampled.append(float(_covers(masks, region, cover).mean()))
  return np.array(truth), np.array(sampled)


def over_cases(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
               ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """(summarize(...), truth [S], sampled [S]) over every structure of every case;
  `cases` holds (structures [S, H, W], probs [S], masks bool [N, H, W]) per image."""
  truth, sampled, num_samples = [], [], []
  for structures, probs, masks in cases:
    t, s = structure_frequencies(masks, structures, probs)
    truth.append(t)
    sampled.append(s)
    num_samples.append(np.full(len(t), len(masks)))
  truth = np.concatenate(truth) if truth else np.zeros([0])
  sampled = np.concatenate(sampled) if sampled else np.zeros([0])
  num_samples = np.concatenate(num_samples) if num_samples else np.zeros([0])
  return summarize(truth, sampled, num_samples), truth, sampled


def _mean_sem(x: np.ndarray) -> tuple[float, float]:
  """(mean, sample std (ddof = 1) / sqrt(count)); NaN where undefined."""
  mean = float(np.mean(x)) if len(x) else float('nan')
  sem = float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float('nan')
  return mean, sem


def summarize(truth: np.ndarray, sampled: np.ndarray,
              num_samples: int | np.ndarray | None = None) -> dict[str, float]:
  """MAE on ambiguous structures (0 < p) with its standard error (sample std, ddof = 1,
  of the absolute errors / sqrt(count); NaN below two structures), worst and mean
  sampled frequency on structures no expert draws (p = 0), and counts. Given the
  masks per image N (an int, or [S] per structure), also the dispersion over the
  ambiguous structures (module docstring) and its excess, mean over structures of
  (sampled - p)^2 - p (1 - p) / N, with its standard error (0 for independent draws
  at the true probabilities)."""
  truth, sampled = np.asarray(truth), np.asarray(sampled)
  amb = truth > 0
  decoy = truth == 0
  errors = np.abs(truth[amb] - sampled[amb])
  mae, mae_sem = _mean_sem(errors)
  out = {'mae_ambiguous': mae, 'mae_ambiguous_sem': mae_sem}
  if num_samples is not None:
    p = truth[amb]
    binomial = p * (1 - p) / np.broadcast_to(np.asarray(num_samples, float), truth.shape)[amb]
    excess, excess_sem = _mean_sem(errors ** 2 - binomial)
    out.update(dispersion=(float(np.mean(errors ** 2) / np.mean(binomial))
                           if amb.any() and np.mean(binomial) > 0 else float('nan')),
               excess_variance=excess, excess_variance_sem=excess_sem)
  return {
      **out,
      'num_ambiguous': int(amb.sum()),
      'max_freq_never_drawn': float(sampled[decoy].max()) if decoy.any() else float('nan'),
      'mean_freq_never_drawn': float(sampled[decoy].mean()) if decoy.any() else float('nan'),
      'num_never_drawn': int(decoy.sum()),
  }


def calibration_plot(truth: np.ndarray, sampled: np.ndarray, title: str = '',
                     num_samples: int | None = None) -> np.ndarray:
  """Sampled vs expert frequency of every structure, with the diagonal, as an RGB
  image uint8 [H, W, 3] (matplotlib). Points are jittered horizontally so equal
  truths stay visible; structures no expert draws are red."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  truth, sampled = np.asarray(truth, float), np.asarray(sampled, float)
  fig = Figure(figsize=(4.2, 4.2), dpi=100)
  canvas = FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.plot([0, 1], [0, 1], color='0.6', lw=1, zorder=0)
  jitter = np.random.default_rng(0).uniform(-0.015, 0.015, truth.shape)
  never = truth == 0
  ax.scatter(truth[~never] + jitter[~never], sampled[~never], s=14, facecolors='none',
             edgecolors='tab:blue', label='ambiguous (expert freq. > 0)')
  if never.any():
    ax.scatter(truth[never] + jitter[never], sampled[never], s=14, facecolors='none',
               edgecolors='tab:red', label='never drawn by experts')
  ax.set_xlim(-0.05, 1.05)
  ax.set_ylim(-0.05, 1.05)
  ax.set_xlabel('expert frequency')
  ax.set_ylabel('sampled frequency' + (f' (N = {num_samples})' if num_samples else ''))
  if len(truth):
    amb = truth > 0
    mae = float(np.mean(np.abs(truth[amb] - sampled[amb]))) if amb.any() else float('nan')
    ax.set_title(title or f'calibration: MAE {mae:.3f} over {int(amb.sum())} structures',
                 fontsize=9)
  ax.legend(loc='upper left', fontsize=7, frameon=False)
  fig.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()
