"""settings.reconcile: what a trained checkpoint fixes beyond the network, on the data
it was trained on (the held-out splits and the preprocessing)."""

import logging
import os

from cimd_jax import settings as settings_lib


def _settings(**data):
  config = settings_lib.default_config()
  config.data.update(data)
  return settings_lib.from_config(config)


def _stored(**data):
  return settings_lib.to_dict(_settings(**data))


TRAINED = dict(name='lidc_pickle', source_dir='/data/lidc', seed=3, test_fraction=0.3,
               validation_fraction=0.1, percentile_low=1.0, mask_threshold=100)


def test_split_and_preprocessing_keys_follow_the_checkpoint_on_its_source():
  """The config file's seed/fractions/percentiles/threshold are replaced by the
  checkpoint's: otherwise 'test' would be another draw of patients, mostly trained on."""
  now = _settings(name='lidc_pickle', source_dir='/data/lidc/')   # the config's defaults
  got = settings_lib.reconcile(now, _stored(**TRAINED), set(), 'ckpt').data
  assert (got.seed, got.test_fraction, got.validation_fraction) == (3, 0.3, 0.1)
  assert (got.percentile_low, got.mask_threshold) == (1.0, 100)
  assert settings_lib.reconcile(now, _stored(**TRAINED), set(), 'ckpt').sampling == now.sampling


def test_an_explicit_other_split_is_kept_with_a_warning(caplog):
  now = _settings(name='lidc_pickle', source_dir='/data/lidc', seed=7)
  with caplog.at_level(logging.WARNING):
    got = settings_lib.reconcile(now, _stored(**TRAINED), {'data.seed'}, 'ckpt').data
  assert got.seed == 7 and got.test_fraction == 0.3          # only the override is kept
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any('--config.data.seed=7' in m and 'data.seed=3' in m and
             'may hold training cases' in m for m in warned), warned


def test_another_source_keeps_the_given_keys(tmp_path, monkeypatch):
  other = _settings(name='lidc_pickle', source_dir='/data/other', seed=0)
  assert settings_lib.reconcile(other, _stored(**TRAINED), set(), 'ckpt').data.seed == 0
  folder = _settings(name='folder', source_dir='/data/lidc', seed=0)
  assert settings_lib.reconcile(folder, _stored(**TRAINED), set(), 'ckpt').data.seed == 0
  # The same folder by a relative path is the same source.
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'lidc').mkdir()
  relative = _settings(name='lidc_pickle', source_dir='lidc', seed=0)
  trained = dict(TRAINED, source_dir=str(tmp_path / 'lidc'))
  assert settings_lib.reconcile(relative, _stored(**trained), set(), 'ckpt').data.seed == 3


def test_an_input_folder_is_read_with_the_checkpoints_preprocessing(caplog):
  """Sampling an unlabelled input folder with a config that names no data source (or
  another): percentiles and resize come from the checkpoint on any source, since the
  network saw images made so; the split keys do not (no split is read); an explicit
  other value is kept with a warning."""
  trained = dict(TRAINED, name='folder', percentile_low=2.0, percentile_high=98.0,
                 resize=True)
  now = _settings(name='synthetic')
  got = settings_lib.reconcile(now, _stored(**trained), set(), 'ckpt', True).data
  assert (got.percentile_low, got.percentile_high, got.resize) == (2.0, 98.0, True)
  assert got.name == 'synthetic' and got.seed == now.data.seed
  plain = settings_lib.reconcile(now, _stored(**trained), set(), 'ckpt').data
  assert (plain.percentile_low, plain.resize) == (now.data.percentile_low, now.data.resize)
  with caplog.at_level(logging.WARNING):
    kept = settings_lib.reconcile(_settings(name='synthetic', percentile_high=99.0),
                                  _stored(**trained), {'data.percentile_high'}, 'ckpt',
                                  True).data
  assert (kept.percentile_low, kept.percentile_high) == (2.0, 99.0)
  assert any('--config.data.percentile_high=99.0' in r.getMessage() and
             'not read as training' in r.getMessage() for r in caplog.records)


def test_nifti_scans_are_sliced_and_stacked_as_the_checkpoints_were(caplog):
  """Sampling NIfTI scans from another folder with a NIfTI-trained checkpoint: the
  slice axis and the sequence patterns (the channel order) are the checkpoint's, not
  the sampling config's; an explicit other axis is kept with a warning; a model
  trained on another source does not impose its (unused) NIfTI keys."""
  raters = dict(num_annotators=2, nifti_rater_patterns=('*r1*', '*r2*'), image_channels=2)
  trained = dict(name='nifti', source_dir='/data/ms', nifti_axis=0,
                 nifti_image_patterns=('*t1*', '*flair*'), **raters)
  now = _settings(name='nifti', source_dir='/data/new_scans', nifti_axis=2,
                  nifti_image_patterns=('*flair*', '*t1*'), **raters)
  got = settings_lib.reconcile(now, _stored(**trained), set(), 'ckpt', True).data
  assert got.nifti_axis == 0 and tuple(got.nifti_image_patterns) == ('*t1*', '*flair*')
  with caplog.at_level(logging.WARNING):
    kept = settings_lib.reconcile(now, _stored(**trained), {'data.nifti_axis'}, 'ckpt',
                                  True).data
  assert kept.nifti_axis == 2 and tuple(kept.nifti_image_patterns) == ('*t1*', '*flair*')
  assert any('--config.data.nifti_axis=2' in r.getMessage() for r in caplog.records)
  other = settings_lib.reconcile(now, _stored(**dict(trained, name='folder')), set(),
                                 'ckpt', True).data
  assert other.nifti_axis == 2 and tuple(other.nifti_image_patterns) == ('*flair*', '*t1*')


