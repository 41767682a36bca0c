"""--mode=reproduce (the paper-style table at N = 16, 32, 100) and --mode=sanity (per-image
D_a / GED beside expert references), end to end at toy scale on an LIDC pickle written
here in the real format. Every figure is recomputed from the written sample PNGs and the
pickle's own masks with the loop reference (tests/metrics_reference.py)."""

import hashlib
import json
import os
import pickle

import numpy as np
from PIL import Image
import pytest

from cimd_jax.apps import modes
from cimd_jax.apps import published
from cimd_jax.apps import reproduce
from cimd_jax.apps import sampling
from cimd_jax.apps import sanity
from cimd_jax.evaluation import reports
from tests import helpers
from tests import metrics_reference

SIZE = 16
NUM_EXPERTS = 4


def _disc(size, cy, cx, r):
  yy, xx = np.mgrid[:size, :size]
  return ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r


def _records(num_patients=5, slices=2, seed=0):
  """key -> record of the LIDC pickle format: a bright blob, and four experts who
  outline it with different radii (one misses it on some slices): real disagreement."""
  rng = np.random.default_rng(seed)
  table = {}
  for p in range(num_patients):
    for s in range(slices):
      cy, cx = rng.integers(5, SIZE - 5, 2)
      image = 0.2 + 0.1 * rng.random((SIZE, SIZE))
      image[_disc(SIZE, cy, cx, 3)] += 0.6
      radii = (2, 3, 4, 0 if (p + s) % 2 else 3)
      masks = [(_disc(SIZE, cy, cx, r) if r else np.zeros((SIZE, SIZE), bool)
                ).astype(np.float32) for r in radii]
      table[f'LIDC-{p:02d}_s{s}'] = {'image': image.astype(np.float32), 'masks': masks,
                                     'series_uid': f'1.2.840.{p}'}
  return table


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(settings, workdir, pickle table, reproduce.json content): trained and reproduced once."""
  base = tmp_path_factory.mktemp('reproduce')
  table = _records()
  os.makedirs(base / 'src')
  with open(base / 'src' / 'lidc.pickle', 'wb') as f:
    pickle.dump(table, f, protocol=4)
  s = helpers.settings(base / 'tfds', data__name='lidc_pickle',
                       data__source_dir=str(base / 'src'), data__image_size=SIZE,
                       data__num_annotators=NUM_EXPERTS, data__test_fraction=0.4,
                       sampling__max_batch=100, sampling__images_per_call=2)
  workdir = str(base / 'work')
  report = modes.run('reproduce', s, workdir, set())
  return s, workdir, table, report


def _read_masks(folder, n=None):
  names = sorted(f for f in os.listdir(folder) if f.startswith('sample_'))
  return np.stack([np.asarray(Image.open(os.path.join(folder, f))) > 127
                   for f in names[:n]])


def _experts(table, case_id):
  return np.stack([np.asarray(m) > 0.5 for m in table[case_id]['masks']])


def test_reproduce_scores_the_first_n_of_the_written_masks(trained):
  _, workdir, table, report = trained
  eval_dir = os.path.join(workdir, 'eval', 'test-n100')
  with open(os.path.join(eval_dir, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['complete'] and manifest['num_samples'] == 100
  cases = manifest['cases']
  assert len(cases) == report['num_images'] >= 2
  with open(os.path.join(workdir, 'report', 'reproduce.json')) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  for n in reproduce.SAMPLE_COUNTS:
    masks = {cid: _read_masks(os.path.join(eval_dir, folder), n)
             for cid, folder in cases.items()}
    assert all(len(m) == n for m in masks.values())
    ref = [metrics_reference.evaluate_one(_experts(table, cid), m) for cid, m in masks.items()]
    got = report['scores'][str(n)]
    for key in ('ged', 'hm_iou', 'ci', 'sc', 'dmax', 'da'):
      values = np.array([r[key] for r in ref])
      assert got[key]['count'] == len(values)
      np.testing.assert_allclose(got[key]['mean'], values.mean(), atol=1e-6,
                                 err_msg=f'N={n} {key}')
      np.testing.assert_allclose(got[key]['sem'], values.std(ddof=1) / np.sqrt(len(values)),
                                 atol=1e-6, err_msg=f'N={n} {key} standard error')


def test_reproduce_table_has_every_n_and_says_what_is_published(trained):
  _, workdir, _, report = trained
  with open(os.path.join(workdir, 'report', 'reproduce.md')) as f:
    table = f.read()
  for n in reproduce.SAMPLE_COUNTS:
    ged = report['scores'][str(n)]['ged']
    assert f'| cimd_jax (this run) | {n} | {ged["mean"]:.3f} ± {ged["sem"]:.3f} |' in table
  assert ('none transcribed' in table) == (not published.LIDC)
  # The sampler as configured (was 'ddim ddim25 steps'): sampler and sampling.steps.
  assert f"{report['sampler']}, sampling.steps='{report['steps']}'" in table
  with open(os.path.join(report['masks'], 'metrics.json')) as f:   # what ablations reuse reads
    assert json.load(f)['format'] == reports.METRICS_FORMAT
  rows = (published.Row('Method X', 16, {'ged': 0.25, 'hm_iou': 0.5}, 'Paper, Table 1'),)
  text = reproduce.markdown({16: report['scores']['16']}, 3, 'test', 'desc', rows)
  assert '| Method X | 16 | 0.250 | 0.500 | — | — | — | — | Paper, Table 1 |' in text
  assert 'none transcribed' not in text
  for bad in (published.Row('Method Y', 16, {'hmiou': 0.5}, 'misspelt key'),
              published.Row('Method Z', 20, {'ged': 0.2}, 'an N the table has not')):
    with pytest.raises(ValueError, match=f'published row {bad.method!r}'):
      reproduce.markdown({16: report['scores']['16']}, 3, 'test', 'desc', (bad,))


def test_score_subsets_refuses_too_few_masks(trained):
  _, _, table, _ = trained
  case = type('C', (), {'experts': _experts(table, next(iter(table)))})()
  with pytest.raises(ValueError, match='need 32 masks'):
    reproduce.score_subsets([(case, np.zeros((16, SIZE, SIZE), bool))], (16, 32))


def test_sanity_scores_model_and_expert_references(trained):
  s, workdir, table, _ = trained
  report = modes.run('sanity', s, workdir, set())
  n = s.sampling.num_samples
  for split in sanity.SPLITS:
    with open(os.path.join(workdir, 'eval', f'sanity-{split}', 'manifest.json')) as f:
      cases = json.load(f)['cases']
    assert list(cases) == report[split]['case_ids']
    for i, (cid, folder) in enumerate(cases.items()):
      experts = _experts(table, cid)
      model = metrics_reference.evaluate_one(
          experts, _read_masks(os.path.join(workdir, 'eval', f'sanity-{split}', folder)))
      one = metrics_reference.evaluate_one(experts, np.repeat(experts[:1], n, 0))
      for key in sanity.KEYS:
        np.testing.assert_allclose(report[split]['model'][key][i], model[key], atol=1e-6)
        np.testing.assert_allclose(report[split]['one_expert'][key][i], one[key], atol=1e-6)
      # One repeated mask has no spread: D_a = 1 - (V_max + V_min) / 2 of the experts.
      v_min, v_max = metrics_reference.variance_range(experts)
      np.testing.assert_allclose(report[split]['one_expert']['da'][i],
                                 1 - (v_max + v_min) / 2, atol=1e-6)
    for ref in ('one_expert', 'expert_draws'):   # model - reference, paired per image
      for key in sanity.KEYS:
        diff = np.subtract(report[split]['model'][key], report[split][ref][key])
        got = report[split]['paired'][ref][key]
        assert got['count'] == len(diff) and got['model_better'] == int(
            np.sum(diff < 0 if key == 'ged' else diff > 0))
        np.testing.assert_allclose(got['mean'], diff.mean(), atol=1e-9)
        np.testing.assert_allclose(got['sem'], diff.std(ddof=1) / np.sqrt(len(diff)),
                                   atol=1e-9)
  with open(os.path.join(workdir, 'report', 'sanity.md')) as f:
    text = f.read()
  assert "Split 'train'" in text and "Split 'test'" in text
  ged = report['test']['paired']['expert_draws']['ged']
  assert ('| model − expert_draws | ' in text and f'{ged["mean"]:+.3f} ± {ged["sem"]:.3f} '
          f'({ged["model_better"]}/{ged["count"]})' in text)
  assert text.count('\n| LIDC-') == len(report['train']['case_ids'])


def test_expert_draws_are_uniform_over_the_experts(monkeypatch):
  experts = np.zeros((4, 1, 4), bool)
  for k in range(4):
    experts[k, 0, k] = True          # expert k marks pixel k only
  monkeypatch.setattr(np.random, 'default_rng', None)   # no NumPy generator involved
  draws = sanity.expert_draws(experts, 4000, 0, 'train:LIDC-00_s0')
  assert draws.shape == (4000, 1, 4)
  assert (draws.sum(axis=(1, 2)) == 1).all()       # every draw is one expert's mask
  freq = draws[:, 0, :].mean(0)
  np.testing.assert_allclose(freq, 0.25, atol=0.03)  # 6 standard errors of 1/4 at 4000
  # The documented rule: draw k is expert int(sha256('expert_draws:<key>:<k>'), 16) mod 4.
  picks = draws[:, 0, :].argmax(1)
  for k in (0, 1, 2, 3999):
    digest = hashlib.sha256(f'expert_draws:0:train:LIDC-00_s0:{k}'.encode()).hexdigest()
    assert picks[k] == int(digest, 16) % 4
  other = sanity.expert_draws(experts, 4000, 0, 'test:LIDC-00_s0')[:, 0, :].argmax(1)
  assert np.mean(other == picks) < 0.3              # another split draws independently


def test_a_stopped_training_is_not_evaluated(trained, tmp_path):
  s = trained[0]
  workdir = tmp_path / 'stopped'
  assert modes.run('reproduce', s, str(workdir), set(), should_stop=lambda step: True) is None
  assert os.listdir(workdir / 'checkpoints')          # it saved where it stopped ...
  assert not os.path.exists(workdir / 'eval')          # ... and drew nothing
  assert not os.path.exists(workdir / 'report')


def test_demo_mode_reports_and_a_stopped_demo_evaluates_nothing(tmp_path):
  """--mode=demo (the README's main job) on the tiny config: a stop request during
  training ends it with nothing evaluated; the same command then resumes and writes
  the report, whose model row is the evaluation's own metrics.json."""
  s = helpers.settings(tmp_path / 'tfds')
  workdir = tmp_path / 'demo'
  assert modes.run('demo', s, str(workdir), set(), should_stop=lambda step: True) == {}
  assert not os.path.exists(workdir / 'eval') and not os.path.exists(workdir / 'report')
  report = modes.run('demo', s, str(workdir), set())
  assert report['checkpoint_step'] == s.training.num_steps
  with open(workdir / 'eval' / 'test' / 'metrics.json') as f:
    evaluated = json.load(f)
  assert report['model'] == evaluated['metrics']
  with open(workdir / 'report' / 'metrics.json') as f:
    assert json.load(f)['num_images'] == evaluated['num_images'] == s.data.synthetic_num_test


def test_the_table_reads_the_published_rows_at_the_call(monkeypatch):
  """The markdown table and the JSON report list the same published rows: the table's
  default was bound when the module was imported, so rows set later (a user adding a
  transcription) reached the JSON only."""
  row = published.Row('Method X', 16, {'ged': 0.25}, 'Paper, Table 1')
  monkeypatch.setattr(published, 'LIDC', (row,))
  stats = {k: {'mean': 0.5, 'sem': 0.01} for k, _ in reproduce.COLUMNS}
  table = reproduce.markdown({16: stats}, 3, 'test', 'desc')
  assert '| Method X | 16 |' in table and 'Paper, Table 1' in table


def test_a_report_run_that_fails_leaves_no_earlier_report(tmp_path, monkeypatch):
  """sanity and reproduce remove their earlier report when they start: a run that
  fails half-way (here: sampling raises) left the earlier report/<name>.md beside the
  new masks, looking like this run's."""
  def failing(*args, **kwargs):
    raise RuntimeError('sampling failed')
  monkeypatch.setattr(sampling, 'evaluate_cases', failing)
  s = helpers.settings()
  for name, module in (('sanity', sanity), ('reproduce', reproduce)):
    reports.write_report(str(tmp_path), name, 'an earlier table', {'earlier': True})
    with pytest.raises(RuntimeError, match='sampling failed'):
      module.run(s, str(tmp_path), set())
    for ext in ('md', 'json'):
      assert not os.path.exists(tmp_path / 'report' / f'{name}.{ext}'), (name, ext)
