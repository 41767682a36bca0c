"""--mode=sample / --mode=evaluate on a tiny trained model: files, metrics, bad input."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from cimd_jax import from_config
from cimd_jax import metrics
from cimd_jax import run_modes
from cimd_jax import sample


def _config(tfds_dir, **sampling):
  config = test_config.get_config()
  config.data.tfds_dir = str(tfds_dir)
  config.training.num_steps = 2
  config.training.checkpoint_every = 2
  for k, v in sampling.items():
    config.sampling[k] = v
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp('sample')
  tfds_dir = base / 'tfds'
  workdir = base / 'run'
  run_modes.train(_config(tfds_dir), str(workdir))
  return workdir, tfds_dir


def test_sample_split_writes_pngs_and_manifest(trained, tmp_path):
  workdir, tfds_dir = trained
  config = _config(tfds_dir, output_dir=str(tmp_path / 'out'), num_samples=3)
  out = run_modes.sample_mode(config, str(workdir))
  cases = sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
  assert len(cases) == config.data.synthetic_num_test
  size = config.data.image_size
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
  assert manifest['config']['model.num_channels'] == config.model.num_channels


def test_same_seed_same_masks_and_samples_differ(trained, tmp_path):
  workdir, tfds_dir = trained
  outs = []
  for name in ('a', 'b'):
    config = _config(tfds_dir, output_dir=str(tmp_path / name), num_samples=4)
    outs.append(run_modes.sample_mode(config, str(workdir)))
  case = sorted(d for d in os.listdir(outs[0]) if os.path.isdir(os.path.join(outs[0], d)))[0]
  a = sample.read_case_masks(os.path.join(outs[0], case), 4)
  b = sample.read_case_masks(os.path.join(outs[1], case), 4)
  np.testing.assert_array_equal(a, b)


def test_evaluate_metrics_match_written_pngs(trained, tmp_path):
  workdir, tfds_dir = trained
  config = _config(tfds_dir, output_dir=str(tmp_path / 'eval'))
  result = run_modes.evaluate(config, str(workdir))
  out = tmp_path / 'eval'
  for k in ('sc', 'dmax', 'da', 'ci', 'ged', 'hm_iou'):
    assert np.isfinite(result['metrics'][k]['mean'])
    assert result['metrics'][k]['count'] == config.data.synthetic_num_test
  assert result['num_samples'] == config.eval.num_samples
  with open(out / 'per_image.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == config.data.synthetic_num_test
  # Recompute from the written PNGs and the dataset's experts.
  setup = from_config.sample_setup(config, 'evaluate')
  cases = sample._dataset_cases(setup, str(workdir), 'test')  # pylint: disable=protected-access
  gts = np.stack([c.experts for c in cases])
  preds = np.stack([sample.read_case_masks(str(out / sample._safe_name(c.case_id)),  # pylint: disable=protected-access
                                           config.eval.num_samples) for c in cases])
  per_image = metrics.evaluate(gts, preds)
  for k in ('sc', 'dmax', 'da', 'ci', 'ged', 'hm_iou'):
    np.testing.assert_allclose(np.mean(per_image[k]), result['metrics'][k]['mean'],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([float(r[k]) for r in rows], per_image[k], atol=1e-6)


def test_input_dir_and_bad_images(trained, tmp_path):
  workdir, tfds_dir = trained
  size = test_config.get_config().data.image_size
  folder = tmp_path / 'inputs'
  folder.mkdir()
  Image.fromarray(np.full((size, size), 128, np.uint8)).save(folder / 'good.png')
  (folder / 'broken.png').write_bytes(b'not a png at all')
  config = _config(tfds_dir, input_dir=str(folder), output_dir=str(tmp_path / 'o1'))
  with pytest.raises(ValueError, match='broken.png'):
    run_modes.sample_mode(config, str(workdir))
  assert not os.path.exists(tmp_path / 'o1' / 'good')
  config = _config(tfds_dir, input_dir=str(folder), output_dir=str(tmp_path / 'o2'),
                   skip_bad_inputs=True, num_samples=2)
  out = run_modes.sample_mode(config, str(workdir))
  assert os.path.exists(os.path.join(out, 'good', 'sample_01.png'))
  assert not os.path.exists(os.path.join(out, 'broken'))
  with open(os.path.join(out, 'manifest.json')) as f:
    manifest = json.load(f)
  assert len(manifest['skipped']) == 1 and 'broken.png' in manifest['skipped'][0]
  # Wrong size is named too.
  Image.fromarray(np.zeros((size + 3, size), np.uint8)).save(folder / 'big.png')
  (folder / 'broken.png').unlink()
  config = _config(tfds_dir, input_dir=str(folder), output_dir=str(tmp_path / 'o3'))
  with pytest.raises(ValueError, match=r'big.png.*expected'):
    run_modes.sample_mode(config, str(workdir))


def test_no_checkpoint_names_the_folder(tmp_path):
  config = _config(tmp_path / 'tfds')
  (tmp_path / 'empty' / 'something').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r'No checkpoint in .*checkpoints.*something'):
    run_modes.sample_mode(config, str(tmp_path / 'empty'))


def test_mismatched_checkpoint_names_parameter_and_shapes(trained, tmp_path):
  workdir, tfds_dir = trained
  config = _config(tfds_dir, output_dir=str(tmp_path / 'x'))
  config.model.num_channels = 16
  with pytest.raises(sample.CheckpointMismatchError, match=r"parameter .* shape \(.*\) in the checkpoint but \(.*\) in the config"):
    run_modes.sample_mode(config, str(workdir))
