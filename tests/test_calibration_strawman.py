"""How good must calibration be to mean anything? The exact expected calibration MAE
of a strawman sampler (each ambiguous structure included with probability 1/2) and of
a perfectly calibrated one, checked against closed forms and against simulations run
through `cimd_jax.calibration` itself.

Numbers (N = 16, p in {1/4, 1/2, 3/4} equally mixed, as in the synthetic demo):
expected MAE strawman 0.2005 (the issue's "about 0.17" is its N -> infinity limit 1/6),
oracle 0.0890. Over 24 structures the strawman's MAE is <= 0.20 with probability 0.48,
<= 0.15 with 0.010, <= 0.13 with 0.00046 (`python tests/calibration_strawman.py`).
"""

from math import comb, floor

import numpy as np
import pytest

from cimd_jax.evaluation import calibration
from calibration_strawman import (PROB_LEVELS, expected_abs_error, expected_mae,
                                  mae_distribution, oracle_mae, pass_probability,
                                  strawman_mae)

N = 16


def _mad_binomial(n, q):
  """De Moivre's closed form of E|K - n q| for K ~ Binomial(n, q):
  2 v C(n, v) q^v (1 - q)^(n - v + 1) with v = floor(n q) + 1."""
  v = floor(n * q) + 1
  return 2 * v * comb(n, v) * q**v * (1 - q) ** (n - v + 1)


def test_exact_strawman_mae_at_n16():
  """(a) The strawman's exact expected MAE at N = 16 for p in {1/4, 1/2, 3/4}:
  * its p = 1/2 part is de Moivre's mean absolute deviation / N;
  * its p = 1/4 part is E[K/N - 1/4] + 2 E[(1/4 - K/N)+] = 1/4 + 2 E[(1/4 - K/N)+],
    and p = 3/4 gives the same by the symmetry K <-> N - K of Binomial(N, 1/2);
  * it lies between the N -> infinity value mean|p - 1/2| = 1/6 (Jensen) and
    1/6 + E|K/N - 1/2| (triangle inequality), and decreases towards 1/6 with N."""
  mae = strawman_mae(N)
  half = expected_abs_error(0.5, 0.5, N)
  assert half == pytest.approx(_mad_binomial(N, 0.5) / N, rel=1e-12)
  probs = [comb(N, k) / 2**N for k in range(N + 1)]
  quarter = 0.25 + 2 * sum(pk * max(0.25 - k / N, 0.0) for k, pk in enumerate(probs))
  assert expected_abs_error(0.25, 0.5, N) == pytest.approx(quarter, rel=1e-12)
  assert expected_abs_error(0.75, 0.5, N) == pytest.approx(quarter, rel=1e-12)
  assert mae == pytest.approx((2 * quarter + half) / 3, rel=1e-12)
  limit = np.mean([abs(p - 0.5) for p in PROB_LEVELS])
  assert limit == pytest.approx(1 / 6)
  assert limit < mae < limit + half
  values = [strawman_mae(n) for n in (8, 16, 32, 64, 256)]
  assert all(a > b for a, b in zip(values, values[1:])) and values[-1] - limit < 0.01


def _synthetic_cases(num_images, q_of, rng, size=12):
  """Cases of 3 ambiguous structures (3x3 squares, p cycling through PROB_LEVELS so
  the mix is exactly equal), one decoy (p = 0) and one padding slot (p = -1, empty),
  with N sampled masks that include each structure with probability q_of(p): an
  included structure gets 5..9 of its 9 pixels, an excluded one 0..4 (so the cover
  rule, >= half of the region, decides), plus background speckle."""
  cases = []
  for i in range(num_images):
    regions = np.zeros((5, size, size), np.uint8)
    for s, (y, x) in enumerate(((1, 1), (1, 7), (7, 1), (7, 7))):
      regions[s, y:y + 3, x:x + 3] = 1
    probs = np.array([PROB_LEVELS[(i + s) % 3] for s in range(3)] + [0.0, -1.0])
    masks = rng.random((N, size, size)) < 0.05
    for s in range(4):
      coords = np.argwhere(regions[s])
      for n in range(N):
        take = rng.random() < q_of(probs[s])
        count = rng.integers(5, 10) if take else rng.integers(0, 5)
        ys, xs = coords[rng.permutation(len(coords))[:count]].T
        masks[n][regions[s].astype(bool)] = False
        masks[n, ys, xs] = True
    cases.append((masks, regions, probs))
  return cases


def _simulated_mae(q_of, seed, num_images=400):
  rng = np.random.default_rng(seed)
  truth, sampled = [], []
  for masks, regions, probs in _synthetic_cases(num_images, q_of, rng):
    t, s = calibration.structure_frequencies(masks, regions, probs)
    truth.append(t)
    sampled.append(s)
  truth, sampled = np.concatenate(truth), np.concatenate(sampled)
  summary = calibration.summarize(truth, sampled)
  amb = truth > 0
  errors = np.abs(truth[amb] - sampled[amb])
  return summary, errors.std(ddof=1) / np.sqrt(errors.size)


def test_simulated_strawman_through_calibration_matches_exact():
  """(b) A simulated strawman (q = 1/2) on synthetic masks, scored by
  `calibration.structure_frequencies` + `summarize`, has MAE equal to the exact
  expectation within 5 Monte-Carlo standard errors (1200 structures); the decoy's
  sampled frequency is 0 and the padding slot is skipped."""
  summary, se = _simulated_mae(lambda p: 0.5 if p > 0 else 0.0, seed=0)
  assert summary['num_ambiguous'] == 1200 and summary['num_never_drawn'] == 400
  assert summary['max_freq_never_drawn'] == 0.0
  assert abs(summary['mae_ambiguous'] - strawman_mae(N)) < 5 * se, (summary, se)


def test_oracle_is_well_below_the_strawman():
  """(c) The perfectly calibrated sampler (q = p) has exact expected MAE well below the
  strawman's at N = 16, and a simulation of it through `calibration` matches its exact
  value; so a useful bound lies between the two."""
  oracle = oracle_mae(N)
  assert oracle == pytest.approx(
      np.mean([_mad_binomial(N, p) / N for p in PROB_LEVELS]), rel=1e-12)
  assert oracle < 0.5 * strawman_mae(N)
  summary, se = _simulated_mae(lambda p: max(p, 0.0), seed=1)
  assert abs(summary['mae_ambiguous'] - oracle) < 5 * se, (summary, se)
  assert expected_mae(PROB_LEVELS, lambda p: p, N) == oracle


def test_mae_distribution_is_consistent():
  """The exact MAE distribution over a fixed set of structures sums to 1, has the
  exact expected MAE as its mean (strawman and oracle), and its pass probabilities
  grow with the bound; the strawman is far less likely than the oracle to pass a bound
  halfway between their expectations."""
  mix = {0.25: 8, 0.5: 8, 0.75: 8}
  for q in (0.5, lambda p: p):
    values, probs = mae_distribution(mix, q, N)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.dot(values, probs) == pytest.approx(expected_mae(PROB_LEVELS, q, N), rel=1e-9)
  mid = 0.5 * (strawman_mae(N) + oracle_mae(N))
  assert pass_probability(mid, mix, 0.5, N) < 0.01 < 0.99 < pass_probability(mid, mix,
                                                                             lambda p: p, N)
  bounds = np.linspace(0.05, 0.3, 11)
  passes = [pass_probability(b, mix, 0.5, N) for b in bounds]
  assert all(a <= b for a, b in zip(passes, passes[1:]))
