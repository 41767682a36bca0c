"""PHiSeg HDF5 and NIfTI sources end to end: files written in the real format ->
TFDS records -> two training steps -> `evaluate` (and for NIfTI `sample`, whose
masks go back into volumes with the input's shape and affine). The LIDC pickle
takes the same path in tests/test_reproduce.py."""

import json
import os

import h5py
import nibabel as nib
import numpy as np
from PIL import Image
import pytest

from cimd_jax.apps import sample_inputs
from cimd_jax.apps import sampling
from tests import helpers

SIZE = 16                       # configs/test.py's image size
SHAPE = (14, 18, 6)             # slices along z are 14 x 18: rows padded by 1 and 1,
AFFINE = np.array([[0.8, 0, 0, -12.0], [0, 1.2, 0, 30.0], [0, 0, 2.5, -4.0], [0, 0, 0, 1]])
# ... columns cropped to 1..16 (centre 16 of 18)


def _tiny(tfds_dir, **keys):
  return helpers.settings(tfds_dir, training__num_steps=2, training__checkpoint_every=2,
                          **keys)


# --------------------------------------------------------------------------- HDF5


def test_hdf5_trains_two_steps_and_evaluates_its_own_test_group(tmp_path):
  rng = np.random.default_rng(0)
  groups = {}
  with h5py.File(tmp_path / 'data_lidc.hdf5', 'w') as f:
    for name, n in (('train', 6), ('val', 2), ('test', 3)):
      images = rng.uniform(-0.5, 0.5, (n, SIZE, SIZE))            # PHiSeg: [0, 1] - 0.5
      labels = np.zeros((n, SIZE, SIZE, 3), np.uint8)   # [N, H, W, A]; A as configs/test.py
      for i in range(n):
        labels[i, 3 + i:9 + i, 4:10, 0] = 1
        labels[i, 5:12, 2 + i:8 + i, 1] = 1
        labels[i, 4:8, 4:8, 2] = 1
      g = f.create_group(name)
      g.create_dataset('images', data=images)
      g.create_dataset('labels', data=labels)
      groups[name] = labels
  s = _tiny(tmp_path / 'tfds', data__name='lidc_hdf5', data__source_dir=str(tmp_path),
            sampling__output_dir=str(tmp_path / 'eval'))
  helpers.train_mode(s, tmp_path / 'work')
  results, result, _ = sampling.evaluate_cases(s, str(tmp_path / 'work'), set())
  assert result['num_images'] == 3 and result['checkpoint_step'] == 2
  for case, masks in results:
    i = int(case.case_id.rsplit('_', 1)[1])
    assert case.case_id == f'test_{i:05d}'
    np.testing.assert_array_equal(case.experts, groups['test'][i].transpose(2, 0, 1) > 0)
    assert masks.shape == (s.sampling.num_samples, SIZE, SIZE)
  assert all(np.isfinite(v['mean']) for v in result['metrics'].values())


# --------------------------------------------------------------------------- NIfTI


def _volumes(seed):
  """Two sequences (int16, float32) and two raters (uint8, float32 0/1) of one case;
  the raters mark slices z = 1 + seed % 3 .. +2, inside the 16 x 16 crop."""
  rng = np.random.default_rng(seed)
  z = 1 + seed % 3
  r1, r2 = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.float32)
  r1[4:10, 5:12, z:z + 2] = 1
  r2[5:11, 6:14, z + 1:z + 3] = 1.0
  return {'flair': rng.integers(0, 2000, SHAPE).astype(np.int16),
          't1': rng.normal(0, 50, SHAPE).astype(np.float32), 'r1': r1, 'r2': r2}


