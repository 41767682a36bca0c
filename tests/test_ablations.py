"""--mode=ablations: every (ambiguity, prediction) is trained once and evaluated with
every sampler, finished evaluations are reused, and the table carries mean +- SE and
the commands (the training and evaluation themselves are stubbed here: they are
tested elsewhere)."""

import json
import os

import numpy as np
import pytest

from cimd_jax import checkpoint
from cimd_jax import settings as settings_lib
from cimd_jax.apps import ablations
from cimd_jax.apps import modes
from cimd_jax.apps import sampling
from cimd_jax.evaluation import reports
from cimd_jax.models.build import AMBIGUITY_MODES
from cimd_jax.utils.errors import ConfigError
from tests import helpers


def _fake_result(ci, all_foreground=True):
  stats = lambda mean: {'mean': mean, 'std': 0.1, 'sem': 0.01, 'count': 64}
  metrics = {k: stats(ci) for k in ('ged', 'ci', 'da', 'hm_iou')}
  if all_foreground:
    metrics['all_foreground'] = {'mean': 0.25, 'std': 0.4, 'sem': 0.05, 'count': 64}
  return {'metrics': metrics,
          'calibration': {'mae_ambiguous': 0.09, 'mae_ambiguous_sem': 0.008,
                          'max_freq_never_drawn': 0.0},
          'num_images': 64, 'num_samples': 16, 'format': reports.METRICS_FORMAT}


def _save_step(run_dir, step):
  """What a training to `step` leaves (nothing new when that step is there already)."""
  if step not in checkpoint.complete_steps(run_dir):
    helpers.save_stand_in_checkpoint(run_dir, step)


def _recording_evaluate(evaluated):
  """A stand-in for sampling.evaluate_cases that writes what the real one writes for
  reuse (manifest with the settings and checkpoint step, metrics.json)."""
  def fake_evaluate(s, run_dir, overrides):
    del overrides
    evaluated.append((s.model.ambiguity, s.diffusion.prediction, s.sampling.sampler,
                      s.sampling.steps))
    out = s.sampling.output_dir
    os.makedirs(out, exist_ok=True)
    result = dict(_fake_result(0.5 + 0.01 * len(evaluated)),
                  steps=s.sampling.steps or str(s.diffusion.num_timesteps))
    with open(os.path.join(out, 'metrics.json'), 'w') as f:
      json.dump(result, f)
    with open(os.path.join(out, 'manifest.json'), 'w') as f:
      json.dump({'complete': True, 'config': settings_lib.to_dict(s),
                 'checkpoint_step': checkpoint.resolve_step(run_dir, 'latest')}, f)
    return [], result, out
  return fake_evaluate


def test_every_row_is_trained_once_evaluated_per_sampler_and_reused(tmp_path, monkeypatch):
  trained, evaluated = [], []

  def fake_train(s, d):
    trained.append((s.model.ambiguity, s.diffusion.prediction, d))
    _save_step(d, 2)

  monkeypatch.setattr(sampling, 'evaluate_cases', _recording_evaluate(evaluated))
  s = helpers.settings()
  table = ablations.run(s, str(tmp_path), fake_train, 'configs/test.py', ' --config.x=1')
  pairs = [(a, p) for a in AMBIGUITY_MODES for p in ('eps', 'x0')]
  assert [t[:2] for t in trained] == pairs
  assert [t[2] for t in trained] == [str(tmp_path / f'{a}-{p}') for a, p in pairs]
  assert len(evaluated) == 3 * len(pairs)
  assert {e[2:] for e in evaluated} == {('ddpm', ''), ('ddpm', '50'), ('ddim', 'ddim25')}
  rows = [l for l in table.splitlines() if l.startswith('| ') and l[2].isdigit()]
  assert len(rows) == 3 * len(pairs)
  assert '0.090 ± 0.008' in rows[0] and '0.510 ± 0.010' in rows[0]
  assert '| 0.250 ± 0.050 |' in rows[0]
  assert ('--config.model.ambiguity=frozen --config.diffusion.prediction=x0 --config.x=1 '
          '--mode=train') in table
  assert os.path.exists(tmp_path / 'ablations.md')
  # A second run reuses every finished evaluation.
  ablations.run(s, str(tmp_path), lambda s, d: None)
  assert len(evaluated) == 3 * len(pairs)
  # The full-T DDPM row is named by the model's T (50 in configs/test.py), not 1000.
  assert '| trained | eps | ddpm50 |' in table and 'ddpm1000' not in table