def test_a_checkpoint_stored_before_prediction_was_a_key_is_sampled_as_eps():
  """Checkpoints written before diffusion.prediction existed trained eps prediction: a
  config that says x0 (demo.py, lidc.py) must not sample them as x0."""
  config = settings_lib.default_config()
  config.diffusion.prediction = 'x0'
  old = _stored()
  del old['diffusion']['prediction']
  now = settings_lib.from_config(config)
  assert settings_lib.reconcile(now, old, set(), 'ckpt').diffusion.prediction == 'eps'


def test_a_checkpoint_stored_before_detach_variance_keeps_training_as_it_did():
  """A checkpoint whose stored model group predates model.detach_variance was trained
  with the v gradient flowing through the UNet: a config that now sets it True must
  not switch it on when that run resumes; asking for it explicitly is refused."""
  config = settings_lib.default_config()
  config.model.detach_variance = True
  now = settings_lib.from_config(config)
  old = _stored()
  del old['model']['detach_variance']
  assert settings_lib.reconcile(now, old, set(), 'ckpt').model.detach_variance is False
  try:
    settings_lib.reconcile(now, old, {'model.detach_variance'}, 'ckpt')
  except settings_lib.ConfigError as e:
    assert 'model.detach_variance' in str(e)
  else:
    raise AssertionError('an explicit detach_variance=True on an older checkpoint was accepted')
  stored_true = _stored()
  stored_true['model']['detach_variance'] = True
  assert settings_lib.reconcile(now, stored_true, set(), 'ckpt').model.detach_variance is True
  assert 'detach_variance' not in old['model']   # the caller's dict is left as it was


def test_every_config_key_named_in_code_and_docs_exists():
  """Error messages, docs and launch scripts that tell a user to set
  `--config.group.key` (or write `group.key=value` in the docs) name keys that
  exist: a hint like --config.sampling.checkpoint_step (no such key) sends the user
  to a ConfigError. Only the docs' deliberate typo example is exempt."""
  import glob  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = settings_lib.default_config()
  groups = '|'.join(settings_lib.GROUPS)
  flag = re.compile(rf'--config\.({groups})\.([A-Za-z_][A-Za-z_0-9]*)')
  quoted = re.compile(rf'`({groups})\.([a-z_][a-z_0-9]*)=[^`]*`')   # `training.remat=True`
  code = [f for pattern in ('cimd_jax/**/*.py', 'launch/*', 'configs/*.py')
          for f in glob.glob(os.path.join(root, pattern), recursive=True)]
  docs = [os.path.join(root, 'README.md')] + [   # testing.md quotes planted bugs
      p for p in glob.glob(os.path.join(root, 'docs', '*.md')) if not p.endswith('testing.md')]
  unknown = set()
  for path in code + docs:
    with open(path, encoding='utf-8') as f:
      text = f.read()
    found = flag.findall(text) + (quoted.findall(text) if path.endswith('.md') else [])
    unknown |= {(os.path.relpath(path, root), f'{g}.{k}') for g, k in found
                if k not in config[g]}
  assert unknown == {('docs/reliability.md', 'training.batch_sise')}, sorted(unknown)


def test_every_test_named_in_the_docs_exists():
  """docs/testing.md, docs/reliability.md and the README name the test that checks each
  claim (`test_x.py::test_y`, or `::test_y` after the last file named): a renamed
  or deleted test must not leave a claim pointing at nothing."""
  import glob  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  defined = {}
  for path in glob.glob(os.path.join(root, 'tests', 'test_*.py')):
    with open(path, encoding='utf-8') as f:
      defined[os.path.basename(path)] = set(re.findall(r'^def (test_\w+)', f.read(), re.M))
  missing = set()
  for doc in [os.path.join(root, 'README.md')] + glob.glob(os.path.join(root, 'docs', '*.md')):
    with open(doc, encoding='utf-8') as f:
      text = f.read()
    current = None   # the test file named last
    for file, name in re.findall(r'(test_\w+\.py)|::(test_\w+)', text):
      if file:
        current = file
      elif current not in defined or name not in defined[current]:
        missing.add((os.path.basename(doc), current, name))
  assert not missing, sorted(missing)