@pytest.fixture(scope='module')
def nifti_run(tmp_path_factory):
  """(settings maker, workdir, source root, case -> volumes), trained two steps."""
  base = tmp_path_factory.mktemp('nifti_e2e')
  vols = {}
  for sub, cases in (('training', ('p1', 'p2', 'p3')), ('testing', ('p4', 'p5'))):
    for case in cases:
      vols[case] = _volumes(int(case[1:]))
      os.makedirs(base / 'src' / sub / case)
      for kind, vol in vols[case].items():
        nib.save(nib.Nifti1Image(vol, AFFINE),
                 str(base / 'src' / sub / case / f'{case}_{kind}.nii.gz'))
  def make(**keys):
    return _tiny(base / 'tfds', data__name='nifti', data__source_dir=str(base / 'src'),
                 data__image_channels=2, data__num_annotators=2, data__nifti_axis=2,
                 data__nifti_image_patterns=('*flair*', '*t1*'),
                 data__nifti_rater_patterns=('*_r1*', '*_r2*'), **keys)
  helpers.train_mode(make(), base / 'work')
  return make, str(base / 'work'), str(base / 'src'), vols


def _marked_slices(v):
  """The z indices any rater marked: the slices a split keeps (nifti_empty_fraction 0)."""
  return sorted({int(z) for z in np.nonzero((v['r1'] > 0) | (v['r2'] > 0.5))[2]})


def test_nifti_trains_two_steps_and_evaluates_the_marked_test_slices(nifti_run, tmp_path):
  make, workdir, _, vols = nifti_run
  s = make(sampling__output_dir=str(tmp_path / 'eval'))
  results, result, out = sampling.evaluate_cases(s, workdir, set())
  want = [f'{c}_z{z}' for c in ('p4', 'p5') for z in _marked_slices(vols[c])]
  assert sorted(c.case_id for c, _ in results) == sorted(want)
  for case, _ in results:
    name, z = case.case_id.split('_z')
    v = vols[name]
    raters = np.stack([v['r1'][:, :, int(z)] > 0, v['r2'][:, :, int(z)] > 0.5])
    padded = np.pad(raters, ((0, 0), (1, 1), (0, 0)))[:, :, 1:17]     # 14 x 18 -> 16 x 16
    np.testing.assert_array_equal(case.experts, padded)
  assert all(np.isfinite(v['mean']) for v in result['metrics'].values())
  with open(os.path.join(out, 'manifest.json')) as f:
    assert sorted(json.load(f)['nifti_volumes']) == ['p4', 'p5']