def test_an_evaluation_is_reused_only_for_the_same_request(tmp_path, monkeypatch):
  """Another N, sampling seed or checkpoint step than the finished evaluation's is
  evaluated again (it was reused whatever was asked, and paired with rows of another
  N); the same request is reused."""
  evaluated = []
  monkeypatch.setattr(sampling, 'evaluate_cases', _recording_evaluate(evaluated))
  one = dict(runs=('off-x0',), samplers=('ddim25',))
  train = lambda s, d: _save_step(d, 2)
  ablations.run(helpers.settings(), str(tmp_path), train, **one)
  ablations.run(helpers.settings(), str(tmp_path), train, **one)
  assert len(evaluated) == 1
  ablations.run(helpers.settings(sampling__num_samples=8), str(tmp_path), train, **one)
  assert len(evaluated) == 2
  ablations.run(helpers.settings(sampling__num_samples=8, sampling__seed=7), str(tmp_path),
                train, **one)
  assert len(evaluated) == 3
  ablations.run(helpers.settings(sampling__num_samples=8, sampling__seed=7), str(tmp_path),
                lambda s, d: _save_step(d, 4), **one)     # training went on to step 4
  assert len(evaluated) == 4
  # A metrics.json of an older scorer (standard errors with ddof = 0, no
  # all-foreground fraction) is scored again, not shown beside new rows.
  path = tmp_path / 'off-x0' / 'eval' / 'ddim25' / 'metrics.json'
  old = json.loads(path.read_text())
  del old['format']
  path.write_text(json.dumps(old))
  ablations.run(helpers.settings(sampling__num_samples=8, sampling__seed=7), str(tmp_path),
                lambda s, d: _save_step(d, 4), **one)
  assert len(evaluated) == 5


def test_selection_trains_and_evaluates_only_the_rows_named(tmp_path, monkeypatch):
  trained, evaluated = [], []

  def fake_evaluate(s, run_dir, overrides):
    evaluated.append((os.path.basename(run_dir), s.sampling.sampler, s.sampling.steps))
    # As written before evaluations counted all-foreground samples: shown as '—'.
    return [], _fake_result(0.5, all_foreground=False), s.sampling.output_dir

  monkeypatch.setattr(sampling, 'evaluate_cases', fake_evaluate)
  table = ablations.run(helpers.settings(), str(tmp_path),
                        lambda s, d: (trained.append(os.path.basename(d)), _save_step(d, 2)),
                        runs=('off-x0', 'trained-x0'), samplers=('ddim25',))
  # In the table's order (trained before off), whatever the order given.
  assert trained == ['trained-x0', 'off-x0']
  assert evaluated == [('trained-x0', 'ddim', 'ddim25'), ('off-x0', 'ddim', 'ddim25')]
  rows = [l for l in table.splitlines() if l.startswith('| ') and l[2].isdigit()]
  assert len(rows) == 2 and '| trained | x0 | ddim25 |' in rows[0]
  assert '| — |' in rows[0]


def test_a_stopped_training_ends_the_ablations_without_evaluating(tmp_path, monkeypatch):
  """A stop request during a row's training (train_fn returns False) evaluated the
  half-trained model and went on to the next rows; now nothing more runs and no table
  is written."""
  trained, evaluated = [], []
  monkeypatch.setattr(sampling, 'evaluate_cases', _recording_evaluate(evaluated))

  def stopped_train(s, d):
    trained.append(os.path.basename(d))
    _save_step(d, 1)
    return False

  result = ablations.run(helpers.settings(), str(tmp_path), stopped_train,
                         runs=('trained-x0', 'off-x0'), samplers=('ddim25',))
  assert result is None and trained == ['trained-x0'] and not evaluated
  assert not os.path.exists(tmp_path / 'ablations.md')
  # A table of an earlier, finished run is removed, not left to pass for this one.
  ablations.run(helpers.settings(), str(tmp_path), lambda s, d: _save_step(d, 2),
                runs=('off-x0',), samplers=('ddim25',))
  assert os.path.exists(tmp_path / 'ablations.md')
  assert ablations.run(helpers.settings(), str(tmp_path), stopped_train,
                       runs=('trained-x0',), samplers=('ddim25',)) is None
  assert not os.path.exists(tmp_path / 'ablations.md')


def test_ablations_mode_stops_with_its_training(tmp_path, monkeypatch):
  """Through modes.run: each row trains with train_to_end, whose False (a stop request
  ended the training) ends the mode there; it evaluated the half-trained model, then
  trained the next row."""
  evaluated, trained = [], []
  monkeypatch.setattr(sampling, 'evaluate_cases', _recording_evaluate(evaluated))

  def stopped(s, run_dir, overrides, should_stop):
    del s, overrides
    trained.append((os.path.basename(run_dir), should_stop(1)))
    _save_step(run_dir, 1)
    return False

  monkeypatch.setattr(modes, 'train_to_end', stopped)
  result = modes.run('ablations', helpers.settings(), str(tmp_path), set(),
                     should_stop=lambda step: True,
                     ablation_runs=('trained-x0', 'off-x0'), ablation_samplers=('ddim25',))
  assert result is None and trained == [('trained-x0', True)] and not evaluated


@pytest.mark.parametrize('runs,samplers,named', [
    (('off-x1',), (), "'off-x1'"), ((), ('ddim50',), "'ddim50'")])
def test_unknown_selection_is_refused_before_any_training(tmp_path, runs, samplers, named):
  trained = []
  with pytest.raises(ConfigError, match=named):
    ablations.run(helpers.settings(), str(tmp_path), lambda s, d: trained.append(d),
                  runs=runs, samplers=samplers)
  assert not trained


