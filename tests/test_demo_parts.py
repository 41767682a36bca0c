"""Pieces of the demo report: calibration counting, baselines, sampler choice."""

import numpy as np
import pytest

from cimd_jax.apps import compare_samplers
from cimd_jax.apps import demo
from cimd_jax.evaluation import calibration


def test_included_counts_half_coverage():
  region = np.zeros((4, 4), bool)
  region[0, :4] = True                       # 4 pixels
  masks = np.zeros((3, 4, 4), bool)
  masks[0, 0, :2] = True                     # covers 2/4: included (>= half)
  masks[1, 0, :1] = True                     # covers 1/4: not included
  masks[2] = True                            # covers all
  np.testing.assert_array_equal(calibration.included(masks, region), [True, False, True])
  with pytest.raises(ValueError):
    calibration.included(masks, np.zeros((4, 4)))
  # 0/1 integers count as the bool masks do; masks still in diffusion space ({-1, 1},
  # every pixel non-zero) are refused instead of including every structure.
  np.testing.assert_array_equal(calibration.included(masks.astype(np.uint8), region),
                                [True, False, True])
  with pytest.raises(ValueError, match=r'^masks: values must be 0 or 1 \(or bool\), found -1'):
    calibration.included(np.where(masks, 1.0, -1.0), region)
  with pytest.raises(ValueError, match=r'^masks: values must be 0 or 1 \(or bool\), found -1'):
    calibration.structure_frequencies(np.where(masks, 1.0, -1.0), region[None], np.array([0.5]))


def test_structure_frequencies_and_summary_by_hand():
  structures = np.zeros((3, 4, 4), np.uint8)
  structures[0, 0, 0] = 1
  structures[1, 3, 3] = 1                    # structure 2 is padding (empty, p = -1)
  probs = np.array([0.5, 0.0, -1.0], np.float32)
  masks = np.zeros((4, 4, 4), bool)
  masks[:3, 0, 0] = True                     # structure 0 in 3 of 4 samples
  masks[0, 3, 3] = True                      # decoy in 1 of 4
  truth, sampled = calibration.structure_frequencies(masks, structures, probs)
  np.testing.assert_allclose(truth, [0.5, 0.0])
  np.testing.assert_allclose(sampled, [0.75, 0.25])
  summary = calibration.summarize(truth, sampled)
  assert summary['mae_ambiguous'] == pytest.approx(0.25)
  assert summary['max_freq_never_drawn'] == pytest.approx(0.25)
  assert summary['num_ambiguous'] == 1 and summary['num_never_drawn'] == 1
  plot = calibration.calibration_plot(truth, sampled)
  assert plot.shape[-1] == 3 and plot.dtype == np.uint8
  with pytest.raises(ValueError, match='3 structure regions but 2 probabilities'):
    calibration.structure_frequencies(masks, structures, probs[:2])


def test_summary_statistics_by_hand():
  """Three ambiguous structures (errors 0.1, 0.2, 0.6) and three decoys drawn at 0,
  0.25 and 0.5: MAE 0.3, its standard error s/sqrt(3) with the sample std s (ddof 1),
  the worst decoy 0.5 and the
  mean decoy 0.25; with two ambiguous structures the standard error still exists."""
  truth = np.array([0.25, 0.5, 0.75, 0.0, 0.0, 0.0])
  sampled = np.array([0.35, 0.3, 0.15, 0.0, 0.25, 0.5])
  summary = calibration.summarize(truth, sampled)
  errors = np.array([0.1, 0.2, 0.6])
  assert summary['mae_ambiguous'] == pytest.approx(0.3)
  assert summary['mae_ambiguous_sem'] == pytest.approx(np.std(errors, ddof=1) / np.sqrt(3))
  assert summary['mae_ambiguous_sem'] == pytest.approx(np.sqrt(0.14 / 2) / np.sqrt(3))
  assert summary['max_freq_never_drawn'] == pytest.approx(0.5)
  assert summary['mean_freq_never_drawn'] == pytest.approx(0.25)
  assert summary['num_ambiguous'] == 3 and summary['num_never_drawn'] == 3
  two = calibration.summarize(np.array([0.5, 0.5]), np.array([0.4, 0.8]))
  # {0.1, 0.3}: sample variance 0.02, standard error sqrt(0.02 / 2) = 0.1
  assert two['mae_ambiguous_sem'] == pytest.approx(0.1)
  one = calibration.summarize(np.array([0.5]), np.array([0.4]))
  assert one['mae_ambiguous'] == pytest.approx(0.1) and np.isnan(one['mae_ambiguous_sem'])


def test_dispersion_by_hand():
  """truth (0.5, 0.25), sampled (0.75, 0.25) at N = 4: squared errors (1/16, 0),
  binomial variances p (1 - p) / N = (1/16, 3/64); dispersion (1/32) / (7/128) = 4/7;
  excess per structure (0, -3/64), mean -3/128 with standard error 3/128 (sample std
  3/64 / sqrt(2), over sqrt(2)). The decoy (p = 0) takes no part."""
  summary = calibration.summarize(np.array([0.5, 0.25, 0.0]), np.array([0.75, 0.25, 0.5]), 4)
  assert summary['dispersion'] == pytest.approx(4 / 7)
  assert summary['excess_variance'] == pytest.approx(-3 / 128)
  assert summary['excess_variance_sem'] == pytest.approx(3 / 128)
  assert 'dispersion' not in calibration.summarize(np.array([0.5]), np.array([0.75]))


