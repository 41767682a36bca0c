"""Tests of cimd_jax.metrics against hand-worked cases and the loop reference."""

import math

import numpy as np
import pytest

from cimd_jax import metrics
from tests import metrics_reference as reference

KEYS = metrics.METRIC_KEYS
ATOL = 1e-6


# ------------------------------------------------------------------ random mask sets


def _masks(rng, k, h, w, kind):
  """bool [k, h, w] masks of one kind."""
  if kind == 'empty':
    return np.zeros((k, h, w), bool)
  if kind == 'full':
    return np.ones((k, h, w), bool)
  if kind == 'sparse':
    return rng.random((k, h, w)) < rng.choice([0.01, 0.05, 0.2])
  if kind == 'dense':
    return rng.random((k, h, w)) < rng.choice([0.5, 0.8, 0.95])
  if kind == 'blob':  # discs that jitter around one centre, a little speckle
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.2, 0.8, 2) * (h, w)
    r0 = rng.uniform(0.05, 0.5) * min(h, w)
    out = np.zeros((k, h, w), bool)
    for i in range(k):
      y, x = cy + rng.normal(0, 1.5), cx + rng.normal(0, 1.5)
      r = r0 * rng.uniform(0.5, 1.4)
      out[i] = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    return out ^ (rng.random((k, h, w)) < 0.02)
  assert kind == 'mixed'
  kinds = ['empty', 'full', 'sparse', 'dense', 'blob']
  return np.stack([_masks(rng, 1, h, w, kinds[rng.integers(5)])[0] for _ in range(k)])