def test_nifti_sample_writes_volumes_with_the_inputs_shape_and_affine(nifti_run, tmp_path):
  make, workdir, root, vols = nifti_run
  s = make(sampling__output_dir=str(tmp_path / 'samples'))
  n = s.sampling.num_samples                       # configs/test.py's 4: one compile
  out = sampling.run_sample(s, workdir, set())
  with open(os.path.join(out, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['complete'] and sorted(manifest['nifti_volumes']) == ['p4', 'p5']
  for case in ('p4', 'p5'):
    info = manifest['nifti_volumes'][case]
    assert info['slices'] == _marked_slices(vols[case])
    scan = nib.load(os.path.join(root, 'testing', case, f'{case}_flair.nii.gz'))
    samples = nib.load(os.path.join(out, 'nifti', info['samples']))
    freq = nib.load(os.path.join(out, 'nifti', info['frequency']))
    assert samples.shape == SHAPE + (n,) and freq.shape == SHAPE
    np.testing.assert_allclose(samples.affine, scan.affine, atol=1e-6)
    np.testing.assert_allclose(freq.affine, scan.affine, atol=1e-6)
    got = np.asarray(samples.dataobj)
    np.testing.assert_allclose(np.asarray(freq.dataobj), got.mean(-1), atol=1e-6)
    for z in range(SHAPE[2]):
      if z not in info['slices']:
        assert not got[:, :, z].any(), (case, z)
        continue
      folder = os.path.join(out, manifest['cases'][f'{case}_z{z}'])
      pngs = np.stack([np.asarray(Image.open(os.path.join(folder, f'sample_{i:02d}.png'))) > 127
                       for i in range(n)], -1)                          # [16, 16, N]
      np.testing.assert_array_equal(got[:, 1:17, z] > 0, pngs[1:15])    # undo pad and crop
      assert not got[:, [0, 17], z].any()                              # cropped columns


def test_nifti_sample_of_every_slice_with_the_empty_fraction_overridden(nifti_run, tmp_path):
  """--config.data.nifti_empty_fraction=1 at sampling: every slice of each test scan
  is sampled (another set of records; the checkpoint trained on marked slices)."""
  make, workdir, _, _ = nifti_run
  s = make(sampling__output_dir=str(tmp_path / 'all'), data__nifti_empty_fraction=1.0)
  out = sampling.run_sample(s, workdir, {'data.nifti_empty_fraction'})
  with open(os.path.join(out, 'manifest.json')) as f:
    volumes = json.load(f)['nifti_volumes']
  assert {c: v['slices'] for c, v in volumes.items()} == {
      'p4': list(range(SHAPE[2])), 'p5': list(range(SHAPE[2]))}
  assert nib.load(os.path.join(out, 'nifti', volumes['p4']['samples'])).shape == SHAPE + (
      s.sampling.num_samples,)


def test_nifti_input_folder_of_unlabelled_scans_is_sampled_slice_by_slice(nifti_run, tmp_path):
  """--config.sampling.input_dir with NIfTI case folders holding only the sequences
  (a new patient, no raters): every slice is sampled and written back with the
  scan's affine; a folder missing a sequence is skipped (skip_bad_inputs), named."""
  make, workdir, root, vols = nifti_run
  inputs = tmp_path / 'new_scans'
  affine = AFFINE.copy()
  affine[:3, 3] = [1.0, 2.0, 3.0]                      # not the training scans' affine
  for case in ('q1', 'q2'):
    os.makedirs(inputs / case)
    for kind in ('flair', 't1') if case == 'q1' else ('flair',):
      nib.save(nib.Nifti1Image(vols['p4'][kind], affine),
               str(inputs / case / f'{case}_{kind}.nii.gz'))
  s = make(sampling__input_dir=str(inputs), sampling__output_dir=str(tmp_path / 'out'),
           sampling__skip_bad_inputs=True)
  n = s.sampling.num_samples
  out = sampling.run_sample(s, workdir, set())
  with open(os.path.join(out, 'manifest.json')) as f:
    manifest = json.load(f)
  assert sorted(manifest['cases']) == [f'q1_z{z}' for z in range(SHAPE[2])]
  assert len(manifest['skipped']) == 1 and 'q2' in manifest['skipped'][0]
  assert "'*t1*'" in manifest['skipped'][0]
  info = manifest['nifti_volumes']['q1']
  assert info['slices'] == list(range(SHAPE[2]))
  samples = nib.load(os.path.join(out, 'nifti', info['samples']))
  assert samples.shape == SHAPE + (n,)
  np.testing.assert_allclose(samples.affine, affine, atol=1e-6)
  got = np.asarray(samples.dataobj)
  for z in range(SHAPE[2]):
    folder = os.path.join(out, manifest['cases'][f'q1_z{z}'])
    pngs = np.stack([np.asarray(Image.open(os.path.join(folder, f'sample_{i:02d}.png'))) > 127
                     for i in range(n)], -1)
    np.testing.assert_array_equal(got[:, 1:17, z] > 0, pngs[1:15])
  # The input slices are the records' slices of the same volumes (p4 is a test case).
  split = sample_inputs.dataset_cases(make(), workdir)
  by_id = {c.case_id: c.image for c in split}
  read = sample_inputs.folder_inputs(make(sampling__input_dir=str(inputs / 'q1')))
  assert [c.case_id for c in read.cases] == [f'q1_z{z}' for z in range(SHAPE[2])]
  for case in read.cases:
    z = case.case_id.split('_z')[1]
    if f'p4_z{z}' in by_id:
      np.testing.assert_array_equal(case.image, by_id[f'p4_z{z}'])
  assert any(f'p4_z{z}' in by_id for z in range(SHAPE[2]))
