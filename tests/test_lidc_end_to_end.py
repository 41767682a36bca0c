"""End to end on real data: train a few steps of a tiny model on the LIDC sample's
training/ through the folder builder, evaluate on testing/ with N = 4."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from cimd_jax.apps import sampling
from tests import helpers
from tests.conftest import LIDC_SAMPLE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir(LIDC_SAMPLE),
                       reason=f'LIDC sample not found at {LIDC_SAMPLE}'),
]


def test_train_and_evaluate_on_lidc_sample(tmp_path):
  s = helpers.settings(
      tmp_path / 'tfds', data__name='folder', data__source_dir=LIDC_SAMPLE,
      data__image_size=128, data__num_annotators=4, model__channel_mult=(1, 2, 2),
      model__attention_resolutions=(32,), training__num_steps=3,
      training__checkpoint_every=3, sampling__steps='4', sampling__num_samples=4,
      sampling__images_per_call=3)
  workdir = tmp_path / 'run'
  helpers.train_mode(s, workdir)
  result = sampling.evaluate_cases(s, str(workdir), set())[1]

  assert result['num_images'] == 9 and result['num_samples'] == 4
  for key in ('sc', 'dmax', 'da', 'ci', 'ged', 'hm_iou'):
    assert np.isfinite(result['metrics'][key]['mean']), key
    assert result['metrics'][key]['count'] == 9
  out = workdir / 'eval' / 'test'
  with open(out / 'per_image.csv') as f:
    rows = list(csv.DictReader(f))
  assert sorted(r['case_id'] for r in rows) == sorted(os.listdir(os.path.join(LIDC_SAMPLE,
                                                                               'testing')))
  with open(out / 'manifest.json') as f:
    assert json.load(f)['checkpoint_step'] == 3
  for row in rows:
    case = out / row['case_id']
    assert sorted(os.listdir(case)) == ['mean.png', 'overview.png', 'sample_00.png',
                                        'sample_01.png', 'sample_02.png', 'sample_03.png',
                                        'std.png']
    assert np.asarray(Image.open(case / 'sample_00.png')).shape == (128, 128)
