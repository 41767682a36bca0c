"""End to end on real data: one tiny model trained a few steps on the LIDC sample's
training/ through the folder builder (built once for the module), then

- `evaluate` on testing/ with N = 4 (per-image CSV, manifest, case folders), and
- docs/quickstart.md's Python block run as written on that model (its paths
  pointed at it, nothing else changed).
"""

import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from cimd_jax.apps import sampling
from tests import helpers
from tests.conftest import LIDC_SAMPLE, ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir(os.path.join(LIDC_SAMPLE, 'testing')),
                       reason=f'LIDC sample not found at {LIDC_SAMPLE}'),
]

NUM_STEPS = 3
# The run's own sampler is the quickstart's (DDIM-25); evaluate overrides it.
EVAL_SAMPLING = {'sampling__sampler': 'ddpm', 'sampling__steps': '4',
                 'sampling__num_samples': 4, 'sampling__images_per_call': 3}


def _settings(tfds_dir, **overrides):
  values = dict(data__name='folder', data__source_dir=LIDC_SAMPLE, data__image_size=128,
                data__num_annotators=4, model__channel_mult=(1, 2, 2, 2),
                model__attention_resolutions=(16,), training__num_steps=NUM_STEPS,
                training__checkpoint_every=NUM_STEPS, sampling__sampler='ddim',
                sampling__steps='ddim25')
  return helpers.settings(tfds_dir, **{**values, **overrides})


@pytest.fixture(scope='module')
def lidc_run(tmp_path_factory):
  base = tmp_path_factory.mktemp('lidc_small')
  workdir = base / 'lidc_small'
  helpers.train_mode(_settings(base / 'tfds'), workdir)
  return workdir, base / 'tfds'


def test_train_and_evaluate_on_lidc_sample(lidc_run):
  workdir, tfds_dir = lidc_run
  s = _settings(tfds_dir, **EVAL_SAMPLING)
  overrides = {name.replace('__', '.') for name in EVAL_SAMPLING}
  result = sampling.evaluate_cases(s, str(workdir), overrides)[1]

  assert result['num_images'] == 9 and result['num_samples'] == 4
  assert result['sampler'] == 'ddpm' and result['steps'] == '4'
  for key in ('sc', 'dmax', 'da', 'ci', 'ged', 'hm_iou'):
    assert np.isfinite(result['metrics'][key]['mean']), key
    assert result['metrics'][key]['count'] == 9
  out = workdir / 'eval' / 'test'
  with open(out / 'per_image.csv') as f:
    rows = list(csv.DictReader(f))
  assert sorted(r['case_id'] for r in rows) == sorted(os.listdir(os.path.join(LIDC_SAMPLE,
                                                                               'testing')))
  with open(out / 'manifest.json') as f:
    assert json.load(f)['checkpoint_step'] == NUM_STEPS
  for row in rows:
    case = out / row['case_id']
    assert sorted(os.listdir(case)) == ['mean.png', 'overview.png', 'sample_00.png',
                                        'sample_01.png', 'sample_02.png', 'sample_03.png',
                                        'std.png']
    assert np.asarray(Image.open(case / 'sample_00.png')).shape == (128, 128)


def _quickstart_snippet() -> str:
  with open(os.path.join(ROOT, 'docs', 'quickstart.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.DOTALL)
  assert len(blocks) == 1, 'docs/quickstart.md should hold one python block'
  return blocks[0]


def test_quickstart_snippet_runs(lidc_run, capsys):
  workdir, _ = lidc_run
  code = _quickstart_snippet()
  code, n1 = re.subn(r"WORKDIR = '[^']*'", f"WORKDIR = {str(workdir)!r}", code)
  code, n2 = re.subn(r"CASE = '[^']*'",
                     f"CASE = {os.path.join(LIDC_SAMPLE, 'testing', '12')!r}", code)
  assert n1 == n2 == 1
  namespace: dict = {}
  exec(compile(code, 'docs/quickstart.md', 'exec'), namespace)  # pylint: disable=exec-used
  out, scores, experts = namespace['out'], namespace['scores'], namespace['experts']
  assert out.masks.shape == (1, 16, 128, 128) and out.masks.dtype == bool
  np.testing.assert_allclose(out.frequency, out.masks.mean(1), atol=1e-6)
  assert experts.shape == (4, 128, 128)
  for key in ('ci', 'ged', 'hm_iou'):
    assert scores[key].shape == (1,) and np.isfinite(scores[key][0])
  assert namespace['ddpm'].masks.shape == (1, 4, 128, 128)
  printed = capsys.readouterr().out
  assert 'uint8 (128, 128)' in printed and '(1, 16, 128, 128) bool' in printed
