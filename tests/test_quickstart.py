"""docs/quickstart.md's Python block runs as written on a model freshly trained on the
LIDC sample (a tiny one: the block's paths are pointed at it, nothing else changes)."""

import os
import re

import numpy as np
import pytest

from tests import helpers
from tests.conftest import LIDC_SAMPLE, ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir(os.path.join(LIDC_SAMPLE, 'testing')),
                       reason=f'LIDC sample not found at {LIDC_SAMPLE}'),
]


def _snippet() -> str:
  with open(os.path.join(ROOT, 'docs', 'quickstart.md')) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), re.DOTALL)
  assert len(blocks) == 1, 'docs/quickstart.md should hold one python block'
  return blocks[0]


def test_quickstart_snippet_runs(tmp_path, capsys):
  workdir = tmp_path / 'lidc_small'
  s = helpers.settings(
      tmp_path / 'tfds', data__name='folder', data__source_dir=LIDC_SAMPLE,
      data__image_size=128, data__num_annotators=4, model__channel_mult=(1, 2, 2, 2),
      model__attention_resolutions=(16,), training__num_steps=2,
      training__checkpoint_every=2, sampling__sampler='ddim', sampling__steps='ddim25')
  helpers.train_mode(s, workdir)
  code = _snippet()
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