def _case(rng, index, m, n, h, w):
  """(gts [m, h, w], preds [n, h, w]); the first five indices are the special cases."""
  kinds = ['empty', 'full', 'sparse', 'dense', 'blob', 'mixed', 'mixed', 'blob']
  if index == 0:  # everything empty
    return np.zeros((m, h, w), bool), np.zeros((n, h, w), bool)
  if index == 1:  # experts empty, predictions not
    return np.zeros((m, h, w), bool), _masks(rng, n, h, w, 'dense')
  if index == 2:  # predictions empty, experts not
    return _masks(rng, m, h, w, 'dense'), np.zeros((n, h, w), bool)
  if index == 3:  # identical sets (when m == n; else the experts repeated)
    gts = _masks(rng, m, h, w, 'mixed')
    return gts, gts[np.arange(n) % m].copy()
  if index == 4:  # disjoint: experts left of the middle column, predictions right
    gts, preds = _masks(rng, m, h, w, 'dense'), _masks(rng, n, h, w, 'dense')
    gts[..., w // 2:] = False
    preds[..., :w // 2] = False
    gts[:, 0, 0] = True
    preds[:, 0, w - 1] = True
    return gts, preds
  gts = _masks(rng, m, h, w, kinds[rng.integers(len(kinds))])
  if rng.random() < 0.4:  # predictions that perturb the experts
    preds = gts[rng.integers(m, size=n)] ^ (rng.random((n, h, w)) < rng.choice([0.0, 0.02, 0.1]))
  else:
    preds = _masks(rng, n, h, w, kinds[rng.integers(len(kinds))])
  return gts, preds


# (B, M, N, H, W): 11 x 20 small batches + a few larger ones = 227 random cases.
CONFIGS = [
    (20, 1, 1, 4, 4),
    (20, 1, 6, 8, 8),
    (20, 5, 1, 8, 8),
    (20, 3, 3, 16, 16),
    (20, 4, 16, 32, 32),
    (20, 2, 3, 5, 7),
    (20, 4, 6, 16, 24),   # lcm 12
    (20, 7, 9, 12, 12),   # lcm 63
    (20, 6, 4, 9, 31),
    (20, 8, 8, 32, 32),
    (20, 1, 12, 20, 20),
    (3, 4, 16, 128, 128),
    (2, 3, 5, 256, 256),
    (1, 2, 3, 1024, 1024),
    (1, 128, 96, 16, 16),  # lcm 384
]


@pytest.mark.parametrize('config', CONFIGS, ids=lambda c: 'x'.join(map(str, c)))
def test_matches_loop_reference(config):
  batch, m, n, h, w = config
  rng = np.random.default_rng(sum(config))
  cases = [_case(rng, i, m, n, h, w) for i in range(batch)]
  gts = np.stack([g for g, _ in cases])
  preds = np.stack([p for _, p in cases])
  got = metrics.evaluate(gts, preds)
  want = reference.evaluate(gts, preds)
  assert set(got) == set(KEYS)
  for k in KEYS:
    assert got[k].shape == (batch,)
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=ATOL, err_msg=k)
  # The special cases, with the values the conventions imply.
  if batch >= 5:
    for k in KEYS:  # all empty: every ratio is 1 by convention, GED 0
      assert got[k][0] == pytest.approx(0.0 if k == 'ged' else 1.0, abs=ATOL), k
    assert got['sc'][1] == 1.0 and got['dmax'][1] == 0.0 and got['ci'][1] == 0.0
    assert got['sc'][2] == 0.0 and got['dmax'][2] == 0.0 and got['ci'][2] == 0.0
    if m == n:
      assert got['ci'][3] == pytest.approx(1.0, abs=ATOL)
      assert got['ged'][3] == pytest.approx(0.0, abs=ATOL)
      assert got['hm_iou'][3] == pytest.approx(1.0, abs=ATOL)
    for k in ('sc', 'dmax', 'ci', 'hm_iou', 'dice_mean'):
      assert got[k][4] == 0.0, k


def test_single_image_functions_match_reference():
  rng = np.random.default_rng(7)
  for i, (m, n, h, w) in enumerate([(3, 5, 8, 8), (1, 1, 6, 6), (4, 4, 10, 12), (2, 7, 9, 9)]):
    gts, preds = _case(rng, 5 + i, m, n, h, w)
    want = reference.evaluate_one(gts, preds)
    got = metrics.ci_score(gts, preds)
    assert set(got) == {'sc', 'dmax', 'da', 'ci'}
    for k in got:
      assert got[k] == pytest.approx(want[k], abs=ATOL), k
    assert metrics.ged(gts, preds) == pytest.approx(want['ged'], abs=ATOL)
    assert metrics.hm_iou(gts, preds) == pytest.approx(want['hm_iou'], abs=ATOL)
    # 0/1 integers and floats give the same numbers as bool.
    assert metrics.ci_score(gts.astype(np.uint8), preds.astype(np.float32)) == got
    # Pairwise helpers against the reference's Dice/IoU.
    dice, iou = np.asarray(metrics.dice(gts, preds)), np.asarray(metrics.iou(gts, preds))
    assert dice.shape == iou.shape == (m, n)
    for a in range(m):
      for b in range(n):
        assert dice[a, b] == pytest.approx(reference.dice(gts[a], preds[b]), abs=ATOL)
        assert iou[a, b] == pytest.approx(reference.iou(gts[a], preds[b]), abs=ATOL)


def test_hm_iou_transport_path_equals_assignment(monkeypatch):
  """The LP used for large lcm(M, N) gives the repeated assignment's optimum."""
  rng = np.random.default_rng(3)
  shapes = [(2, 3), (4, 6), (7, 9), (1, 5), (5, 1), (3, 3), (6, 10), (8, 12)]
  cases = [_case(rng, 5 + i, m, n, 8, 8) for i, (m, n) in enumerate(shapes)]
  want = [reference.hm_iou(g, p) for g, p in cases]
  monkeypatch.setattr(metrics, '_MAX_ASSIGNMENT', 0)
  for (g, p), value in zip(cases, want):
    assert metrics.hm_iou(g, p) == pytest.approx(value, abs=ATOL)
  # Random IoU matrices straight into both solvers.
  for m, n in [(5, 7), (9, 6), (11, 13)]:
    ious = rng.random((m, n))
    monkeypatch.setattr(metrics, '_MAX_ASSIGNMENT', 0)
    lp = metrics._hm_iou_from_ious(ious)  # pylint: disable=protected-access
    monkeypatch.setattr(metrics, '_MAX_ASSIGNMENT', 10**6)
    assignment = metrics._hm_iou_from_ious(ious)  # pylint: disable=protected-access
    assert lp == pytest.approx(assignment, abs=1e-9)


def test_hm_iou_large_lcm_default_path():
  rng = np.random.default_rng(4)
  gts, preds = _case(rng, 6, 23, 29, 6, 6)  # lcm 667 > _MAX_ASSIGNMENT: the LP path
  assert math.lcm(23, 29) > metrics._MAX_ASSIGNMENT  # pylint: disable=protected-access
  assert metrics.hm_iou(gts, preds) == pytest.approx(reference.hm_iou(gts, preds), abs=ATOL)


def test_chunked_batches_equal_one_chunk(monkeypatch):
  rng = np.random.default_rng(5)
  cases = [_case(rng, i, 3, 4, 12, 12) for i in range(7)]
  gts = np.stack([g for g, _ in cases])
  preds = np.stack([p for _, p in cases])
  whole = metrics.evaluate(gts, preds)
  monkeypatch.setattr(metrics, '_CHUNK_BYTES', 1)  # one image per chunk
  one_by_one = metrics.evaluate(gts, preds)
  monkeypatch.setattr(metrics, '_CHUNK_BYTES', 3 * 10 * 16 * 4)  # 3 per chunk, padded
  by_three = metrics.evaluate(gts, preds)
  for k in KEYS:
    np.testing.assert_array_equal(one_by_one[k], whole[k])
    np.testing.assert_array_equal(by_three[k], whole[k])


# --------------------------------------------------------------- hand-worked 4x4 cases


def _grid(*pixels):
  """A 4x4 bool mask with the listed (row, col) pixels set."""
  out = np.zeros((4, 4), bool)
  for r, c in pixels:
    out[r, c] = True
  return out


def test_hand_worked_two_experts_two_samples():
  # Y1 = 2x2 block top-left (4 px), Y2 = top row (4 px): |Y1 ∩ Y2| = 2.
  # P1 = Y1 (4 px), P2 = left column + (3, 1) (5 px): |P2 ∩ Y1| = 2, |P2 ∩ Y2| = 1,
  # |P1 ∩ P2| = 2. P = 16 pixels.
  y1 = _grid((0, 0), (0, 1), (1, 0), (1, 1))
  y2 = _grid((0, 0), (0, 1), (0, 2), (0, 3))
  p1 = y1.copy()
  p2 = _grid((0, 0), (1, 0), (2, 0), (3, 0), (3, 1))
  gts, preds = np.stack([y1, y2]), np.stack([p1, p2])
  # S_c: Y_c = block ∪ top row = 6 px; pred union = block ∪ P2 = 7 px; TP = block = 4.
  sc = 4 / 6
  # D_max: Y1 best Dice 1 (P1); Y2: Dice(P1,Y2) = 2·2/8 = 1/2, Dice(P2,Y2) = 2·1/9 -> 1/2.
  dmax = (1 + 1 / 2) / 2
  # V^Y: one pair, |Y1\Y2| = |Y2\Y1| = 2: var = 4/16 - 0 = 1/4 (= V_min = V_max).
  # V^P: one pair, |P1\P2| = 2, |P2\P1| = 3: var = 5/16 - (1/16)² = 79/256.
  # D_a = 1 - (15/256 + 15/256)/2 = 241/256.
  da = 241 / 256
  # CI = 3·(2/3)·(3/4)·(241/256) / (2/3 + 3/4 + 241/256) = (361.5/256) / (1811/768)
  #    = 1084.5 / 1811.
  ci = 1084.5 / 1811
  # GED: d(P,Y) = 1 - IoU: (P1,Y1) 0, (P1,Y2) 1 - 2/6, (P2,Y1) 1 - 2/7, (P2,Y2) 1 - 1/8,
  # mean 379/672; within P: d(P1,P2) = 1 - 2/7 twice, diagonal 0: mean 5/14;
  # within Y: d(Y1,Y2) = 2/3 twice: mean 1/3. GED = 379/336 - 5/14 - 1/3 = 147/336 = 7/16.
  ged = 7 / 16
  # HM-IoU (L = 2): (Y1-P1, Y2-P2) = 1 + 1/8 beats (Y1-P2, Y2-P1) = 2/7 + 1/3: 9/16.
  hm = 9 / 16
  # dice_mean = (1 + 1/2 + 4/9 + 2/9) / 4 = 13/24.
  dice_mean = 13 / 24
  want = {'sc': sc, 'dmax': dmax, 'da': da, 'ci': ci, 'ged': ged, 'hm_iou': hm,
          'dice_mean': dice_mean}
  got = metrics.evaluate(gts[None], preds[None])
  ref = reference.evaluate_one(gts, preds)
  for k, v in want.items():
    assert got[k][0] == pytest.approx(v, abs=ATOL), k
    assert ref[k] == pytest.approx(v, abs=1e-12), k
  assert metrics.ci_score(gts, preds) == pytest.approx({k: want[k] for k in ('sc', 'dmax', 'da', 'ci')},
                                                       abs=ATOL)
  assert metrics.ged(gts, preds) == pytest.approx(ged, abs=ATOL)
  assert metrics.hm_iou(gts, preds) == pytest.approx(hm, abs=ATOL)
  # Pairwise helpers: rows experts, columns samples.
  np.testing.assert_allclose(metrics.dice(gts, preds), [[1, 4 / 9], [1 / 2, 2 / 9]], atol=ATOL)
  np.testing.assert_allclose(metrics.iou(gts, preds), [[1, 2 / 7], [1 / 3, 1 / 8]], atol=ATOL)
  assert float(metrics.iou(p1, p2)) == pytest.approx(2 / 7, abs=ATOL)
  assert np.shape(metrics.dice(y2, preds)) == (2,)


def test_hand_worked_one_expert_one_empty_sample():
  # Y = 2x2 block (4 px); P1 = Y, P2 = empty.
  y = _grid((1, 1), (1, 2), (2, 1), (2, 2))
  gts, preds = y[None], np.stack([y, np.zeros((4, 4), bool)])
  got = metrics.evaluate(gts[None], preds[None])
  # S_c = 4/4 = 1; D_max = max(1, Dice(∅, Y) = 0) = 1.
  # V^Y = 0 (one mask); V^P: |P1\P2| = 4, |P2\P1| = 0: 4/16 - (4/16)² = 3/16.
  # D_a = 1 - (3/16 + 3/16)/2 = 13/16; CI = 3·(13/16) / (2 + 13/16) = 39/45 = 13/15.
  # GED: cross d = (0 + 1)/2; within P: d(P1,∅) = 1 twice, d(∅,∅) = 0 (empty IoU 1) -> 1/2;
  # within Y 0: GED = 2·(1/2) - 1/2 - 0 = 1/2.
  # HM-IoU: L = 2, Y twice against (P1, ∅): (1 + 0)/2. dice_mean = (1 + 0)/2.
  want = {'sc': 1, 'dmax': 1, 'da': 13 / 16, 'ci': 13 / 15, 'ged': 1 / 2, 'hm_iou': 1 / 2,
          'dice_mean': 1 / 2}
  ref = reference.evaluate_one(gts, preds)
  for k, v in want.items():
    assert got[k][0] == pytest.approx(v, abs=ATOL), k
    assert ref[k] == pytest.approx(v, abs=1e-12), k


def test_hand_worked_all_three_terms_zero_gives_ci_zero():
  # Y1 = left half, Y2 = right half of a 4x4 image (complementary, covering it all);
  # both samples empty. S_c = 0/16 = 0; D_max = Dice(∅, Y_i) = 0; V^Y: the difference
  # map is ±1 everywhere: 16/16 - 0² = 1 (max = min); V^P = 0; D_a = 1 - (1 + 1)/2 = 0.
  # CI's denominator S_c + D_max + D_a is 0: CI is 0 by definition, never 1 or NaN.
  # GED: cross d = 1; within P: d(∅,∅) = 0; within Y: (0 + 1 + 1 + 0)/4 = 1/2:
  # GED = 2 - 0 - 1/2 = 3/2.
  left = np.zeros((4, 4), bool)
  left[:, :2] = True
  gts, preds = np.stack([left, ~left]), np.zeros((2, 4, 4), bool)
  got = metrics.evaluate(gts[None], preds[None])
  want = {'sc': 0, 'dmax': 0, 'da': 0, 'ci': 0, 'ged': 3 / 2, 'hm_iou': 0, 'dice_mean': 0}
  ref = reference.evaluate_one(gts, preds)
  for k, v in want.items():
    assert got[k][0] == pytest.approx(v, abs=ATOL), k
    assert ref[k] == pytest.approx(v, abs=1e-12), k


def test_hand_worked_lcm_repetition():
  # Y1 = row 0, Y2 = row 1; P1 = P2 = row 0, P3 = row 1 (4 px each, no partial overlaps).
  row = lambda r: _grid(*[(r, c) for c in range(4)])
  gts, preds = np.stack([row(0), row(1)]), np.stack([row(0), row(0), row(1)])
  got = metrics.evaluate(gts[None], preds[None])
  # IoU: Y1 -> (1, 1, 0), Y2 -> (0, 0, 1). L = 6: each expert 3 times, each sample twice.
  # Y1's 3 copies take 3 of the 4 copies of P1/P2 (IoU 1); Y2's 3 copies get P3 twice
  # (IoU 1) and the remaining P1/P2 copy (IoU 0): HM-IoU = 5/6.
  # S_c = 1, D_max = 1. V^Y: |Y1\Y2| = |Y2\Y1| = 4: 8/16 = 1/2. V^P: (P1,P2) 0,
  # (P1,P3) = (P2,P3) = 1/2: V_min 0, V_max 1/2. D_a = 1 - (0 + 1/2)/2 = 3/4.
  # CI = 3·(3/4)/(2 + 3/4) = 9/11.
  # GED: cross d = (0+0+1 + 1+1+0)/6 = 1/2; within P (ordered, 9): d = 1 for 4 of them
  # -> 4/9; within Y: 2/4 = 1/2. GED = 1 - 4/9 - 1/2 = 1/18. dice_mean = 3/6 = 1/2.
  want = {'sc': 1, 'dmax': 1, 'da': 3 / 4, 'ci': 9 / 11, 'ged': 1 / 18, 'hm_iou': 5 / 6,
          'dice_mean': 1 / 2}
  ref = reference.evaluate_one(gts, preds)
  for k, v in want.items():
    assert got[k][0] == pytest.approx(v, abs=ATOL), k
    assert ref[k] == pytest.approx(v, abs=1e-12), k


def test_uncertainty_maps():
  # 4 samples; pixel (0,0) on in 1 of 4, (0,1) in all 4, (0,2) in 2 of 4, others never.
  preds = np.zeros((4, 4, 4), np.uint8)
  preds[0, 0, 0] = 1
  preds[:, 0, 1] = 1
  preds[:2, 0, 2] = 1
  freq, var = metrics.uncertainty_maps(preds)
  assert freq.shape == var.shape == (4, 4)
  assert float(freq[0, 0]) == 0.25 and float(var[0, 0]) == 0.1875  # 1/4 · 3/4
  assert float(freq[0, 1]) == 1.0 and float(var[0, 1]) == 0.0
  assert float(freq[0, 2]) == 0.5 and float(var[0, 2]) == 0.25
  rng = np.random.default_rng(0)
  masks = rng.random((7, 9, 11)) < 0.4
  freq, var = metrics.uncertainty_maps(masks)
  np.testing.assert_allclose(freq, masks.mean(0), atol=ATOL)
  np.testing.assert_allclose(var, masks.astype(np.float64).var(0), atol=ATOL)  # ddof=0


def test_summarize():
  out = metrics.summarize({'ci': np.array([0.5, 1.0, 0.0]), 'ged': [0.25]})
  assert out['ci'] == {'mean': 0.5, 'std': pytest.approx(np.std([0.5, 1.0, 0.0])), 'count': 3}
  assert out['ged'] == {'mean': 0.25, 'std': 0.0, 'count': 1}
  assert isinstance(out['ci']['count'], int)
  with pytest.raises(ValueError, match=r"'ci' has shape \(2, 3\); expected one value per"):
    metrics.summarize({'ci': np.zeros((2, 3))})     # not 6 images


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_with_argument_and_shape():
  ok3 = np.zeros((2, 4, 4), bool)
  ok4 = np.zeros((1, 2, 4, 4), bool)
  cases = [
      (lambda: metrics.ci_score(np.zeros((4, 4), bool), ok3),
       r'gts: expected a 3-D mask array \[M, H, W\], got shape \(4, 4\)'),
      (lambda: metrics.ged(ok3, ok4), r'preds: expected a 3-D .*got shape \(1, 2, 4, 4\)'),
      (lambda: metrics.evaluate(ok3, ok4),
       r'gts: expected a 4-D mask array \[B, M, H, W\], got shape \(2, 4, 4\)'),
      (lambda: metrics.evaluate(ok4, np.zeros((1, 2, 2, 4, 4))),
       r'preds: expected a 4-D .*got shape \(1, 2, 2, 4, 4\)'),
      (lambda: metrics.hm_iou(ok3, np.zeros((3, 4, 5), bool)),
       r'same H x W: gts shape \(2, 4, 4\), preds shape \(3, 4, 5\)'),
      (lambda: metrics.evaluate(ok4, np.zeros((1, 2, 5, 4), bool)),
       r'same H x W: gts shape \(1, 2, 4, 4\), preds shape \(1, 2, 5, 4\)'),
      (lambda: metrics.evaluate(ok4, np.zeros((3, 2, 4, 4), bool)),
       r'same batch size B: gts shape \(1, 2, 4, 4\), preds shape \(3, 2, 4, 4\)'),
      (lambda: metrics.ci_score(np.zeros((0, 4, 4), bool), ok3),
       r'gts: empty set of masks \(M = 0\).*shape \(0, 4, 4\)'),
      (lambda: metrics.ci_score(ok3, np.zeros((0, 4, 4), bool)),
       r'preds: empty set of masks \(N = 0\).*shape \(0, 4, 4\)'),
      (lambda: metrics.evaluate(ok4, np.zeros((1, 0, 4, 4), bool)),
       r'preds: empty set of masks \(N = 0\).*shape \(1, 0, 4, 4\)'),
      (lambda: metrics.evaluate(np.zeros((0, 2, 4, 4), bool), np.zeros((0, 2, 4, 4), bool)),
       r'gts: empty dimension \(B = 0\).*shape \(0, 2, 4, 4\)'),
      (lambda: metrics.ci_score(np.full((2, 4, 4), 2, np.int32), ok3),
       r'gts: values must be 0 or 1.*found 2.*shape \(2, 4, 4\)'),
      (lambda: metrics.ci_score(ok3, np.full((2, 4, 4), 0.5, np.float32)),
       r'preds: values must be 0 or 1.*found 0.5.*shape \(2, 4, 4\)'),
      (lambda: metrics.ged(ok3, np.full((2, 4, 4), np.nan)),
       r'preds: values must be 0 or 1.*found nan'),
      (lambda: metrics.ged(ok3, np.full((2, 4, 4), -1, np.int8)),
       r'preds: values must be 0 or 1.*found -1'),
      (lambda: metrics.evaluate(np.full((1, 2, 4, 4), 'a'), ok4),
       r'gts: masks must be bool, integer or float, got dtype <U1 with shape \(1, 2, 4, 4\)'),
      (lambda: metrics.uncertainty_maps(np.zeros((4, 4))),
       r'preds: expected a 3-D mask array \[N, H, W\], got shape \(4, 4\)'),
      (lambda: metrics.dice(np.zeros((2, 3, 3)), np.zeros((2, 3, 4))),
       r'a and b must have the same H x W: a shape \(2, 3, 3\), b shape \(2, 3, 4\)'),
      (lambda: metrics.iou(np.zeros((3,)), ok3), r'a: expected a 3-D .*got shape \(3,\)'),
  ]
  for fn, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      fn()


def test_accepts_0_1_numbers_and_jax_arrays():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  gts, preds = _case(rng, 6, 3, 4, 8, 8)
  want = metrics.evaluate(gts[None], preds[None])
  for g, p in [(gts.astype(np.int64), preds.astype(np.float64)),
               (jnp.asarray(gts), jnp.asarray(preds, jnp.float32))]:
    got = metrics.evaluate(g[None], p[None])
    for k in KEYS:
      np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize('m,n', [(4, 5), (4, 6), (3, 7), (4, 100)])
def test_ged_of_identical_sets_is_exactly_zero(m, n):
  """Two sets of identical masks (all empty, as on many LIDC slices, or all one
  mask): D²_GED = 2·d̄ − d̄ − d̄ with every d = 0, so 0 exactly, never -2e-8
  (float32 means that do not cancel exactly)."""
  one = np.zeros((8, 8), bool)
  one[2:5, 1:7] = True
  for mask in (np.zeros((8, 8), bool), one):
    gts = np.broadcast_to(mask, (1, m, 8, 8))
    preds = np.broadcast_to(mask, (1, n, 8, 8))
    assert metrics.evaluate(gts, preds)['ged'][0] == 0.0
    assert metrics.ged(gts[0], preds[0]) == 0.0
