"""Exact expected calibration error of simple samplers, for choosing calibration bounds.

The calibration check (`cimd_jax.calibration`) compares, for each ambiguous structure
with true inclusion probability p, the fraction of N sampled masks that include it
with p, and averages |p - fraction| over structures (MAE). A sampler that includes a
structure with probability q, independently across its N samples, has
fraction = K / N with K ~ Binomial(N, q), so its expected MAE is exactly
  E|p - K / N| = sum_k C(N, k) q^k (1 - q)^(N - k) |p - k / N|
averaged over the structures. Two samplers matter:
  * the STRAWMAN: q = 1/2 whatever the structure (it knows nothing about p);
  * the ORACLE: q = p (perfectly calibrated; its MAE is pure sampling noise).
A calibration bound only means something if it lies between the oracle's and the
strawman's expected MAE at the N the check uses.
"""

from math import comb
from typing import Callable, Mapping, Sequence

import numpy as np

PROB_LEVELS = (0.25, 0.5, 0.75)   # the synthetic demo's inclusion probabilities


def expected_abs_error(p: float, q: float, n: int) -> float:
  """E|p - K / n| for K ~ Binomial(n, q), exactly (a finite sum)."""
  assert n >= 1 and 0.0 <= q <= 1.0, (n, q)
  return sum(comb(n, k) * q**k * (1.0 - q) ** (n - k) * abs(p - k / n) for k in range(n + 1))


def expected_mae(truths: Sequence[float], q: float | Callable[[float], float], n: int) -> float:
  """Expected calibration MAE over structures with true probabilities `truths` (each
  weighted equally) of a sampler that includes a structure of truth p with
  probability q(p) (or the constant q), independently in each of its n samples."""
  q_of = q if callable(q) else (lambda _: q)
  return sum(expected_abs_error(p, q_of(p), n) for p in truths) / len(truths)


def strawman_mae(n: int, truths: Sequence[float] = PROB_LEVELS) -> float:
  """Expected MAE of the q = 1/2 strawman at n samples."""
  return expected_mae(truths, 0.5, n)


def oracle_mae(n: int, truths: Sequence[float] = PROB_LEVELS) -> float:
  """Expected MAE of the perfectly calibrated sampler (q = p) at n samples."""
  return expected_mae(truths, lambda p: p, n)


def mae_distribution(counts: Mapping[float, int], q: float | Callable[[float], float],
                     n: int) -> tuple[np.ndarray, np.ndarray]:
  """The exact distribution of the MAE over a fixed set of structures.

  Args:
    counts: {true probability p: number of structures with it}; each p * n must be an
      integer (true for p in {1/4, 1/2, 3/4} and n a multiple of 4), so every error
      |p - K / n| is a multiple of 1 / n and the total error's distribution is the
      convolution of the structures' integer-valued error distributions.
    q: the sampler's inclusion probability (constant or a function of p).
    n: samples per image.

  Returns:
    (mae values [M], probabilities [M]).
  """
  q_of = q if callable(q) else (lambda _: q)
  total = np.array([1.0])
  structures = 0
  for p, count in counts.items():
    pn = round(p * n)
    assert abs(pn - p * n) < 1e-9, f'p * n = {p * n} is not an integer'
    qp = q_of(p)
    one = np.zeros(n + 1)
    for k in range(n + 1):
      one[abs(pn - k)] += comb(n, k) * qp**k * (1.0 - qp) ** (n - k)
    for _ in range(count):
      total = np.convolve(total, one)
    structures += count
  return np.arange(total.size) / (n * structures), total


def pass_probability(bound: float, counts: Mapping[float, int],
                     q: float | Callable[[float], float], n: int) -> float:
  """P(MAE <= bound) for the sampler q over the structures `counts`."""
  values, probs = mae_distribution(counts, q, n)
  return float(probs[values <= bound + 1e-12].sum())


if __name__ == '__main__':
  for n in (8, 16, 32, 64):
    print(f'N = {n:3d}: strawman {strawman_mae(n):.4f}   oracle {oracle_mae(n):.4f}')
  mix = {0.25: 8, 0.5: 8, 0.75: 8}
  print('N = 16, 24 structures (8 per level): P(MAE <= bound)')
  for bound in (0.10, 0.12, 0.13, 0.14, 0.15, 0.16, 0.18, 0.20):
    print(f'  bound {bound:.2f}: strawman {pass_probability(bound, mix, 0.5, 16):.2e}   '
          f'oracle {pass_probability(bound, mix, lambda p: p, 16):.4f}')
