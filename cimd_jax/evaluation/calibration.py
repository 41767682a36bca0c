"""Calibration against known truth: does each ambiguous structure appear in the same
fraction of sampled masks as in the experts' masks?

A sample *includes* a structure when it covers at least `cover` (default half) of the
structure's pixels. For each valid structure of each image, the sampled frequency is
the fraction of the N samples that include it; the truth is the generator's
inclusion probability (synthetic data stores it per case).
"""

import numpy as np


def included(masks: np.ndarray, region: np.ndarray, cover: float = 0.5) -> np.ndarray:
  """Whether each mask covers >= `cover` of `region`: masks bool [N, H, W], region
  [H, W] -> bool [N]."""
  region = np.asarray(region) > 0
  area = int(region.sum())
  if area == 0:
    raise ValueError('structure region is empty')
  inside = np.logical_and(np.asarray(masks, bool), region[None]).reshape(len(masks), -1).sum(1)
  return inside >= cover * area


def structure_frequencies(masks: np.ndarray, structures: np.ndarray, probs: np.ndarray,
                          cover: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """(true probability, sampled frequency) of each valid structure of one image.

  Args:
    masks: bool [N, H, W] sampled masks.
    structures: [S, H, W] structure regions (zero-padded).
    probs: float [S] true inclusion probabilities; padded entries are < 0 or have an
      empty region and are skipped.
  """
  truth, sampled = [], []
  for region, p in zip(structures, probs):
    if p < 0 or not np.any(region):
      continue
    truth.append(float(p))
    sampled.append(float(included(masks, region, cover).mean()))
  return np.array(truth), np.array(sampled)


def over_cases(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
               ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """(summarize(...), truth [S], sampled [S]) over every structure of every case;
  `cases` holds (structures [S, H, W], probs [S], masks bool [N, H, W]) per image."""
  truth, sampled = [], []
  for structures, probs, masks in cases:
    t, s = structure_frequencies(masks, structures, probs)
    truth.append(t)
    sampled.append(s)
  truth = np.concatenate(truth) if truth else np.zeros([0])
  sampled = np.concatenate(sampled) if sampled else np.zeros([0])
  return summarize(truth, sampled), truth, sampled


def summarize(truth: np.ndarray, sampled: np.ndarray) -> dict[str, float]:
  """MAE on ambiguous structures (0 < p) with its standard error (sample std, ddof = 1,
  of the absolute errors / sqrt(count); NaN below two structures), worst and mean
  sampled frequency on structures no expert draws (p = 0), and counts."""
  truth, sampled = np.asarray(truth), np.asarray(sampled)
  amb = truth > 0
  decoy = truth == 0
  errors = np.abs(truth[amb] - sampled[amb])
  return {
      'mae_ambiguous': float(np.mean(errors)) if amb.any() else float('nan'),
      'mae_ambiguous_sem': (float(np.std(errors, ddof=1) / np.sqrt(len(errors)))
                            if len(errors) > 1 else float('nan')),
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
