"""Plain loop-by-loop NumPy re-computation of the metrics (the test and bench reference).

Written directly from the definitions in DESIGN.md §2, independently of
`cimd_jax.metrics`: every pair of masks is visited by a Python loop, pixel variances
come from `np.var` (population variance, ddof=0) of the difference map, and everything
is float64. It is slow on purpose: it is what `cimd_jax.metrics` is checked and timed
against. Masks are bool arrays `[M, H, W]` (experts) and `[N, H, W]` (predictions);
no input checking is done here.
"""

import math

import numpy as np
from scipy import optimize


def dice(a: np.ndarray, b: np.ndarray) -> float:
  """Dice of two bool masks [H, W]; 1 when both are empty."""
  inter = int(np.logical_and(a, b).sum())
  total = int(a.sum()) + int(b.sum())
  if total == 0:
    return 1.0
  return 2.0 * inter / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
  """Intersection over union of two bool masks [H, W]; 1 when both are empty."""
  inter = int(np.logical_and(a, b).sum())
  union = int(np.logical_or(a, b).sum())
  if union == 0:
    return 1.0
  return inter / union


def pair_variance(a: np.ndarray, b: np.ndarray) -> float:
  """Population variance (ddof=0) over pixels of the difference map a - b [H, W]."""
  diff = a.astype(np.float64) - b.astype(np.float64)
  return float(np.var(diff))


def variance_range(masks: np.ndarray) -> tuple[float, float]:
  """(V_min, V_max) of `pair_variance` over distinct pairs of masks [K, H, W]; (0, 0) if K = 1."""
  values = []
  for i in range(len(masks)):
    for j in range(i + 1, len(masks)):
      values.append(pair_variance(masks[i], masks[j]))
  if not values:
    return 0.0, 0.0
  return min(values), max(values)


def combined_sensitivity(gts: np.ndarray, preds: np.ndarray) -> float:
  """S_c = TP / (TP + FN) of the union of preds against the union of gts; 1 if that is empty."""
  union_gt = np.zeros(gts.shape[1:], bool)
  for g in gts:
    union_gt = np.logical_or(union_gt, g)
  union_pred = np.zeros(preds.shape[1:], bool)
  for p in preds:
    union_pred = np.logical_or(union_pred, p)
  tp = int(np.logical_and(union_gt, union_pred).sum())
  fn = int(np.logical_and(union_gt, np.logical_not(union_pred)).sum())
  if tp + fn == 0:
    return 1.0
  return tp / (tp + fn)


def max_dice_matching(gts: np.ndarray, preds: np.ndarray) -> float:
  """D_max = (1/M) sum_i max_j Dice(pred_j, gt_i)."""
  total = 0.0
  for g in gts:
    best = -1.0
    for p in preds:
      best = max(best, dice(p, g))
    total += best
  return total / len(gts)


def diversity_agreement(gts: np.ndarray, preds: np.ndarray) -> float:
  """D_a = 1 - (|V_max^Y - V_max^P| + |V_min^Y - V_min^P|) / 2."""
  vmin_gt, vmax_gt = variance_range(gts)
  vmin_pred, vmax_pred = variance_range(preds)
  return 1.0 - (abs(vmax_gt - vmax_pred) + abs(vmin_gt - vmin_pred)) / 2.0


def ci_score(gts: np.ndarray, preds: np.ndarray) -> dict[str, float]:
  """{'sc', 'dmax', 'da', 'ci'} with CI = 3 S_c D_max D_a / (S_c + D_max + D_a) (0 if that sum is 0)."""
  sc = combined_sensitivity(gts, preds)
  dmax = max_dice_matching(gts, preds)
  da = diversity_agreement(gts, preds)
  denom = sc + dmax + da
  ci = 0.0 if denom == 0 else 3.0 * sc * dmax * da / denom
  return {'sc': sc, 'dmax': dmax, 'da': da, 'ci': ci}


def ged(gts: np.ndarray, preds: np.ndarray) -> float:
  """Squared generalised energy distance with d = 1 - IoU, means over all ordered pairs."""
  cross = 0.0
  for g in gts:
    for p in preds:
      cross += 1.0 - iou(p, g)
  within_pred = 0.0
  for p in preds:
    for q in preds:
      within_pred += 1.0 - iou(p, q)
  within_gt = 0.0
  for g in gts:
    for h in gts:
      within_gt += 1.0 - iou(g, h)
  m, n = len(gts), len(preds)
  return 2.0 * cross / (m * n) - within_pred / (n * n) - within_gt / (m * m)


def hm_iou(gts: np.ndarray, preds: np.ndarray) -> float:
  """Hungarian-matched IoU: both sets repeated to lcm(M, N) masks, matched on 1 - IoU."""
  m, n = len(gts), len(preds)
  size = math.lcm(m, n)
  ious = np.zeros((m, n))
  for i in range(m):
    for j in range(n):
      ious[i, j] = iou(gts[i], preds[j])
  # Row r of the repeated problem is expert r % M, column c is prediction c % N.
  repeated = np.zeros((size, size))
  for r in range(size):
    for c in range(size):
      repeated[r, c] = ious[r % m, c % n]
  rows, cols = optimize.linear_sum_assignment(1.0 - repeated)
  return float(repeated[rows, cols].mean())


def dice_mean(gts: np.ndarray, preds: np.ndarray) -> float:
  """Mean Dice of every prediction against every expert."""
  total = 0.0
  for g in gts:
    for p in preds:
      total += dice(p, g)
  return total / (len(gts) * len(preds))


def evaluate_one(gts: np.ndarray, preds: np.ndarray) -> dict[str, float]:
  """All per-image metrics of one image: sc, dmax, da, ci, ged, hm_iou, dice_mean."""
  gts = np.asarray(gts, bool)
  preds = np.asarray(preds, bool)
  return {**ci_score(gts, preds), 'ged': ged(gts, preds), 'hm_iou': hm_iou(gts, preds),
          'dice_mean': dice_mean(gts, preds)}


def evaluate(gts: np.ndarray, preds: np.ndarray) -> dict[str, np.ndarray]:
  """Per-image metrics of a batch, gts [B, M, H, W], preds [B, N, H, W] -> {key: float64 [B]}."""
  rows = [evaluate_one(g, p) for g, p in zip(gts, preds)]
  return {k: np.array([r[k] for r in rows], np.float64) for k in rows[0]}
