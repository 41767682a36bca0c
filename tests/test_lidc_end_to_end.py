"""End to end on real data: train a few steps of a tiny model on the LIDC sample's
training/ through the folder builder, evaluate on testing/ with N = 4."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from cimd_jax import run_modes
from tests.conftest import LIDC_SAMPLE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir(LIDC_SAMPLE),
                       reason=f'LIDC sample not found at {LIDC_SAMPLE}'),
]


def test_train_and_evaluate_on_lidc_sample(tmp_path):
  config = test_config.get_config()
  config.data.name = 'folder'
  config.data.source_dir = LIDC_SAMPLE
  config.data.image_size = 128
  config.data.num_annotators = 4
  config.data.tfds_dir = str(tmp_path / 'tfds')
  config.model.channel_mult = (1, 2, 2)
  config.model.attention_resolutions = (32,)
  config.training.num_steps = 3
  config.training.checkpoint_every = 3
  config.sampling.steps = '4'
  config.eval.num_samples = 4
  config.eval.batch_images = 3
  workdir = tmp_path / 'run'
  run_modes.train(config, str(workdir))
  result = run_modes.evaluate(config, str(workdir))

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
