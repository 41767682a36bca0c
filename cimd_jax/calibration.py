"""Calibration against known truth: does each ambiguous structure appear in the same
fraction of sampled masks as in the experts' masks?

A sample *includes* a structure when it covers at least `cover` (default half) of the
structure's pixels. For each valid structure of each image, the sampled frequency is
the fraction of the N samples that include it; the truth is the generator's
inclusion probability (synthetic data stores it per case).
"""

import numpy as np
from PIL import Image, ImageDraw


def included(masks: np.ndarray, region: np.ndarray, cover: float = 0.5) -> np.ndarray:
  """Whether each mask covers >= `cover` of `region`: masks bool [N, H, W], region [H, W] -> bool [N]."""
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


def summarize(truth: np.ndarray, sampled: np.ndarray) -> dict[str, float]:
  """MAE on ambiguous structures (0 < p), worst sampled frequency on structures no
  expert draws (p = 0), and counts."""
  truth, sampled = np.asarray(truth), np.asarray(sampled)
  amb = truth > 0
  decoy = truth == 0
  return {
      'mae_ambiguous': float(np.mean(np.abs(truth[amb] - sampled[amb]))) if amb.any() else float('nan'),
      'num_ambiguous': int(amb.sum()),
      'max_freq_never_drawn': float(sampled[decoy].max()) if decoy.any() else float('nan'),
      'mean_freq_never_drawn': float(sampled[decoy].mean()) if decoy.any() else float('nan'),
      'num_never_drawn': int(decoy.sum()),
  }


def calibration_plot(truth: np.ndarray, sampled: np.ndarray, size: int = 420,
                     title: str = 'expert frequency vs sampled frequency') -> np.ndarray:
  """A scatter plot (uint8 RGB [size, size, 3]) of sampled vs true frequency with the
  diagonal; points jittered horizontally so equal truths stay visible."""
  img = Image.new('RGB', (size, size), (255, 255, 255))
  d = ImageDraw.Draw(img)
  m0, m1 = 50, size - 30   # plot area [m0, m1] on both axes
  span = m1 - m0

  def xy(px, py):
    return m0 + px * span, m1 - py * span

  d.rectangle([m0, m0, m1, m1], outline=(0, 0, 0))
  d.line([xy(0, 0), xy(1, 1)], fill=(150, 150, 150), width=1)
  for v in (0.0, 0.25, 0.5, 0.75, 1.0):
    x, y = xy(v, 0)
    d.text((x - 8, m1 + 4), f'{v:.2f}', fill=(0, 0, 0))
    x, y = xy(0, v)
    d.text((4, y - 6), f'{v:.2f}', fill=(0, 0, 0))
  rng = np.random.default_rng(0)
  for t, s in zip(truth, sampled):
    x, y = xy(float(t) + rng.uniform(-0.015, 0.015), float(s))
    color = (200, 30, 30) if t == 0 else (30, 60, 200)
    d.ellipse([x - 3, y - 3, x + 3, y + 3], outline=color)
  d.text((m0, 6), title, fill=(0, 0, 0))
  d.text((m0, 20), 'x: expert frequency   y: sampled frequency   red: never drawn',
         fill=(80, 80, 80))
  return np.asarray(img)