def _write_per_image(folder, ged, ci):
  os.makedirs(folder)
  ids = [f'case{i}' for i in range(len(ged))]
  reports.write_per_image_csv(os.path.join(folder, 'per_image.csv'), ids, ids,
                              {'ged': ged, 'ci': ci}, ('ged', 'ci'))


def test_paired_differences_against_off_image_by_image(tmp_path):
  """Mean and standard error of the per-image differences row - off, from the two
  per_image.csv files; rows without an 'off' partner get no line."""
  rng = np.random.default_rng(0)
  ged_off, ci_off = rng.uniform(0, 1, 10), rng.uniform(0, 1, 10)
  ged, ci = ged_off - 0.05 + 0.05 * rng.standard_normal(10), ci_off + 0.02
  _write_per_image(tmp_path / 'trained', ged, ci)
  _write_per_image(tmp_path / 'off', ged_off, ci_off)
  rows = [{'ambiguity': 'trained', 'prediction': 'x0', 'sampler': 'ddim25',
           'out_dir': str(tmp_path / 'trained')},
          {'ambiguity': 'trained', 'prediction': 'eps', 'sampler': 'ddim25',
           'out_dir': str(tmp_path / 'trained')},
          {'ambiguity': 'off', 'prediction': 'x0', 'sampler': 'ddim25',
           'out_dir': str(tmp_path / 'off')}]
  lines = ablations.paired_against_off(rows)
  d = ged - ged_off
  sem = np.std(d, ddof=1) / np.sqrt(10)    # standard error: sample std / sqrt(n)
  assert lines == [f'- trained − off (x0, ddim25), 10 images: ΔGED = {d.mean():+.3f} ± '
                   f'{sem:.3f}, ΔCI = +0.020 ± 0.000']


def test_paired_differences_against_trained_and_a_malformed_file(tmp_path):
  """Against `trained`: one line per other mode except `off` (its lines are those
  against off, negated); a per_image.csv without the GED column gives no line and no
  crash."""
  rng = np.random.default_rng(1)
  ged_tr, ci_tr = rng.uniform(0, 1, 8), rng.uniform(0, 1, 8)
  ged_fr = ged_tr + 0.1 + 0.02 * rng.standard_normal(8)
  _write_per_image(tmp_path / 'trained', ged_tr, ci_tr)
  _write_per_image(tmp_path / 'frozen', ged_fr, ci_tr - 0.03)
  _write_per_image(tmp_path / 'off', ged_tr, ci_tr)
  os.makedirs(tmp_path / 'target')
  with open(tmp_path / 'target' / 'per_image.csv', 'w') as f:
    f.write('case_id,ci\ncase0,0.5\n')
  rows = [{'ambiguity': m, 'prediction': 'x0', 'sampler': 'ddpm50',
           'out_dir': str(tmp_path / m)} for m in ('trained', 'frozen', 'target', 'off')]
  lines = ablations.paired_against(rows, 'trained', skip=('off',))
  d = ged_fr - ged_tr
  assert lines == [f'- frozen − trained (x0, ddpm50), 8 images: ΔGED = {d.mean():+.3f} ± '
                   f'{np.std(d) / np.sqrt(8):.3f}, ΔCI = -0.030 ± 0.000']
  # The table shows both blocks.
  for r in rows:
    r['values'] = ablations.row(_fake_result(0.5))
    r.update(num_images=8, num_samples=16, command='cmd')
  table = ablations.markdown(rows)
  assert 'Paired differences against `off`' in table
  assert 'Paired differences against `trained`' in table
  assert lines[0] in table


def test_a_row_trained_with_other_model_keys_is_refused(tmp_path, monkeypatch):
  """A row whose checkpoint was trained with another model key than the table asks for
  (here model.detach_variance, which configs/synthetic.py turned on after rows had been
  trained) is refused by name instead of being resumed with its stored keys, which would
  make its row differ from the others in more than its name; a row trained with the
  same keys trains on."""
  trained = []
  monkeypatch.setattr(modes, 'train_to_end',
                      lambda s, run_dir, overrides, should_stop: trained.append(run_dir) or False)
  asked = helpers.settings(model__detach_variance=True)
  old = helpers.settings(model__detach_variance=False, model__ambiguity='off',
                         diffusion__prediction='x0')
  helpers.save_stand_in_checkpoint(tmp_path / 'off-x0', 1, stored=old)
  with pytest.raises(ConfigError, match=r'model\.detach_variance=True \(trained with False\)'):
    modes.run('ablations', asked, str(tmp_path), set(), ablation_runs=('off-x0',),
              ablation_samplers=('ddim25',))
  assert not trained
  same = helpers.settings(model__detach_variance=False)
  assert modes.run('ablations', same, str(tmp_path), set(), ablation_runs=('off-x0',),
                   ablation_samplers=('ddim25',)) is None
  assert trained == [str(tmp_path / 'off-x0')]
