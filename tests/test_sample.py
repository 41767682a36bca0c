"""--mode=sample / --mode=evaluate on a tiny trained model: files, metrics, bad input,
checkpoint checks."""

import csv
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from cimd_jax import metrics
from cimd_jax.apps import sample_inputs
from cimd_jax.apps import sampling
from cimd_jax.evaluation import reports
from cimd_jax.utils.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError
from tests import helpers


def _settings(tfds_dir, **sampling_keys):
  return helpers.settings(tfds_dir, training__num_steps=2, training__checkpoint_every=2,
                          **{f'sampling__{k}': v for k, v in sampling_keys.items()})


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp('sample')
  tfds_dir = base / 'tfds'
  workdir = base / 'run'
  helpers.train_mode(_settings(tfds_dir), workdir)
  return workdir, tfds_dir


def test_sample_split_writes_pngs_and_manifest(trained, tmp_path):
  workdir, tfds_dir = trained
  s = _settings(tfds_dir, output_dir=str(tmp_path / 'out'), num_samples=3)
  out = sampling.run_sample(s, str(workdir), set())
  cases = sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
  assert len(cases) == s.data.synthetic_num_test
  size = s.data.image_size
  for case in cases:
    files = sorted(os.listdir(os.path.join(out, case)))
    assert files == ['mean.png', 'overview.png', 'sample_00.png', 'sample_01.png',
                     'sample_02.png', 'std.png']
    for name in ('sample_00.png', 'mean.png', 'std.png'):
      img = np.asarray(Image.open(os.path.join(out, case, name)))
      assert img.shape == (size, size) and img.dtype == np.uint8
    values = np.unique(np.asarray(Image.open(os.path.join(out, case, 'sample_01.png'))))
    assert set(values.tolist()) <= {0, 255}
  with open(os.path.join(out, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['checkpoint_step'] == 2 and manifest['num_samples'] == 3
  assert manifest['steps'] == '10' and manifest['sampler'] == 'ddpm'
  assert manifest['complete'] is True
  assert manifest['config']['model']['num_channels'] == s.model.num_channels
  assert sorted(manifest['cases'].values()) == cases


def test_same_seed_same_masks_and_samples_differ(trained, tmp_path):
  workdir, tfds_dir = trained
  outs = []
  for name in ('a', 'b'):
    s = _settings(tfds_dir, output_dir=str(tmp_path / name), num_samples=4)
    outs.append(sampling.run_sample(s, str(workdir), set()))
  case = sorted(d for d in os.listdir(outs[0]) if os.path.isdir(os.path.join(outs[0], d)))[0]
  a = reports.read_case_masks(os.path.join(outs[0], case))
  b = reports.read_case_masks(os.path.join(outs[1], case))
  assert a.shape[0] == 4
  np.testing.assert_array_equal(a, b)


def test_evaluate_metrics_match_written_pngs(trained, tmp_path):
  workdir, tfds_dir = trained
  s = _settings(tfds_dir, output_dir=str(tmp_path / 'eval'))
  _, result, out = sampling.evaluate_cases(s, str(workdir), set())
  for k in ('sc', 'dmax', 'da', 'ci', 'ged', 'hm_iou'):
    assert np.isfinite(result['metrics'][k]['mean'])
    assert result['metrics'][k]['count'] == s.data.synthetic_num_test
  assert result['num_samples'] == s.sampling.num_samples
  with open(os.path.join(out, 'per_image.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == s.data.synthetic_num_test
  # Recompute from the written PNGs and the dataset's experts.
  cases = sample_inputs.dataset_cases(s, str(workdir))
  gts = np.stack([c.experts for c in cases])
  preds = np.stack([reports.read_case_masks(os.path.join(out, row['folder'])) for row in rows])
  assert [r['case_id'] for r in rows] == [c.case_id for c in cases]
  per_image = metrics.evaluate(gts, preds)
  for k in ('sc', 'dmax', 'da', 'ci', 'ged', 'hm_iou'):
    np.testing.assert_allclose(np.mean(per_image[k]), result['metrics'][k]['mean'],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([float(r[k]) for r in rows], per_image[k], atol=1e-6)


def test_input_dir_and_bad_images(trained, tmp_path):
  workdir, tfds_dir = trained
  size = helpers.config().data.image_size
  folder = tmp_path / 'inputs'
  folder.mkdir()
  Image.fromarray(np.full((size, size), 128, np.uint8)).save(folder / 'good.png')
  (folder / 'broken.png').write_bytes(b'not a png at all')
  s = _settings(tfds_dir, input_dir=str(folder), output_dir=str(tmp_path / 'o1'))
  with pytest.raises(ValueError, match='broken.png'):
    sampling.run_sample(s, str(workdir), set())
  assert not os.path.exists(tmp_path / 'o1')
  s = _settings(tfds_dir, input_dir=str(folder), output_dir=str(tmp_path / 'o2'),
                skip_bad_inputs=True, num_samples=2)
  out = sampling.run_sample(s, str(workdir), set())
  assert os.path.exists(os.path.join(out, 'good', 'sample_01.png'))
  assert not os.path.exists(os.path.join(out, 'broken'))
  with open(os.path.join(out, 'manifest.json')) as f:
    manifest = json.load(f)
  assert len(manifest['skipped']) == 1 and 'broken.png' in manifest['skipped'][0]
  # max_images counts usable images: the skipped 'broken.png' (first in order) does not
  # take the one place.
  s = _settings(tfds_dir, input_dir=str(folder), output_dir=str(tmp_path / 'o4'),
                skip_bad_inputs=True, num_samples=2, max_images=1)
  out = sampling.run_sample(s, str(workdir), set())
  assert os.path.exists(os.path.join(out, 'good', 'sample_01.png'))
  # Wrong size is named too.
  Image.fromarray(np.zeros((size + 3, size), np.uint8)).save(folder / 'big.png')
  (folder / 'broken.png').unlink()
  s = _settings(tfds_dir, input_dir=str(folder), output_dir=str(tmp_path / 'o3'))
  with pytest.raises(ValueError, match=r'big.png.*expected'):
    sampling.run_sample(s, str(workdir), set())


def test_an_input_folder_named_like_a_split_does_not_replace_its_samples(trained, tmp_path):
  """`--mode=sample` writes WORKDIR/samples/<split> or WORKDIR/samples/<input folder
  name>: an input folder called 'test' must not silently replace the test split's
  samples (nor another 'test' folder's); sampling the same source again may."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir, tfds_dir = trained
  run = tmp_path / 'run'
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns('samples', 'eval'))
  split_out = sampling.run_sample(_settings(tfds_dir, num_samples=2, max_images=2),
                                  str(run), set())
  assert split_out == str(run / 'samples' / 'test')
  before = sorted(os.listdir(split_out))
  inputs = tmp_path / 'scans' / 'test'
  inputs.mkdir(parents=True)
  size = helpers.config().data.image_size
  Image.fromarray(np.full((size, size), 90, np.uint8)).save(inputs / 'scan1.png')
  folder_run = _settings(tfds_dir, input_dir=str(inputs), num_samples=2)
  with pytest.raises(ConfigError, match=r'^sampling.output_dir \(default\) .*samples/test '
                                        r'holds the output of split:test, and this run '
                                        r'reads .*scans/test'):
    sampling.run_sample(folder_run, str(run), set())
  assert sorted(os.listdir(split_out)) == before
  again = sampling.run_sample(_settings(tfds_dir, num_samples=2, max_images=2), str(run), set())
  assert sorted(os.listdir(again)) == before
  other = sampling.run_sample(_settings(tfds_dir, input_dir=str(inputs), num_samples=2,
                                        output_dir=str(tmp_path / 'mine')), str(run), set())
  assert 'scan1' in os.listdir(other)


def test_input_folder_sampling_uses_the_checkpoints_preprocessing(trained, tmp_path):
  """A sampling config naming another data source with other percentiles: an input
  folder is read with the checkpoint's (the trained run's) percentiles; sampling a
  split keeps the config's (it reads that source's own records)."""
  workdir, tfds_dir = trained
  (tmp_path / 'in').mkdir()
  other = helpers.settings(tfds_dir, data__name='folder', data__source_dir=str(tmp_path),
                           data__percentile_low=5.0, sampling__input_dir=str(tmp_path / 'in'))
  stored = helpers.settings(tfds_dir).data.percentile_low
  assert stored != 5.0
  prepared = sampling.prepare(other, str(workdir), set())
  assert prepared.settings.data.percentile_low == stored
  # The source it was trained on (which decides whether wide input files are read).
  assert prepared.trained_on == helpers.settings(tfds_dir).data.name != 'folder'
  split = helpers.settings(tfds_dir, data__name='folder', data__source_dir=str(tmp_path),
                           data__percentile_low=5.0)
  assert sampling.prepare(split, str(workdir), set()).settings.data.percentile_low == 5.0


def test_no_checkpoint_names_the_folder(tmp_path):
  s = _settings(tmp_path / 'tfds')
  (tmp_path / 'empty' / 'something').mkdir(parents=True)
  with pytest.raises(CheckpointNotFoundError, match=r'No checkpoint in .*checkpoints.*something'):
    sampling.run_sample(s, str(tmp_path / 'empty'), set())


def test_checkpoint_config_wins_and_explicit_contradictions_are_refused(trained, tmp_path):
  workdir, tfds_dir = trained
  # A config file that says another width: the checkpoint's width is used.
  s = _settings(tfds_dir, output_dir=str(tmp_path / 'x'), num_samples=2)
  wide = helpers.settings(tfds_dir, model__num_channels=16, sampling__num_samples=2,
                          sampling__output_dir=str(tmp_path / 'x'))
  out = sampling.run_sample(wide, str(workdir), set())
  with open(os.path.join(out, 'manifest.json')) as f:
    assert json.load(f)['config']['model']['num_channels'] == s.model.num_channels
  # The same width given on the command line is refused, naming the key and both values.
  with pytest.raises(ConfigError, match=r'model.num_channels=16 contradicts .* '
                                        r'model.num_channels=8'):
    sampling.run_sample(wide, str(workdir), {'model.num_channels'})
  # So is another T; sampling keys may change.
  long_t = helpers.settings(tfds_dir, diffusion__num_timesteps=1000)
  with pytest.raises(ConfigError, match='diffusion.num_timesteps'):
    sampling.run_sample(long_t, str(workdir), {'diffusion.num_timesteps'})


def test_parameters_that_do_not_fit_are_named(trained):
  from cimd_jax.inference import restore  # pylint: disable=g-import-not-at-top
  from cimd_jax.models import build  # pylint: disable=g-import-not-at-top
  workdir, _ = trained
  s = helpers.settings(model__num_channels=16)
  expected = build.unet_param_shapes(s.model, 16, 1)
  with pytest.raises(CheckpointMismatchError,
                     match=r"parameter .* shape \(.*\) in the checkpoint but \(.*\) in the config"):
    restore.restore_unet(str(workdir), 'latest', True, expected)


def test_score_counts_all_foreground_samples():
  """`all_foreground` is, per image, the fraction of samples with every pixel set:
  image 0 has 2 of 4 (a sample with one pixel off does not count), image 1 none."""
  import types   # pylint: disable=g-import-not-at-top
  experts = np.zeros((3, 8, 8), bool)
  experts[:, 2:5, 2:5] = True
  full, almost = np.ones((8, 8), bool), np.ones((8, 8), bool)
  almost[7, 7] = False
  masks0 = np.stack([full, almost, full, experts[0]])
  masks1 = np.stack([almost, experts[0], experts[1], ~full])
  results = [(types.SimpleNamespace(experts=experts), masks0),
             (types.SimpleNamespace(experts=experts), masks1)]
  got = sampling.score(results)
  np.testing.assert_allclose(got['all_foreground'], [0.5, 0.0])
  assert set(sampling.SCORE_KEYS) < set(got)


def test_an_output_dir_that_would_delete_the_workdir_is_refused(trained):
  """sampling.output_dir = the workdir (or a folder above it): a one-line ConfigError
  before any sampling, and the checkpoints are still there."""
  workdir, tfds_dir = trained
  before = sorted(os.listdir(workdir))
  for out in (workdir, workdir.parent):
    s = _settings(tfds_dir, output_dir=str(out), num_samples=2)
    with pytest.raises(ConfigError, match=r'^sampling.output_dir .*which a new output '
                                          r'would delete'):
      sampling.run_sample(s, str(workdir), set())
    with pytest.raises(ConfigError, match='which a new output would delete'):
      sampling.evaluate_cases(s, str(workdir), set())
  assert sorted(os.listdir(workdir)) == before


def test_a_checkpoint_of_an_unfinished_run_is_warned_about(trained, caplog, monkeypatch):
  """warn_if_unfinished: step < the stored training.num_steps warns, a finished run
  does not; sample/evaluate check the checkpoint they restore."""
  from cimd_jax.inference import restore  # pylint: disable=g-import-not-at-top
  with caplog.at_level('WARNING'):
    assert restore.warn_if_unfinished(1200, {'training': {'num_steps': 5000}}, 'ckpt X')
    assert not restore.warn_if_unfinished(5000, {'training': {'num_steps': 5000}}, 'ckpt X')
    assert not restore.warn_if_unfinished(7, None, 'ckpt X')
  warned = [r.getMessage() for r in caplog.records if r.levelno >= 30]
  assert warned == ['ckpt X: step 1200 of a run configured for 5000 steps '
                    '(training.num_steps); the model has not finished training']
  workdir, tfds_dir = trained
  calls = []
  monkeypatch.setattr(restore, 'warn_if_unfinished', lambda *a: calls.append(a[:2]))
  sampling.prepare(_settings(tfds_dir), str(workdir), set())
  assert calls == [(2, calls[0][1])] and calls[0][1]['training']['num_steps'] == 2


def test_prepare_images_reads_uint8_and_floats_and_warns_on_0_1_floats(caplog):
  """uint8 -> x / 127.5 - 1 (as training); floats in [-1, 1] pass unchanged; a float
  batch with no negative value (likely [0, 1] images) is warned about; out of range
  or non-finite is an InputError."""
  from cimd_jax.inference import model as model_lib  # pylint: disable=g-import-not-at-top
  from cimd_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  u8 = np.array([[[0, 255], [51, 204]]], np.uint8)                 # [1, 2, 2]
  got = model_lib.prepare_images(u8, 2, 3)
  assert got.shape == (1, 2, 2, 3)
  np.testing.assert_allclose(got[0, :, :, 2], u8[0] / 127.5 - 1.0, rtol=1e-6)
  signed = np.array([[[-0.5, 0.25], [1.0, -1.0]]], np.float32)
  with caplog.at_level('WARNING'):
    np.testing.assert_array_equal(model_lib.prepare_images(signed, 2, 1)[..., 0], signed)
    assert not [r for r in caplog.records if r.levelno >= 30]
    unit = np.array([[[0.0, 0.25], [1.0, 0.5]]], np.float32)
    np.testing.assert_array_equal(model_lib.prepare_images(unit, 2, 1)[..., 0], unit)
  warned = [r.getMessage() for r in caplog.records if r.levelno >= 30]
  assert len(warned) == 1 and 'lie in [0, 1]' in warned[0] and '2x - 1' in warned[0]
  caplog.clear()
  with caplog.at_level('WARNING'):   # a PHiSeg HDF5 file's raw values: half the contrast
    model_lib.prepare_images(signed, 2, 1, raw_range=(0.0, 1.0))    # not inside: fine
    assert not [r for r in caplog.records if r.levelno >= 30]
    model_lib.prepare_images(signed / 2, 2, 1, raw_range=(-0.5, 0.5))
  warned = [r.getMessage() for r in caplog.records if r.levelno >= 30]
  assert len(warned) == 1 and 'inside the range [-0.5, 0.5]' in warned[0]
  for bad in (signed * 2, np.where(signed > 0, np.nan, signed)):
    with pytest.raises(InputError, match=r'finite and in \[-1, 1\]'):
      model_lib.prepare_images(bad, 2, 1)


def test_sampler_comparison_names_rows_by_the_checkpoints_timesteps(trained):
  """A config file whose T differs from the checkpoint's: the full-T row is named and
  counted with the checkpoint's T, which is what was sampled."""
  from cimd_jax.apps import compare_samplers  # pylint: disable=g-import-not-at-top
  workdir, tfds_dir = trained
  trained_t = _settings(tfds_dir).diffusion.num_timesteps
  other = helpers.settings(tfds_dir, diffusion__num_timesteps=trained_t * 10,
                           sampling__num_samples=2, sampling__max_images=1)
  rows, rec = compare_samplers.compare(other, str(workdir), set(), candidates=(('ddpm', ''),))
  assert rows[0]['name'] == f'ddpm{trained_t}' and rows[0]['steps'] == trained_t
  assert rec['recommended'] == f'ddpm{trained_t}'


def test_every_distinct_sampling_run_has_its_own_name():
  """Runs that draw differently (other timesteps, eta, variance handling, weights) get
  different names, so their TensorBoard points and output folders never mix; the
  defaults keep their short names. DDIM over '50' (section spacing: 0, 20, 41, ...)
  and over 'ddim50' (stride 20: 0, 20, 40, ...) are different timesteps."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from cimd_jax.diffusion import schedule  # pylint: disable=g-import-not-at-top
  from cimd_jax.inference.args import SamplingArgs  # pylint: disable=g-import-not-at-top
  base = SamplingArgs()
  variants = {
      'ddim25': base,
      'ddim50': dataclasses.replace(base, steps='ddim50'),
      'ddim-sections50': dataclasses.replace(base, steps='50'),
      'ddim1000': dataclasses.replace(base, steps=''),
      'ddim25_eta0.5': dataclasses.replace(base, ddim_eta=0.5),
      'ddim25_raw': dataclasses.replace(base, use_ema=False),
      'ddpm50': dataclasses.replace(base, sampler='ddpm', steps='50'),
      'ddpm1000': dataclasses.replace(base, sampler='ddpm', steps=''),
      'ddpm50_noclip_x0_uncertainty': dataclasses.replace(
          base, sampler='ddpm', steps='50', clip_variance=False,
          variance_transfer='x0_uncertainty'),
  }
  got = {k: v.short_name(1000) for k, v in variants.items()}
  assert got == {k: k for k in variants}
  betas = schedule.get_beta_schedule('linear', 1000)
  assert not np.array_equal(variants['ddim50'].tables(betas).timestep_map,
                            variants['ddim-sections50'].tables(betas).timestep_map)


def test_evaluations_with_other_samplers_get_their_own_tensorboard_curves(trained, tmp_path):
  """Two evaluations of one checkpoint (DDPM over all T, DDIM-5) write their scalars
  under eval_test/<sampler>_n<N>/, each equal to its own metrics.json."""
  import shutil  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  workdir, tfds_dir = trained
  run = tmp_path / 'run'
  # The checkpoint without the fixture's TensorBoard files (other tests' evaluations).
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns('events.out.tfevents*'))
  means = {}
  for sampler, steps in (('ddpm', ''), ('ddim', 'ddim5')):
    s = _settings(tfds_dir, output_dir=str(tmp_path / f'eval_{sampler}'), sampler=sampler,
                  steps=steps, num_samples=2, max_images=2)
    _, result, _ = sampling.evaluate_cases(s, str(run), set())
    name = steps or f'ddpm{s.diffusion.num_timesteps}'
    means[f'eval_{s.sampling.split}/{name}_n2/ci'] = result['metrics']['ci']['mean']
  assert len(set(means.values())) == 2, means   # the two samplers drew different masks
  written = {}
  for path in glob.glob(str(run / '**' / 'events.out.tfevents*'), recursive=True):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag in means:
          written.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
  assert sorted(written) == sorted(means), (written, means)
  for tag, mean in means.items():
    assert written[tag] == [pytest.approx(mean, abs=1e-6)], (tag, written[tag], mean)