def test_dispersion_tells_independent_draws_from_scattered_ones():
  """3000 structures at true p in {1/4, 1/2, 3/4}, N = 16: frequencies drawn
  binomially at p give dispersion 1 and excess 0 (within 4 standard errors); drawn at
  a per-structure q = p + U(-0.2, 0.2) they give excess Var q - E[Var q] / N =
  (0.04 / 3) (15 / 16) = 0.0125 and dispersion near 1 + 0.0125 / 0.0130 ≈ 1.96 (the
  mean binomial variance is (3/16 + 1/4 + 3/16) / 3 / 16 = 0.0130)."""
  rng = np.random.default_rng(0)
  truth = rng.choice([0.25, 0.5, 0.75], 3000)
  fair = calibration.summarize(truth, rng.binomial(16, truth) / 16, 16)
  assert abs(fair['excess_variance']) < 4 * fair['excess_variance_sem'], fair
  assert 0.9 < fair['dispersion'] < 1.1, fair
  scattered_p = truth + rng.uniform(-0.2, 0.2, truth.shape)
  scattered = calibration.summarize(truth, rng.binomial(16, scattered_p) / 16, 16)
  assert scattered['excess_variance'] == pytest.approx(
      0.04 / 3 * 15 / 16, abs=4 * scattered['excess_variance_sem'])
  assert 1.8 < scattered['dispersion'] < 2.25, scattered


def test_over_cases_takes_each_images_own_mask_count():
  """One structure (p = 1/2) per image: image A has N = 4 masks, 3 include it (squared
  error 1/16, binomial 1/16); image B has N = 2, 1 includes it (0, binomial 1/8):
  dispersion (1/32) / (3/32) = 1/3 (with A's N for both it would read 1/2)."""
  structures = np.ones((1, 2, 2), np.uint8)
  masks_a = np.zeros((4, 2, 2), bool)
  masks_a[:3] = True
  masks_b = np.zeros((2, 2, 2), bool)
  masks_b[:1] = True
  summary, _, _ = calibration.over_cases([(structures, np.array([0.5]), masks_a),
                                          (structures, np.array([0.5]), masks_b)])
  assert summary['dispersion'] == pytest.approx(1 / 3)


def test_over_cases_counts_a_structure_at_half_its_pixels():
  """Through over_cases (what validation, `sample` and the demo call): a 4-pixel
  structure covered by 2 pixels in one sample and 1 pixel in two others is included
  once in 4 samples (frequency 0.25, not 0.75 as a looser cover would make it), and the
  cases' structures are pooled in order."""
  structures = np.zeros((1, 4, 4), np.uint8)
  structures[0, 0, :4] = 1
  masks = np.zeros((4, 4, 4), bool)
  masks[0, 0, :2] = True
  masks[1, 0, :1] = True
  masks[2, 0, 3:] = True
  other_structures = np.zeros((1, 4, 4), np.uint8)
  other_structures[0, 2, 2] = 1
  other_masks = np.zeros((4, 4, 4), bool)
  other_masks[:, 2, 2] = True
  summary, truth, sampled = calibration.over_cases(
      [(structures, np.array([0.5]), masks), (other_structures, np.array([0.0]), other_masks)])
  np.testing.assert_allclose(truth, [0.5, 0.0])
  np.testing.assert_allclose(sampled, [0.25, 1.0])
  assert summary['mae_ambiguous'] == pytest.approx(0.25)
  assert summary['max_freq_never_drawn'] == pytest.approx(1.0)


def test_deterministic_baseline_is_the_repeated_majority():
  masks = np.zeros((4, 2, 2), bool)
  masks[:2, 0, 0] = True                     # 2 of 4 -> majority (>= 0.5)
  masks[:1, 1, 1] = True                     # 1 of 4 -> not
  out = demo.deterministic_baseline(masks)
  assert out.shape == masks.shape
  assert np.all(out[:, 0, 0]) and not np.any(out[:, 1, 1])
  assert np.all(out == out[0])


def test_sampler_recommendation_is_fewest_steps_within_tolerance():
  def row(name, steps, ci):
    base = {k: 0.5 for k in ('sc', 'dmax', 'da', 'ged', 'hm_iou', 'dice_mean')}
    return {'name': name, 'steps': steps, 'ci': ci, 'seconds': 1.0, 'num_images': 2,
            'num_samples': 4, **base}
  rows = [row('ddpm1000', 1000, 0.80), row('ddpm100', 100, 0.79),
          row('ddpm50', 50, 0.70), row('ddim50', 50, 0.785), row('ddim25', 25, 0.75)]
  rec = compare_samplers.recommend(rows, 0.02)
  assert rec == {'reference': 'ddpm1000', 'recommended': 'ddim50', 'tolerance': 0.02}
  rows[-1]['ci'] = 0.781
  assert compare_samplers.recommend(rows, 0.02)['recommended'] == 'ddim25'
  assert compare_samplers.recommend(rows, 0.0)['recommended'] == 'ddpm1000'
  table = compare_samplers.markdown_table(rows, rec)
  assert table.count('\n| ') == 5 and '**ddim50**' in table
