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
