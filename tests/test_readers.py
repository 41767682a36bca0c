"""Readers: LIDC pickles, PHiSeg HDF5, NIfTI volumes with raters, wide folder images.

Every fixture file is written here in its real format, from the real LIDC sample
(tests.conftest.LIDC_SAMPLE; those tests skip without it) or from synthetic arrays,
built through TFDS (`pipeline.prepare`) and read back through the grain pipelines;
the values are compared with a direct numpy computation.
"""

import dataclasses
import hashlib
import io
import logging
import json
import os
import pickle
import shutil

import h5py
import nibabel as nib
import numpy as np
from PIL import Image
import pytest

from tests import helpers
from tests.conftest import LIDC_SAMPLE
from configs import default as default_config
from cimd_jax.apps import sample_inputs
from cimd_jax.data import DataArgs
from cimd_jax.data import folder
from cimd_jax.data import image_folder
from cimd_jax.data import lidc_hdf5
from cimd_jax.data import lidc_pickle
from cimd_jax.data import nifti
from cimd_jax.data import pipeline
from cimd_jax.data import provenance
from cimd_jax.data import splits
from cimd_jax.data.records import DataError
from cimd_jax.utils.errors import ConfigError

HAVE_LIDC = os.path.isdir(os.path.join(LIDC_SAMPLE, 'training'))


def _eval_all(args, workdir, split, batch_size=8):
  batches = list(pipeline.eval_batches(args, str(workdir), split, batch_size))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _percentile_u8(x, low=0.5, high=99.5):
  """The documented intensity rule, computed directly."""
  x = np.asarray(x, np.float64)
  lo, hi = np.percentile(x, [low, high])
  return np.rint((np.clip(x, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)


def _check_train_batches(args, workdir, expected, batch_size, num_batches=2):
  """Train batches: every row is its record's image and the drawn expert's mask.

  expected: case_id -> (image uint8 [H, W, C], masks {0, 1} [A, H, W]).
  """
  it = pipeline.train_iterator(args, str(workdir), batch_size)
  for _ in range(num_batches):
    batch = next(it)
    assert batch['image'].shape[0] == batch_size
    for i, cid in enumerate(batch['case_id']):
      image, masks = expected[str(cid)]
      np.testing.assert_allclose(batch['image'][i], image / 127.5 - 1.0, atol=1e-6)
      np.testing.assert_array_equal(batch['mask'][i, ..., 0],
                                    masks[int(batch['expert'][i])] * 2.0 - 1.0)


def _raises_data_error(args, tfds_dir, workdir, parts):
  with pytest.raises(folder.DataError) as err:
    pipeline.prepare(args, str(workdir))
  message = str(err.value)
  assert '\n' not in message
  for part in parts:
    assert part in message, (part, message)
  assert not os.path.exists(tfds_dir), 'validation must fail before anything is written'
  return message


@pytest.fixture(scope='session')
def lidc_cases():
  """The LIDC sample: split -> [(case, image uint8 [128, 128], raw labels uint8 [4, 128, 128])]."""
  if not HAVE_LIDC:
    pytest.skip(f'real LIDC sample not found at {LIDC_SAMPLE}')
  out = {}
  for split, sub in (('train', 'training'), ('test', 'testing')):
    cases = []
    for case in sorted(os.listdir(os.path.join(LIDC_SAMPLE, sub)), key=int):
      d = os.path.join(LIDC_SAMPLE, sub, case)
      image_file = [f for f in os.listdir(d) if f.startswith('image_')][0]
      image = np.asarray(Image.open(os.path.join(d, image_file)).convert('L'))
      labels = np.stack([np.asarray(Image.open(os.path.join(d, f'label{k}_.jpg')))
                         for k in range(4)])
      cases.append((case, image, labels))
    out[split] = cases
  return out


# --------------------------------------------------------------------------- LIDC pickle


def _pickle_records(lidc_cases):
  """key -> record of the pickle format, from the 28 sample cases; 3 slices per
  patient (10 patients). Masks are the JPEG grey levels / 255 (soft, in [0, 1])."""
  cases = lidc_cases['train'] + lidc_cases['test']
  out = {}
  for i, (_, image, labels) in enumerate(cases):
    out[f'LIDC-{i // 3:04d}_slice{i % 3}'] = {
        'image': (image / 255.0).astype(np.float32),
        'masks': [(labels[k] / 255.0).astype(np.float32) for k in range(4)],
        'series_uid': f'1.3.6.1.4.1.14519.{i // 3}',
    }
  return out


def _write_pickles(root, table, num_files=2):
  os.makedirs(root, exist_ok=True)
  keys = list(table)
  for f in range(num_files):
    part = {k: table[k] for k in keys[f::num_files]}
    with open(os.path.join(root, f'part{f}.pickle'), 'wb') as fh:
      pickle.dump(part, fh, protocol=4)
  return str(root)


@pytest.fixture(scope='session')
def lidc_pickle_set(lidc_cases, tmp_path_factory):
  base = tmp_path_factory.mktemp('pickle')
  table = _pickle_records(lidc_cases)
  root = _write_pickles(base / 'src', table)
  args = DataArgs(name='lidc_pickle', source_dir=root, tfds_dir=str(base / 'tfds'),
                  image_size=128, num_annotators=4, validation_fraction=0.25,
                  test_fraction=0.2, seed=0)
  mp = pytest.MonkeyPatch()
  mp.setattr(lidc_pickle, 'CHUNK_BYTES', 1 << 16)    # the chunked path, many chunks
  try:
    counts = pipeline.prepare(args, str(base))
  finally:
    mp.undo()
  return args, base, table, counts


class _SpyFile(io.BytesIO):
  def __init__(self, data):
    super().__init__(data)
    self.reads = []

  def readinto(self, buffer):
    self.reads.append(len(buffer))
    return super().readinto(buffer)


def test_read_pickle_reads_in_chunks(tmp_path):
  table = {'a': {'image': np.arange(3000, dtype=np.float32)}, 'b': list(range(500))}
  path = str(tmp_path / 'x.pickle')
  with open(path, 'wb') as f:
    pickle.dump(table, f)
  raw = open(path, 'rb').read()
  spy = _SpyFile(raw)
  got = lidc_pickle.read_bytes(spy, len(raw), chunk_bytes=1000)
  assert bytes(got) == raw
  assert len(spy.reads) == -(-len(raw) // 1000) > 10 and max(spy.reads) <= 1000
  loaded = lidc_pickle.read_pickle(path, chunk_bytes=1000)
  np.testing.assert_array_equal(loaded['a']['image'], table['a']['image'])
  assert loaded['b'] == table['b']
  assert lidc_pickle.CHUNK_BYTES < 2**31
  with pytest.raises(EOFError):
    lidc_pickle.read_bytes(io.BytesIO(raw), len(raw) + 1, 1000)


def test_pickle_records_equal_direct_reading(lidc_pickle_set):
  args, base, table, counts = lidc_pickle_set
  # 10 patients: 2 test (0.2), 2 validation (0.25 of 8), 6 train.
  assert sum(counts.values()) == 28 and set(counts) == {'train', 'validation', 'test'}
  expected, uid_split = {}, {}
  for split in counts:
    got = _eval_all(args, base, split)
    ids = [str(c) for c in got['case_id']]
    assert ids == sorted(ids, key=splits.natural_key)
    assert len({table[k]['series_uid'] for k in ids}) == {'train': 6, 'validation': 2,
                                                          'test': 2}[split]
    for i, key in enumerate(ids):
      record = table[key]
      image = np.round(record['image'].astype(np.float64) * 255).astype(np.uint8)
      masks = np.stack([m > 0.5 for m in record['masks']])
      np.testing.assert_allclose(got['image'][i, ..., 0], image / 127.5 - 1, atol=1e-6)
      np.testing.assert_array_equal(got['masks'][i] > 0, masks)
      expected[key] = (image[..., None], masks)
      uid = record['series_uid']
      assert uid_split.setdefault(uid, split) == split, f'patient {uid} in two splits'
  assert sorted(expected) == sorted(table)
  _check_train_batches(args, base, expected, batch_size=6)


def test_pickle_masks_threshold_matches_folder_rule(lidc_pickle_set, lidc_cases):
  """Soft masks (JPEG grey / 255) > 0.5 equal the raw JPEG > 127 of the folder reader."""
  args, base, table, _ = lidc_pickle_set
  got = _eval_all(args, base, 'train')
  raw = {f'LIDC-{i // 3:04d}_slice{i % 3}': labels for i, (_, _, labels)
         in enumerate(lidc_cases['train'] + lidc_cases['test'])}
  for i, key in enumerate(got['case_id']):
    np.testing.assert_array_equal(got['masks'][i] > 0, raw[str(key)] > 127)


def _small_records(num_patients=6, slices=2, size=16, seed=0):
  rng = np.random.default_rng(seed)
  table = {}
  for p in range(num_patients):
    for s in range(slices):
      table[f'p{p}_s{s}'] = {
          'image': rng.random((size, size)),
          'masks': [(rng.random((size, size)) > 0.7).astype(np.uint8) for _ in range(2)],
          'series_uid': f'uid{p}',
      }
  return table


def _split_of(args):
  """split -> keys, and split -> uids, without writing anything."""
  entries, keys = lidc_pickle.make_builder(args, '/unused').builder_config.payload.load()
  return keys


def test_pickle_split_is_patient_level_and_seeded(tmp_path):
  table = _small_records(num_patients=12, slices=3)
  root = _write_pickles(tmp_path / 'src', table, num_files=3)
  base = DataArgs(name='lidc_pickle', source_dir=root, image_size=16, num_annotators=2,
                  validation_fraction=0.2, test_fraction=0.25, seed=1)
  a, b = _split_of(base), _split_of(base)
  c = _split_of(dataclasses.replace(base, seed=2))
  assert a == b and a != c
  for split_keys in (a, c):
    uids = {s: {table[k]['series_uid'] for k in ks} for s, ks in split_keys.items()}
    assert not uids['train'] & uids['test'] and not uids['train'] & uids['validation']
    assert not uids['validation'] & uids['test']
    assert [len(uids[s]) for s in ('train', 'validation', 'test')] == [7, 2, 3]
    assert sorted(sum(split_keys.values(), [])) == sorted(table)
  no_val = _split_of(dataclasses.replace(base, validation_fraction=0.0))
  assert set(no_val) == {'train', 'test'}


def test_pickle_split_file_is_obeyed(tmp_path):
  table = _small_records(num_patients=5)
  root = _write_pickles(tmp_path / 'src', table)
  split_file = tmp_path / 'split.json'
  split_file.write_text(json.dumps({'train': ['uid4', 'uid0', 'uid2'], 'test': ['uid1'],
                                    'validation': ['uid3']}))
  args = DataArgs(name='lidc_pickle', source_dir=root, tfds_dir=str(tmp_path / 'tfds'),
                  image_size=16, num_annotators=2, split_file=str(split_file))
  assert pipeline.prepare(args, str(tmp_path)) == {'train': 6, 'validation': 2, 'test': 2}
  assert list(_eval_all(args, tmp_path, 'test')['case_id']) == ['p1_s0', 'p1_s1']
  assert list(_eval_all(args, tmp_path, 'validation')['case_id']) == ['p3_s0', 'p3_s1']
  train = _eval_all(args, tmp_path, 'train')
  assert list(train['case_id']) == ['p0_s0', 'p0_s1', 'p2_s0', 'p2_s1', 'p4_s0', 'p4_s1']
  np.testing.assert_allclose(train['image'][2, ..., 0],
                             np.rint(table['p2_s0']['image'] * 255) / 127.5 - 1, atol=1e-6)
  # The seed and fractions do not change an explicit split (nor the cache name).
  other = dataclasses.replace(args, seed=9, test_fraction=0.5)
  assert (lidc_pickle.make_builder(other, str(tmp_path / 'tfds')).data_path
          == lidc_pickle.make_builder(args, str(tmp_path / 'tfds')).data_path)


def test_sampling_data_changed_since_training_is_named(tmp_path, caplog):
  """A pickle added to the folder after training redraws every split (patients the
  model trained on can land in the test split): sampling a split then warns, naming
  the data; the records it was trained on do not."""
  root = _write_pickles(tmp_path / 'src', _small_records(num_patients=10), num_files=1)
  s = helpers.settings(str(tmp_path / 'tfds'), data__name='lidc_pickle', data__source_dir=root,
                       data__image_size=16, data__num_annotators=2)
  args, run = s.data, str(tmp_path / 'run')
  os.makedirs(run)
  assert provenance.check_sampling(args, run, 'test')            # nothing recorded yet
  provenance.record_training(args, run)
  provenance.record_training(args, run)
  assert provenance.trained_on(run) == [pipeline.records_name(args, run)]
  with caplog.at_level(logging.WARNING):
    assert provenance.check_sampling(args, run, 'test')
  assert not caplog.records
  more = {k.replace('p', 'q', 1): dict(v, series_uid=v['series_uid'] + 'b')
          for k, v in _small_records(num_patients=10, seed=1).items()}
  with open(os.path.join(root, 'part_more.pickle'), 'wb') as fh:
    pickle.dump(more, fh, protocol=4)
  with caplog.at_level(logging.WARNING):
    cases = sample_inputs.dataset_cases(s, run)                       # what sample/evaluate read
  assert cases and not provenance.check_sampling(args, run, 'test')
  assert len(caplog.records) == 2 and root in caplog.records[0].getMessage()
  assert "'test' split" in caplog.records[0].getMessage()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    provenance.record_training(args, run)                        # a resume on the new data
  assert 'training continues on other records' in caplog.records[0].getMessage()
  assert len(provenance.trained_on(run)) == 2 and provenance.check_sampling(args, run, 'test')
  synthetic = DataArgs(name='synthetic', image_size=16, num_annotators=2)
  assert provenance.check_sampling(synthetic, run, 'test')       # generated: not checked


def _edit(key, **changes):
  def fn(table):
    rec = dict(table[key])
    for name, value in changes.items():
      if value is None:
        rec.pop(name)
      else:
        rec[name] = value
    table[key] = rec
  return fn


_Z = np.zeros((16, 16))
PICKLE_BAD = {
    # name: (break the table, expected message parts)
    'missing_key': (_edit('p2_s1', masks=None), ["'p2_s1'", "missing key 'masks'"]),
    'mask_count': (_edit('p1_s0', masks=[_Z] * 3), ["'p1_s0'", 'has 3 mask(s)',
                                                    'expected 2 (data.num_annotators)']),
    'mask_shape': (_edit('p3_s1', masks=[_Z, np.zeros((16, 12))]),
                   ["'p3_s1'", "'masks'[1]", '(16, 12)', "image's shape (16, 16)"]),
    'image_not_2d': (_edit('p0_s0', image=np.zeros((16, 16, 1))),
                     ["'p0_s0'", "'image'", '(16, 16, 1)', 'expected a 2-D array']),
    'image_out_of_range': (_edit('p4_s0', image=np.full((16, 16), 1.5)),
                           ["'p4_s0'", "'image'", 'expected floats in [0, 1]']),
    'image_nan': (_edit('p4_s1', image=np.full((16, 16), np.nan)),
                  ["'p4_s1'", "'image'", 'NaN']),
    'mask_out_of_range': (_edit('p5_s0', masks=[_Z, np.full((16, 16), 255)]),
                          ["'p5_s0'", "'masks'[1]", 'expected values in [0, 1]']),
    'uid_not_string': (_edit('p0_s1', series_uid=7), ["'p0_s1'", "'series_uid'",
                                                      'non-empty string']),
    'image_wrong_size': (_edit('p1_s1', image=np.zeros((20, 20)),
                               masks=[np.zeros((20, 20))] * 2),
                         ["'p1_s1'", 'is 20x20', 'expected 16x16', 'data.resize']),
    'record_not_dict': (lambda t: t.update(p2_s0=[1, 2]), ["'p2_s0'", 'is a list']),
}


@pytest.mark.parametrize('kind', sorted(PICKLE_BAD))
def test_pickle_bad_record_names_file_and_key(tmp_path, kind):
  table = _small_records()
  breaker, parts = PICKLE_BAD[kind]
  breaker(table)
  root = _write_pickles(tmp_path / 'src', table, num_files=1)
  tfds_dir = str(tmp_path / 'tfds')
  args = DataArgs(name='lidc_pickle', source_dir=root, tfds_dir=tfds_dir, image_size=16,
                  num_annotators=2)
  _raises_data_error(args, tfds_dir, tmp_path, [os.path.join(root, 'part0.pickle')] + parts)


def test_pickle_bad_source_and_split_file(tmp_path):
  table = _small_records()
  root = _write_pickles(tmp_path / 'src', table, num_files=2)
  tfds_dir = str(tmp_path / 'tfds')
  args = DataArgs(name='lidc_pickle', source_dir=root, tfds_dir=tfds_dir, image_size=16,
                  num_annotators=2)
  # The same key in two files.
  with open(os.path.join(root, 'part1.pickle'), 'wb') as f:
    pickle.dump({'p0_s0': table['p0_s0']}, f)
  _raises_data_error(args, tfds_dir, tmp_path, ['part1.pickle', "'p0_s0'", 'part0.pickle',
                                                'expected each key once'])
  root = _write_pickles(tmp_path / 'src2', table, num_files=1)
  args = dataclasses.replace(args, source_dir=root)
  for content, parts in (
      ({'train': ['uid0', 'uid1', 'uid2', 'uid3', 'uid4'], 'test': ['uid9']},
       ["key \"test\"", "'uid9'", 'not in the data']),
      ({'train': ['uid0', 'uid1', 'uid2', 'uid3', 'uid4'], 'test': ['uid0', 'uid5']},
       ["'uid0'", 'both "train" and "test"']),
      ({'train': ['uid0', 'uid1', 'uid2'], 'test': ['uid3']},
       ["'uid4'", 'in no split']),
      ({'training': []}, ['expected a JSON object with key "train"']),
  ):
    split_file = tmp_path / 'split.json'
    split_file.write_text(json.dumps(content))
    bad = dataclasses.replace(args, split_file=str(split_file))
    _raises_data_error(bad, tfds_dir, tmp_path, [str(split_file)] + parts)
  (tmp_path / 'split.json').write_text('{not json')
  _raises_data_error(dataclasses.replace(args, split_file=str(tmp_path / 'split.json')),
                     tfds_dir, tmp_path, ['split.json', 'cannot read JSON'])
  with open(os.path.join(root, 'part0.pickle'), 'wb') as f:
    f.write(b'\x80\x04garbage')
  _raises_data_error(args, tfds_dir, tmp_path, ['part0.pickle', 'cannot read pickle'])
  empty = tmp_path / 'empty'
  empty.mkdir()
  _raises_data_error(dataclasses.replace(args, source_dir=str(empty)), tfds_dir, tmp_path,
                     [str(empty), 'no *.pickle file'])


def test_pickle_files_under_other_names_are_named_not_dropped_silently(tmp_path, caplog):
  """A folder of part0.pickle, part1.pkl and part2.PICKLE reads part0.pickle only
  (the documented *.pickle rule) and one warning names the other two."""
  table = _small_records()
  root = _write_pickles(tmp_path / 'src', table, num_files=1)
  for name in ('part1.pkl', 'part2.PICKLE'):
    with open(os.path.join(root, name), 'wb') as f:
      pickle.dump({}, f)
  with caplog.at_level(logging.WARNING):
    assert lidc_pickle.list_pickles(root) == [os.path.join(root, 'part0.pickle')]
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and '2 file(s) not named *.pickle' in warned[0]
  assert 'part1.pkl' in warned[0] and 'part2.PICKLE' in warned[0]


# --------------------------------------------------------------------------- PHiSeg HDF5


def _write_hdf5(path, groups):
  """groups: name -> (images [N, H, W], labels [N, H, W, A]); PHiSeg's dtypes."""
  with h5py.File(path, 'w') as f:
    for name, value in groups.items():
      if isinstance(value, np.ndarray):       # a dataset where a group belongs
        f.create_dataset(name, data=value)
        continue
      images, labels = value
      g = f.create_group(name)
      g.create_dataset('uids', data=np.arange(len(images), dtype=np.int64) * 7919)
      g.create_dataset('labels', data=labels)
      g.create_dataset('images', data=images)
  return str(path)


@pytest.fixture(scope='session')
def phiseg_set(lidc_cases, tmp_path_factory):
  base = tmp_path_factory.mktemp('hdf5')
  train = lidc_cases['train']
  parts = {'train': train[:15], 'val': train[15:], 'test': lidc_cases['test']}
  groups, expected = {}, {}
  for name, cases in parts.items():
    # As PHiSeg writes them: image (in [0, 1]) - 0.5 as float64; labels uint8 0/1 [N, H, W, A].
    images = np.stack([img / 255.0 - 0.5 for _, img, _ in cases]).astype(np.float64)
    labels = np.stack([(lab > 127).transpose(1, 2, 0) for _, _, lab in cases]
                      ).astype(np.uint8)
    groups[name] = (images, labels)
    for i, (_, img, lab) in enumerate(cases):
      expected[f'{name}_{i:05d}'] = (img[..., None], (lab > 127).astype(np.uint8))
  os.makedirs(base / 'src')
  path = _write_hdf5(base / 'src' / 'data_lidc.hdf5', groups)
  args = DataArgs(name='lidc_hdf5', source_dir=str(base / 'src'),
                  tfds_dir=str(base / 'tfds'), image_size=128, num_annotators=4)
  counts = pipeline.prepare(args, str(base))
  return args, base, path, expected, counts


def test_hdf5_records_equal_direct_reading(phiseg_set):
  args, base, path, expected, counts = phiseg_set
  assert counts == {'train': 15, 'validation': 4, 'test': 9}
  for split, group in (('train', 'train'), ('validation', 'val'), ('test', 'test')):
    got = _eval_all(args, base, split)
    assert list(got['case_id']) == [f'{group}_{i:05d}' for i in range(counts[split])]
    for i, cid in enumerate(got['case_id']):
      image, masks = expected[str(cid)]
      # (x + 0.5) * 255 recovers the JPEG's bytes exactly.
      np.testing.assert_allclose(got['image'][i], image / 127.5 - 1, atol=1e-6)
      np.testing.assert_array_equal(got['masks'][i], masks * 2.0 - 1)
  train = {k: v for k, v in expected.items() if k.startswith('train_')}
  _check_train_batches(args, base, train, batch_size=5)
  # The file itself as source_dir is the same dataset.
  same = dataclasses.replace(args, source_dir=path)
  assert (lidc_hdf5.make_builder(same, args.tfds_dir).data_path
          == lidc_hdf5.make_builder(args, args.tfds_dir).data_path)


def _small_groups(n=(6, 3, 4), size=16, annotators=2, seed=0):
  rng = np.random.default_rng(seed)
  return {name: (rng.random((k, size, size)) - 0.5,
                 (rng.random((k, size, size, annotators)) > 0.6).astype(np.uint8))
          for name, k in zip(('train', 'val', 'test'), n)}


def test_hdf5_small_values_and_uint8_images(tmp_path, monkeypatch):
  monkeypatch.setattr(lidc_hdf5, 'READ_ROWS', 4)       # several blocks per group
  groups = _small_groups(n=(10, 2, 3))
  groups['test'] = ((groups['test'][0] + 0.5) * 255).astype(np.uint8), groups['test'][1]
  del groups['val']
  path = _write_hdf5(tmp_path / 'x.h5', groups)
  args = DataArgs(name='lidc_hdf5', source_dir=path, tfds_dir=str(tmp_path / 'tfds'),
                  image_size=16, num_annotators=2, image_channels=3)
  assert pipeline.prepare(args, str(tmp_path)) == {'train': 10, 'test': 3}
  train = _eval_all(args, tmp_path, 'train')
  # Rows read in blocks of 4 keep their row numbers: ids run on across blocks.
  assert list(train['case_id']) == [f'train_{i:05d}' for i in range(10)]
  images, labels = groups['train']
  want = np.rint((images + 0.5) * 255).astype(np.uint8)
  np.testing.assert_allclose(train['image'], np.repeat(want[..., None], 3, -1) / 127.5 - 1,
                             atol=1e-6)
  np.testing.assert_array_equal(train['masks'] > 0, labels.transpose(0, 3, 1, 2) > 0)
  test = _eval_all(args, tmp_path, 'test')
  np.testing.assert_allclose(test['image'][..., 0], groups['test'][0] / 127.5 - 1, atol=1e-6)


def _set(group, index, what, value):
  def fn(groups):
    images, labels = (a.copy() for a in groups[group])
    arr = images if what == 'images' else labels
    arr[index] = value
    groups[group] = (images, labels)
  return fn


HDF5_BAD = {
    'missing_labels': (lambda g: g.update(val=(g['val'][0], None)),
                       ["'val/labels'", 'missing']),
    'annotator_count': (lambda g: g.update(test=(g['test'][0], g['test'][1][..., :1])),
                        ["'test/labels'", 'has 1 annotator(s)', 'expected 2']),
    'label_shape': (lambda g: g.update(train=(g['train'][0], g['train'][1][:, :12])),
                    ["'train/labels'", '(6, 12, 16, 2)', "equal to 'train/images'"]),
    'images_4d': (lambda g: g.update(val=(g['val'][0][..., None], g['val'][1])),
                  ["'val/images'", '(3, 16, 16, 1)', 'expected [N, H, W]']),
    'image_out_of_range': (_set('val', (2, 5, 5), 'images', 0.9),
                           ["'val/images'", 'row 2', 'data.hdf5_image_range']),
    'label_out_of_range': (_set('train', (4, 0, 0, 1), 'labels', 2),
                           ["'train/labels'", 'row 4', 'expected labels in [0, 1]']),
    'no_train_group': (lambda g: g.pop('train'), ["no group 'train'"]),
    'group_is_a_dataset': (lambda g: g.update(val=np.zeros((3, 16, 16))),
                           ["key 'val'", 'not a group']),
    'unknown_group': (lambda g: g.update(validation=g.pop('val')),
                      ["top-level key(s) ['validation']", "expected only the groups"]),
    'wrong_size': (lambda g: g.update(test=(np.zeros((4, 20, 20)),
                                            np.zeros((4, 20, 20, 2), np.uint8))),
                   ["'test/images'", '20x20', 'expected 16x16']),
}


def _write_groups_allowing_none(path, groups):
  with h5py.File(path, 'w') as f:
    for name, value in groups.items():
      if isinstance(value, np.ndarray):       # a dataset where a group belongs
        f.create_dataset(name, data=value)
        continue
      images, labels = value
      g = f.create_group(name)
      g.create_dataset('images', data=images)
      if labels is not None:
        g.create_dataset('labels', data=labels)


@pytest.mark.parametrize('kind', sorted(HDF5_BAD))
def test_hdf5_bad_file_names_file_and_key(tmp_path, kind):
  groups = _small_groups()
  breaker, parts = HDF5_BAD[kind]
  breaker(groups)
  path = str(tmp_path / 'data_lidc.hdf5')
  _write_groups_allowing_none(path, groups)
  tfds_dir = str(tmp_path / 'tfds')
  args = DataArgs(name='lidc_hdf5', source_dir=str(tmp_path), tfds_dir=tfds_dir,
                  image_size=16, num_annotators=2)
  _raises_data_error(args, tfds_dir, tmp_path, [path] + parts)


def test_hdf5_unreadable_pixels_name_file_and_key(tmp_path, monkeypatch):
  """A read that fails inside h5py (a corrupt chunk, a missing compression filter)
  is a one-line DataError naming the file, the group and the rows."""
  path = str(tmp_path / 'data_lidc.hdf5')
  _write_groups_allowing_none(path, _small_groups())

  def failing_read(self, key):
    raise OSError("Can't read data (required filter 'lzf' is not registered)")
  monkeypatch.setattr(h5py.Dataset, '__getitem__', failing_read)
  tfds_dir = str(tmp_path / 'tfds')
  args = DataArgs(name='lidc_hdf5', source_dir=str(tmp_path), tfds_dir=tfds_dir,
                  image_size=16, num_annotators=2)
  _raises_data_error(args, tfds_dir, tmp_path,
                     [path, "key 'train'", 'cannot read rows 0..', "filter 'lzf'"])


def test_hdf5_images_that_never_reach_the_lower_half_of_the_range_are_refused(tmp_path):
  """Unshifted [0, 1] images that are all <= 0.5 pass the per-value check against the
  default (-0.5, 0.5) but would be read half a range too bright: refused, naming the
  file and the key; the same file reads under (0, 1), and one value below the
  midpoint anywhere in the file is enough."""
  groups = _small_groups()
  for name, (images, labels) in groups.items():
    groups[name] = ((images + 0.5) * 0.5, labels)          # [0, 0.5]: a dark [0, 1] file
  path = str(tmp_path / 'data_lidc.hdf5')
  _write_hdf5(path, groups)
  tfds_dir = str(tmp_path / 'tfds')
  args = DataArgs(name='lidc_hdf5', source_dir=path, tfds_dir=tfds_dir,
                  image_size=16, num_annotators=2)
  _raises_data_error(args, tfds_dir, tmp_path,
                     [path, "key 'images'", 'upper half', 'data.hdf5_image_range'])
  unshifted = dataclasses.replace(args, hdf5_image_range=(0.0, 1.0))
  assert pipeline.prepare(unshifted, str(tmp_path)) == {'train': 6, 'validation': 3, 'test': 4}
  np.testing.assert_allclose(_eval_all(unshifted, tmp_path, 'test')['image'][..., 0],
                             np.rint(groups['test'][0] * 255) / 127.5 - 1, atol=1e-6)
  images, labels = groups['val']
  images = images.copy()
  images[1, 3, 3] = -0.01                                  # below the midpoint, in one row
  groups['val'] = (images, labels)
  path2 = str(tmp_path / 'two' / 'data_lidc.hdf5')
  os.makedirs(os.path.dirname(path2))
  _write_hdf5(path2, groups)
  shifted = dataclasses.replace(args, source_dir=path2, tfds_dir=str(tmp_path / 'tfds2'))
  assert pipeline.prepare(shifted, str(tmp_path)) == {'train': 6, 'validation': 3, 'test': 4}


def test_hdf5_source_must_be_one_file(tmp_path):
  _write_hdf5(tmp_path / 'a.hdf5', _small_groups())
  _write_hdf5(tmp_path / 'b.h5', _small_groups())
  tfds_dir = str(tmp_path / 'tfds')
  args = DataArgs(name='lidc_hdf5', source_dir=str(tmp_path), tfds_dir=tfds_dir,
                  image_size=16, num_annotators=2)
  _raises_data_error(args, tfds_dir, tmp_path, ['holds 2 HDF5 files', 'a.hdf5, b.h5'])
  (tmp_path / 'c.hdf5').write_bytes(b'not hdf5')
  _raises_data_error(dataclasses.replace(args, source_dir=str(tmp_path / 'c.hdf5')),
                     tfds_dir, tmp_path, ['c.hdf5', 'cannot open as HDF5'])


# --------------------------------------------------------------------------- NIfTI

SHAPE = (20, 28, 12)      # slices along axis 2 are 20 x 28: padded to 24 rows, cropped to 24 cols
AFFINE = np.array([[0.9, 0, 0, -10.0], [0, 1.1, 0, 20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
NIFTI_PATTERNS = dict(nifti_image_patterns=('*flair*', '*t1*'),
                      nifti_rater_patterns=('*mask1*', '*mask2*'))


def _case_volumes(seed):
  """Two sequences (int16, float32) and two raters (uint8, float32) of one case."""
  rng = np.random.default_rng(seed)
  flair = rng.integers(0, 3000, SHAPE).astype(np.int16)
  flair[0, 0, 0] = 32000                                   # an outlier the clipping removes
  t1 = (rng.normal(50, 100, SHAPE)).astype(np.float32)
  r1 = np.zeros(SHAPE, np.uint8)
  r2 = np.zeros(SHAPE, np.float32)
  z0 = 2 + seed % 4
  r1[5:12, 4:15, z0:z0 + 3] = 1
  r2[6:13, 5:17, z0 + 1:z0 + 4] = 1.0
  return {'flair': flair, 't1': t1, 'mask1': r1, 'mask2': r2}


def _write_nifti_case(folder, name, vols, affine=AFFINE):
  os.makedirs(folder, exist_ok=True)
  for kind, vol in vols.items():
    nib.save(nib.Nifti1Image(vol, affine), os.path.join(folder, f'{name}_{kind}.nii.gz'))


def _make_nifti_source(root, train=('p1', 'p2', 'p3'), test=('p4',)):
  vols = {}
  for sub, cases in (('training', train), ('testing', test)):
    for i, case in enumerate(cases):
      vols[case] = _case_volumes(int(case[1:]))
      _write_nifti_case(os.path.join(root, sub, case), case, vols[case])
  return str(root), vols


def _fit_direct(plane):
  """20 x 28 (x, ...) -> 24 x 24: 2 zero rows above and below, columns 2..25."""
  pad = [(2, 2), (0, 0)] + [(0, 0)] * (plane.ndim - 2)
  return np.pad(plane, pad)[:, 2:26]


@pytest.fixture(scope='session')
def nifti_set(tmp_path_factory):
  base = tmp_path_factory.mktemp('nifti')
  root, vols = _make_nifti_source(base / 'src')
  args = DataArgs(name='nifti', source_dir=root, tfds_dir=str(base / 'tfds'),
                  image_size=24, image_channels=2, num_annotators=2, nifti_axis=2,
                  nifti_empty_fraction=0.5, seed=3, **NIFTI_PATTERNS)
  counts = pipeline.prepare(args, str(base))
  return args, base, vols, counts


def test_nifti_records_equal_direct_computation(nifti_set):
  args, base, vols, counts = nifti_set
  expected = {}
  for case, v in vols.items():
    images = np.stack([_percentile_u8(v['flair']), _percentile_u8(v['t1'])], -1)
    raters = np.stack([v['mask1'] > 0.5, v['mask2'] > 0.5])          # [A, X, Y, Z]
    for z in range(SHAPE[2]):
      expected[f'{case}_z{z}'] = (_fit_direct(images[:, :, z]),
                                  _fit_direct(raters[:, :, :, z].transpose(1, 2, 0)
                                              ).transpose(2, 0, 1).astype(np.uint8))
  seen, split_cases = {}, {}
  for split in ('train', 'test'):
    got = _eval_all(args, base, split)
    assert len(got['case_id']) == counts[split]
    for i, cid in enumerate(got['case_id']):
      image, masks = expected[str(cid)]
      np.testing.assert_allclose(got['image'][i], image / 127.5 - 1, atol=1e-6)
      np.testing.assert_array_equal(got['masks'][i], masks * 2.0 - 1)
      case, z = str(cid).rsplit('_z', 1)
      seen.setdefault(case, []).append(int(z))
      split_cases.setdefault(split, set()).add(case)
  assert split_cases == {'train': {'p1', 'p2', 'p3'}, 'test': {'p4'}}
  for case, zs in seen.items():
    v = vols[case]
    marked = set(np.flatnonzero(((v['mask1'] > 0.5) | (v['mask2'] > 0.5)).any((0, 1))))
    assert zs == sorted(zs)                       # slices in order
    assert marked <= set(zs)                      # every marked slice kept
    assert len(set(zs) - marked) == round(0.5 * (SHAPE[2] - len(marked)))
  train = {k: v for k, v in expected.items() if k.split('_')[0] in ('p1', 'p2', 'p3')}
  _check_train_batches(args, base, train, batch_size=4, num_batches=3)


def test_nifti_sampling_every_slice_is_not_taken_for_other_cases(nifti_set, tmp_path,
                                                                 caplog):
  """Sampling a NIfTI model's split with data.nifti_empty_fraction=1 (docs/data.md:
  every slice) builds other records of the same cases: no warning that the split may
  hold training cases; a validation split carved differently still warns."""
  args, base, _, _ = nifti_set
  run = str(tmp_path / 'run')
  os.makedirs(run)
  provenance.record_training(args, run)
  every = dataclasses.replace(args, nifti_empty_fraction=1.0)
  assert pipeline.records_name(every, run) not in provenance.trained_on(run)
  with caplog.at_level(logging.WARNING):
    assert provenance.check_sampling(every, run, 'test')
  assert not caplog.records
  carved = dataclasses.replace(args, validation_fraction=0.5)
  with caplog.at_level(logging.WARNING):
    assert not provenance.check_sampling(carved, run, 'test')
  assert len(caplog.records) == 1 and 'may hold cases' in caplog.records[0].getMessage()


def test_nifti_empty_slices_are_seeded_and_axis_named():
  marked = np.zeros(40, bool)
  marked[10:14] = True
  a = nifti.kept_slices(marked, 0.25, seed=0, case='c')
  assert list(a) == list(nifti.kept_slices(marked, 0.25, seed=0, case='c'))
  assert list(a) != list(nifti.kept_slices(marked, 0.25, seed=1, case='c'))
  assert set(range(10, 14)) <= set(a) and len(a) == 4 + 9
  assert list(nifti.kept_slices(marked, 0.0, 0, 'c')) == [10, 11, 12, 13]
  assert len(nifti.kept_slices(marked, 1.0, 0, 'c')) == 40
  assert nifti.case_slice_id('pat_01', 0, 7) == 'pat_01_x7'
  assert nifti.parse_case_id('pat_01_y12') == ('pat_01', 1, 12)
  plane = np.arange(20 * 28).reshape(20, 28)
  np.testing.assert_array_equal(nifti.fit(plane, 24), _fit_direct(plane))
  np.testing.assert_array_equal(nifti.unfit(nifti.fit(plane, 24), (20, 28))[:, 2:26],
                                plane[:, 2:26])


def test_nifti_odd_margins_and_rounded_empty_count():
  """fit crops from (n - size) // 2 and pads (size - n) // 2 before; unfit puts each
  pixel back where it came from, also for odd margins; kept_slices keeps
  round(fraction · n_empty) unmarked slices (0.3 · 9 = 2.7 -> 3)."""
  plane = np.arange(1, 9 * 3 + 1).reshape(9, 3)
  fitted = nifti.fit(plane, 6)              # rows 9 -> 6 from row 1; columns 3 -> 6
  want = np.zeros((6, 6), plane.dtype)
  want[:, 1:4] = plane[1:7]
  np.testing.assert_array_equal(fitted, want)
  back = nifti.unfit(fitted, (9, 3))
  want_back = np.zeros_like(plane)
  want_back[1:7] = plane[1:7]
  np.testing.assert_array_equal(back, want_back)
  marked = np.zeros(13, bool)
  marked[[2, 5, 8, 11]] = True
  kept = nifti.kept_slices(marked, 0.3, seed=0, case='c')
  assert len(kept) == 4 + 3 and set(np.flatnonzero(marked)) <= set(kept)


def test_nifti_other_axis_and_case_level_split(tmp_path):
  """No testing/: test_fraction of the cases (whole cases, seeded); axis 0 slices."""
  root, vols = _make_nifti_source(tmp_path / 'src', train=('p1', 'p2', 'p3', 'p4', 'p5'),
                                  test=())
  assert not os.path.exists(os.path.join(root, 'testing'))
  # A 4-D volume with a trailing axis of length 1 reads as 3-D.
  nib.save(nib.Nifti1Image(vols['p1']['flair'][..., None], AFFINE),
           os.path.join(root, 'training', 'p1', 'p1_flair.nii.gz'))
  args = DataArgs(name='nifti', source_dir=root, tfds_dir=str(tmp_path / 'tfds'),
                  image_size=28, image_channels=2, num_annotators=2, nifti_axis=0,
                  test_fraction=0.4, validation_fraction=0.34, seed=0, **NIFTI_PATTERNS)
  cases = {s: [c.case for c in cs] for s, cs in nifti.scan_source(args).items()}
  assert [len(cases[s]) for s in ('train', 'validation', 'test')] == [2, 1, 2]
  assert sorted(sum(cases.values(), [])) == ['p1', 'p2', 'p3', 'p4', 'p5']
  other = {s: [c.case for c in cs]
           for s, cs in nifti.scan_source(dataclasses.replace(args, seed=5)).items()}
  assert other != cases
  counts = pipeline.prepare(args, str(tmp_path))
  got = _eval_all(args, tmp_path, 'test')
  assert len(got['case_id']) == counts['test']
  for i, cid in enumerate(got['case_id']):
    case, axis, x = nifti.parse_case_id(str(cid))
    assert case in cases['test'] and axis == 0 and str(cid) == f'{case}_x{x}'
    v = vols[case]
    plane = _percentile_u8(v['t1'])[x]                 # [28, 12] -> 28 x 28, padded
    np.testing.assert_allclose(got['image'][i, :, 8:20, 1], plane / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(got['image'][i, :, :8], -1.0)
    np.testing.assert_array_equal(got['masks'][i, 1, :, 8:20] > 0, v['mask2'][x] > 0.5)


def test_nifti_split_file_groups_case_folders_across_both_folders(tmp_path):
  """Scans of one patient in several case folders (p1 and p2 of one patient, p3 in
  testing/ of another): data.split_file puts them where it says, over training/ and
  testing/; the seeded split, which splits case folders, is not used."""
  root, _ = _make_nifti_source(tmp_path / 'src', train=('p1', 'p2', 'p4', 'p5'), test=('p3',))
  split = tmp_path / 'split.json'
  split.write_text(json.dumps({'train': ['p5', 'p3'], 'validation': ['p4'],
                               'test': ['p2', 'p1']}))
  args = DataArgs(name='nifti', source_dir=root, tfds_dir=str(tmp_path / 'tfds'),
                  image_size=24, image_channels=2, num_annotators=2, split_file=str(split),
                  validation_fraction=0.5, seed=0, **NIFTI_PATTERNS)
  cases = {s: [(c.case, os.path.basename(os.path.dirname(c.folder))) for c in cs]
           for s, cs in nifti.scan_source(args).items()}
  assert cases == {'train': [('p3', 'testing'), ('p5', 'training')],
                   'validation': [('p4', 'training')],
                   'test': [('p1', 'training'), ('p2', 'training')]}
  counts = pipeline.prepare(args, str(tmp_path))
  got = _eval_all(args, tmp_path, 'test')
  assert len(got['case_id']) == counts['test']
  assert {nifti.parse_case_id(str(c))[0] for c in got['case_id']} == {'p1', 'p2'}
  # Another split file: other records (another cache), not the first one's.
  split.write_text(json.dumps({'train': ['p1', 'p2', 'p3'], 'test': ['p4', 'p5']}))
  pipeline.prepare(args, str(tmp_path))
  got = _eval_all(args, tmp_path, 'test')
  assert {nifti.parse_case_id(str(c))[0] for c in got['case_id']} == {'p4', 'p5'}
  split.write_text(json.dumps({'train': ['p1', 'p2', 'p3'], 'test': ['p4']}))
  with pytest.raises(DataError, match=r"data.split_file .*split\.json: case 'p5' \(and 0 "
                                      r'more\) of the data is in no split'):
    nifti.scan_source(args)


def test_nifti_write_back_restores_rater_volumes(nifti_set, tmp_path):
  args, base, vols, _ = nifti_set
  got = _eval_all(args, base, 'test')
  slices = {nifti.parse_case_id(str(c))[2]: (m > 0).astype(np.uint8)
            for c, m in zip(got['case_id'], got['masks'])}       # z -> [A = N, S, S]
  ref = nifti.reference_file(args, 'p4')
  assert ref.endswith('p4_flair.nii.gz')
  samples_path, freq_path = nifti.write_samples(str(tmp_path / 'out'), 'p4', slices, ref,
                                                axis=2)
  samples, freq = nib.load(samples_path), nib.load(freq_path)
  assert samples.shape == SHAPE + (2,) and freq.shape == SHAPE
  np.testing.assert_allclose(samples.affine, AFFINE, atol=1e-5)
  np.testing.assert_allclose(freq.affine, AFFINE, atol=1e-5)
  assert samples.get_data_dtype() == np.uint8 and freq.get_data_dtype() == np.float32
  data = np.asarray(samples.dataobj)
  v = vols['p4']
  raters = np.stack([v['mask1'] > 0.5, v['mask2'] > 0.5], -1)
  for z in range(SHAPE[2]):
    want = raters[:, :, z] if z in slices else np.zeros(SHAPE[:2] + (2,), bool)
    np.testing.assert_array_equal(data[:, :, z] > 0, want)
  np.testing.assert_allclose(np.asarray(freq.dataobj), data.mean(-1), atol=1e-6)
  assert not [n for n in os.listdir(tmp_path / 'out') if n.startswith('.tmp')]
  # One value per voxel along another axis: shape and affine of the reference.
  path = nifti.write_volume(str(tmp_path / 'one.nii'), {3: np.ones((28, 28), np.float32)},
                            ref, axis=0)
  one = nib.load(path)
  assert one.shape == SHAPE and np.allclose(one.affine, AFFINE, atol=1e-5)
  arr = np.asarray(one.dataobj)
  assert arr[3].sum() == SHAPE[1] * SHAPE[2] and arr.sum() == arr[3].sum()


def test_nifti_write_back_and_input_folders_refuse_what_they_cannot_place(nifti_set, tmp_path):
  """A channels-last slice [S, S, 1] (the batch layout) is not a slice: refused, naming
  the output and the reference, instead of padded into garbage; an input folder with
  no scan and no case folder, or none at all, is named."""
  args = nifti_set[0]
  ref = nifti.reference_file(args, 'p4')
  with pytest.raises(ValueError, match=r'^writing .*m\.nii\.gz \(reference .*p4_flair\.nii\.gz\): '
                     r'slice shapes \[\(24, 24, 1\)\]; expected all \[S, S\] or all \[N, S, S\]'):
    nifti.write_volume(str(tmp_path / 'm.nii.gz'), {3: np.ones((24, 24, 1))}, ref, axis=2)
  assert not os.path.exists(tmp_path / 'm.nii.gz')
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(DataError, match=r'^sampling.input_dir .*empty: holds no case folder'):
    nifti.input_case_folders(str(tmp_path / 'empty'), args)
  with pytest.raises(DataError, match=r"^sampling.input_dir '.*missing' .* does not exist"):
    nifti.input_case_folders(str(tmp_path / 'missing'), args)


def test_nifti_rater_mask_rule_by_hand():
  """0/1 and [0, 1] masks: foreground above 0.5; a mask of only 0 and 255:
  foreground at 255; bool volumes as they are."""
  probs = np.zeros((1, 1, 30), np.float32)                  # 3 of 30 fractional: 10%
  probs[0, 0, :5] = [0.0, 0.4, 0.5, 0.6, 1.0]
  np.testing.assert_array_equal(nifti.rater_mask(probs, 'w')[0, 0, :5], [0, 0, 0, 1, 1])
  assert not nifti.rater_mask(probs, 'w')[0, 0, 5:].any()
  np.testing.assert_array_equal(
      nifti.rater_mask(np.array([[[0, 255, 255, 0]]], np.uint8), 'w'), [[[0, 1, 1, 0]]])
  np.testing.assert_array_equal(
      nifti.rater_mask(np.array([[[0, 255, 0]]], np.int16), 'w'), [[[0, 1, 0]]])
  np.testing.assert_array_equal(
      nifti.rater_mask(np.array([[[True, False]]]), 'w'), [[[1, 0]]])
  with pytest.raises(DataError, match=r'^w: rater values range over \[0, 254\]'):
    nifti.rater_mask(np.array([[[0, 254]]], np.uint8), 'w')
  # A resampled mask: fractional edges on 10% of the voxels (the limit) still read;
  # a scan normalised to [0, 1] (fractional almost everywhere) is refused.
  edges = np.zeros((10, 10, 1), np.float32)
  edges[2:5, 2:5] = 1.0
  edges[1, 1:10, 0] = [0.2, 0.4, 0.6, 0.8, 0.3, 0.7, 0.5, 0.9, 0.1]
  edges[9, 9] = 0.95
  assert np.mean((edges > 0) & (edges < 1)) == nifti.MAX_FRACTIONAL
  np.testing.assert_array_equal(nifti.rater_mask(edges, 'w'), edges > 0.5)
  scan = np.random.default_rng(0).uniform(0, 1, (8, 8, 2)).astype(np.float32)
  scan[0] = 0.0
  with pytest.raises(DataError, match=r'^w: 88% of the voxels lie strictly between 0 and 1 '
                     r'\(an intensity scan matched by a rater pattern\?\)'):
    nifti.rater_mask(scan, 'w')


def test_nifti_case_with_no_kept_slice_is_named_in_a_warning(tmp_path, caplog):
  """A lesion-free scan with data.nifti_empty_fraction=0 contributes no slice: the
  split is still built, but the case is named in a warning, not dropped silently."""
  root, _ = _make_nifti_source(tmp_path / 'src', train=('p1', 'p2'), test=('p3', 'p5'))
  for rater in ('mask1', 'mask2'):
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), AFFINE),
             os.path.join(root, 'testing', 'p5', f'p5_{rater}.nii.gz'))
  args = DataArgs(name='nifti', source_dir=root, tfds_dir=str(tmp_path / 'tfds'),
                  image_size=24, image_channels=2, num_annotators=2, **NIFTI_PATTERNS)
  with caplog.at_level('WARNING'):
    nifti.validate(nifti.make_builder(args, str(tmp_path / 'tfds')))
  warned = [r.getMessage() for r in caplog.records if 'contribute no slice' in r.getMessage()]
  assert len(warned) == 1, [r.getMessage() for r in caplog.records]
  assert "split 'test': 1 of 2 case(s)" in warned[0]
  assert os.path.join(root, 'testing', 'p5') in warned[0]
  assert 'data.nifti_empty_fraction > 0' in warned[0]


def test_nifti_write_back_drops_the_scans_display_window(nifti_set, tmp_path):
  """A reference with cal_max 1500 (a CT/MR window) must not make 0/1 outputs show as
  black: the written volumes carry no display window."""
  ref_img = nib.load(nifti.reference_file(nifti_set[0], 'p4'))
  header = ref_img.header.copy()
  header['cal_min'], header['cal_max'] = -100.0, 1500.0
  ref = str(tmp_path / 'windowed.nii.gz')
  nib.save(nib.Nifti1Image(np.asarray(ref_img.dataobj), ref_img.affine, header), ref)
  assert nib.load(ref).header['cal_max'] == 1500.0
  out = nib.load(nifti.write_volume(str(tmp_path / 'm.nii.gz'),
                                    {3: np.ones((24, 24), np.uint8)}, ref, axis=2))
  assert (float(out.header['cal_min']), float(out.header['cal_max'])) == (0.0, 0.0)
  np.testing.assert_allclose(out.affine, AFFINE, atol=1e-5)


def _nifti_bad_source(root):
  return _make_nifti_source(root, train=('p1', 'p2'), test=('p3',))[0]


def _rm(rel):
  return lambda root: os.remove(os.path.join(root, rel))


def _save_vol(rel, vol, affine=AFFINE):
  return lambda root: nib.save(nib.Nifti1Image(vol, affine), os.path.join(root, rel))


def _write(rel, data):
  def fn(root):
    with open(os.path.join(root, rel), 'wb') as f:
      f.write(data)
  return fn


def _one_file_for_two_patterns(root):
  """p3's t1 and mask1 files replaced by one file that both patterns match."""
  os.remove(os.path.join(root, 'testing/p3/p3_t1.nii.gz'))
  os.rename(os.path.join(root, 'testing/p3/p3_mask1.nii.gz'),
            os.path.join(root, 'testing/p3/p3_t1_mask1.nii.gz'))


def _flip_case_x(case_rel):
  """Every file of one case rewritten with its first voxel axis pointing left (LAS
  instead of RAS): the same voxels, another orientation."""
  def fn(root):
    flipped = AFFINE.copy()
    flipped[0, 0] = -flipped[0, 0]
    folder = os.path.join(root, case_rel)
    for name in os.listdir(folder):
      img = nib.load(os.path.join(folder, name))
      data = np.asarray(img.dataobj)
      nib.save(nib.Nifti1Image(data, flipped), os.path.join(folder, name))
  return fn


_NAN = np.zeros(SHAPE, np.float32)
_NAN[1, 2, 3] = np.nan
_OUTSIDE = np.zeros(SHAPE, np.uint8)
_OUTSIDE[5, 0, 4] = 1          # column 0 is cropped away (24 of 28 columns kept)
_SHIFTED = AFFINE.copy()
_SHIFTED[0, 3] += 0.5
_MULTILABEL = np.zeros(SHAPE, np.uint8)
_MULTILABEL[6:9, 6:9, 4] = 1
_MULTILABEL[6:9, 6:9, 5] = 2    # another structure's label: not this rater's lesion
_EDGES_255 = np.zeros(SHAPE, np.uint8)
_EDGES_255[6:9, 6:9, 4] = 255
_EDGES_255[5, 6:9, 4] = 3      # a 0/255 mask resampled with linear interpolation
_NEGATIVE = np.zeros(SHAPE, np.float32)
_NEGATIVE[6:9, 6:9, 4] = 1.0
_NEGATIVE[0, 0, 0] = -1.0       # an 'ignore' label
NIFTI_BAD = {
    # name: (break, expected message parts (case folder relative to ROOT first))
    'pattern_matches_none': (_rm('training/p2/p2_mask2.nii.gz'),
                             ['training/p2', "'*mask2*'", 'matches 0 files',
                              'expected exactly one']),
    'pattern_matches_two': (_save_vol('training/p1/p1_mask2_b.nii.gz', _OUTSIDE),
                            ['training/p1', "'*mask2*'", 'matches 2 files',
                             'p1_mask2.nii.gz, p1_mask2_b.nii.gz']),
    'file_matches_two_patterns': (
        _one_file_for_two_patterns,
        ['testing/p3', 'p3_t1_mask1.nii.gz', "both '*t1*'", "'*mask1*'"]),
    'rater_shape': (_save_vol('testing/p3/p3_mask1.nii.gz', np.zeros((20, 28, 11), np.uint8)),
                    ['testing/p3', 'p3_mask1.nii.gz', '(20, 28, 11)', 'p3_flair.nii.gz',
                     'expected equal shapes']),
    'sequence_affine': (_save_vol('training/p2/p2_t1.nii.gz', np.zeros(SHAPE, np.float32),
                                  _SHIFTED),
                        ['training/p2', 'p2_t1.nii.gz', 'affine differs', '0.5']),
    'nan_voxels': (_save_vol('training/p1/p1_t1.nii.gz', _NAN),
                   ['training/p1', 'p1_t1.nii.gz', '1 voxel(s) are NaN']),
    'marks_cropped_away': (_save_vol('training/p2/p2_mask1.nii.gz', _OUTSIDE),
                           ['training/p2', 'p2_mask1.nii.gz', '1 marked voxel(s)',
                            '24x24 crop', 'data.image_size']),
    'volume_2d': (_save_vol('testing/p3/p3_flair.nii.gz', np.zeros((20, 28), np.int16)),
                  ['testing/p3', 'p3_flair.nii.gz', 'expected a 3-D volume']),
    'orientation_differs': (_flip_case_x('testing/p3'),
                            ['testing/p3', 'p3_flair.nii.gz', 'voxel axes are LAS',
                             "2 of 3 cases' are RAS", 'training/p1/p1_flair.nii.gz',
                             'one orientation']),
    'rater_multilabel': (_save_vol('training/p1/p1_mask2.nii.gz', _MULTILABEL),
                         ['training/p1', 'p1_mask2.nii.gz', 'rater values range over [0, 2]',
                          '(0, 1, 2)', 'expected a binary mask']),
    'rater_interpolated_255': (_save_vol('testing/p3/p3_mask1.nii.gz', _EDGES_255),
                               ['testing/p3', 'p3_mask1.nii.gz', '[0, 255]', '(0, 3, 255)',
                                'nearest neighbour']),
    'rater_negative': (_save_vol('training/p2/p2_mask1.nii.gz', _NEGATIVE),
                       ['training/p2', 'p2_mask1.nii.gz', '[-1, 1]', 'expected a binary mask']),
    'unreadable': (_write('training/p1/p1_mask1.nii.gz', b'not nifti'),
                   ['training/p1', 'p1_mask1.nii.gz', 'cannot read NIfTI']),
}


@pytest.mark.parametrize('kind', sorted(NIFTI_BAD))
def test_nifti_bad_case_names_folder_and_file(tmp_path, kind):
  root = _nifti_bad_source(tmp_path / 'src')
  breaker, parts = NIFTI_BAD[kind]
  breaker(root)
  tfds_dir = str(tmp_path / 'tfds')
  args = DataArgs(name='nifti', source_dir=root, tfds_dir=tfds_dir, image_size=24,
                  image_channels=2, num_annotators=2, **NIFTI_PATTERNS)
  parts = [os.path.join(root, parts[0])] + parts[1:]
  _raises_data_error(args, tfds_dir, tmp_path, parts)


# --------------------------------------------------------------------------- wide folder images


@pytest.fixture(scope='session')
def wide_folder(tmp_path_factory):
  """CIMD folder: a 16-bit PNG case, a float TIFF case, an 8-bit PNG case."""
  base = tmp_path_factory.mktemp('wide')
  rng = np.random.default_rng(4)
  img16 = rng.integers(200, 40000, (16, 16)).astype(np.uint16)
  img16[0, 0] = 65535                                          # outlier: clipped
  imgf = rng.normal(-3.0, 2.0, (16, 16)).astype(np.float32)
  img8 = rng.integers(0, 256, (16, 16)).astype(np.uint8)
  files = {('training', 'c0'): ('image_1.png', img16), ('training', 'c1'): ('image_1.tiff', imgf),
           ('testing', 'c2'): ('image_1.png', img8)}
  for (sub, case), (name, image) in files.items():
    d = base / 'src' / sub / case
    os.makedirs(d)
    Image.fromarray(image).save(d / name)
    for k in range(2):
      m = np.zeros((16, 16), np.uint8)
      m[3:9, 2 + k:10] = 255
      Image.fromarray(m).save(d / f'label{k}_.png')
  assert Image.open(base / 'src/training/c0/image_1.png').mode == 'I;16'
  assert Image.open(base / 'src/training/c1/image_1.tiff').mode == 'F'
  args = DataArgs(name='folder', source_dir=str(base / 'src'), tfds_dir=str(base / 'tfds'),
                  image_size=16, num_annotators=2)
  counts = pipeline.prepare(args, str(base))
  return args, base, {'c0': img16, 'c1': imgf, 'c2': img8}, counts


def test_folder_wide_images_use_percentile_rule(wide_folder):
  args, base, images, counts = wide_folder
  assert counts == {'train': 2, 'test': 1}
  train = _eval_all(args, base, 'train')
  assert list(train['case_id']) == ['c0', 'c1']
  for i, case in enumerate(['c0', 'c1']):
    want = _percentile_u8(images[case])
    assert want.min() == 0 and want.max() == 255
    np.testing.assert_allclose(train['image'][i, ..., 0], want / 127.5 - 1, atol=1e-6)
  # 8-bit images are kept byte for byte.
  test = _eval_all(args, base, 'test')
  np.testing.assert_allclose(test['image'][0, ..., 0], images['c2'] / 127.5 - 1, atol=1e-6)
  # Other percentiles: another cache, other values.
  other = dataclasses.replace(args, percentile_low=5.0, percentile_high=95.0)
  pipeline.prepare(other, str(base))
  got = _eval_all(other, base, 'train')['image'][0, ..., 0]
  np.testing.assert_allclose(got, _percentile_u8(images['c0'], 5, 95) / 127.5 - 1, atol=1e-6)


def _read_input(path, channels=1, resize=False, **data):
  """One input file through image_folder, as --mode=sample reads it."""
  case = image_folder.InputCase(os.path.splitext(os.path.basename(path))[0],
                                os.path.dirname(path), (os.path.basename(path),))
  args = DataArgs(name='synthetic', image_size=16, image_channels=channels, resize=resize,
                  **data)
  return image_folder.read_input_image(case, args)


def test_input_images_convert_like_training(wide_folder, tmp_path):
  args, base, images, _ = wide_folder
  src = os.path.join(args.source_dir, 'training')
  train = _eval_all(args, base, 'train')
  for i, (case, name) in enumerate((('c0', 'image_1.png'), ('c1', 'image_1.tiff'))):
    got = _read_input(os.path.join(src, case, name))
    np.testing.assert_allclose(got.image, train['image'][i], atol=1e-6)
    three = _read_input(os.path.join(src, case, name), channels=3)
    np.testing.assert_allclose(three.image, np.repeat(train['image'][i], 3, -1), atol=1e-6)
  path8 = os.path.join(args.source_dir, 'testing', 'c2', 'image_1.png')
  got8 = _read_input(path8)
  np.testing.assert_allclose(got8.image[..., 0], images['c2'] / 127.5 - 1, atol=1e-6)
  colour = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(colour).save(tmp_path / 'colour.png')
  with pytest.raises(image_folder.BadInputImage) as err:
    _read_input(str(tmp_path / 'colour.png'))
  assert 'colour.png' in str(err.value) and '3 channels' in str(err.value)
  grey_rgb = np.repeat(images['c2'][..., None], 3, -1)
  Image.fromarray(grey_rgb).save(tmp_path / 'grey.png')
  got = _read_input(str(tmp_path / 'grey.png'))
  np.testing.assert_allclose(got.image, got8.image, atol=1e-6)
  big = np.full((20, 20), 1000, np.uint16)
  big[:10] = 3000
  Image.fromarray(big).save(tmp_path / 'big.png')
  with pytest.raises(image_folder.BadInputImage, match=r'big\.png.*20x20.*expected 16x16'):
    _read_input(str(tmp_path / 'big.png'))
  resized = _read_input(str(tmp_path / 'big.png'), resize=True)
  assert resized.image.min() == -1.0 and resized.image.max() == 1.0   # not clipped at 255


def test_input_folder_ids_are_distinct_and_case_folders_stack_channels(tmp_path):
  """x.png, x.jpg and a case folder x get three ids; a case folder's image_* files
  stack as channels like the training reader's."""
  rng = np.random.default_rng(5)
  inputs = tmp_path / 'inputs'
  (inputs / 'x').mkdir(parents=True)
  first, second = (rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(2))
  Image.fromarray(first).save(inputs / 'x.png')
  Image.fromarray(first).save(inputs / 'x.jpg')
  Image.fromarray(first).save(inputs / 'x' / 'image_t2.png')
  Image.fromarray(second).save(inputs / 'x' / 'image_t10.png')
  Image.fromarray(second).save(inputs / 'x' / 'label0_.png')
  Image.fromarray(second).save(inputs / 'y.png')
  cases = image_folder.list_input_images(str(inputs))
  assert [c.case_id for c in cases] == ['x', 'x.jpg', 'x.png', 'y']
  # input_dir = one case folder: one input, its image_* files the channels (not one
  # input per channel file), its label files none.
  inside = image_folder.list_input_images(str(inputs / 'x'))
  assert inside == [cases[0]]
  args = DataArgs(name='synthetic', image_size=16, image_channels=2)
  stacked = image_folder.read_input_image(cases[0], args)
  np.testing.assert_allclose(stacked.image, np.stack([first, second], -1) / 127.5 - 1,
                             atol=1e-6)
  single = image_folder.read_input_image(cases[-1], args)   # one channel -> replicated
  np.testing.assert_allclose(single.image, np.repeat(second[..., None], 2, -1) / 127.5 - 1,
                             atol=1e-6)


def test_wide_inputs_are_refused_for_models_trained_on_fixed_scale_records(tmp_path):
  """A 16-bit PNG among the inputs of a model trained on LIDC pickle or HDF5 records
  (whose floats were scaled to 0..255 by a fixed rule, not the percentile rule wide
  inputs get) is refused, naming the file (skipped and listed with
  skip_bad_inputs); 8-bit inputs pass; a folder-trained model reads it by the
  percentile rule as in training."""
  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  rng = np.random.default_rng(2)
  Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(inputs / 'a.png')
  Image.fromarray(rng.integers(0, 65536, (16, 16)).astype(np.uint16)).save(inputs / 'b.png')
  s = helpers.settings(sampling__input_dir=str(inputs), data__image_size=16)
  for source in ('lidc_pickle', 'lidc_hdf5'):
    with pytest.raises(sample_inputs.InputError,
                       match=rf"b\.png: a 'I;16' image .* trained on {source} records"):
      sample_inputs.folder_inputs(s, source)
  skipping = dataclasses.replace(s, sampling=dataclasses.replace(s.sampling,
                                                                 skip_bad_inputs=True))
  read = sample_inputs.folder_inputs(skipping, 'lidc_pickle')
  assert [c.case_id for c in read.cases] == ['a'] and 'b.png' in read.skipped[0]
  both = sample_inputs.folder_inputs(s, 'folder')
  assert [c.case_id for c in both.cases] == ['a', 'b']
  assert both.cases[1].image.min() == -1.0 and both.cases[1].image.max() == 1.0


def test_folder_wide_image_with_nan_is_named(tmp_path):
  bad = np.zeros((16, 16), np.float32)
  bad[2, 2] = np.nan
  for sub in ('training', 'testing'):
    d = tmp_path / 'src' / sub / 'c0'
    os.makedirs(d)
    Image.fromarray(bad if sub == 'training' else np.zeros((16, 16), np.uint8)).save(
        d / ('image_1.tif' if sub == 'training' else 'image_1.png'))
    for k in range(2):
      Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / f'label{k}_.png')
  tfds_dir = str(tmp_path / 'tfds')
  args = DataArgs(name='folder', source_dir=str(tmp_path / 'src'), tfds_dir=tfds_dir,
                  image_size=16, num_annotators=2)
  _raises_data_error(args, tfds_dir, tmp_path, ['training/c0', 'image_1.tif', 'NaN',
                                                'expected finite'])


def test_multi_page_tiff_is_refused_not_read_as_its_first_page(tmp_path):
  """PIL opens a TIFF stack at page 0; three MR sequences in one file would become
  page 0 three times. Training and sampling readers refuse it, naming the file."""
  pages = [Image.fromarray(np.full((16, 16), v, np.float32)) for v in (1.0, 2.0, 3.0)]
  for sub in ('training', 'testing'):
    d = tmp_path / 'src' / sub / 'c0'
    os.makedirs(d)
    pages[0].save(d / 'image_1.tif', save_all=True, append_images=pages[1:])
    for k in range(2):
      Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / f'label{k}_.png')
  assert Image.open(d / 'image_1.tif').n_frames == 3
  tfds_dir = str(tmp_path / 'tfds')
  args = DataArgs(name='folder', source_dir=str(tmp_path / 'src'), tfds_dir=tfds_dir,
                  image_size=16, image_channels=3, num_annotators=2)
  _raises_data_error(args, tfds_dir, tmp_path, ['training/c0', 'image_1.tif', '3 pages',
                                                'one 2-D image per file'])
  with pytest.raises(image_folder.BadInputImage, match=r'image_1\.tif: holds 3 pages'):
    _read_input(str(d / 'image_1.tif'), channels=3)


# --------------------------------------------------------------------------- DataArgs


def test_cache_key_changes_with_every_parameter_that_changes_the_records(tmp_path):
  """Records are cached under a hash of builder_params: a data key that changes what
  is written (the split seed and fractions of the pickle reader, the HDF5 intensity
  range, the image size, ...) must change it, or a stale cache is silently reused."""
  pickle_path = tmp_path / 'a.pickle'
  pickle_path.write_bytes(b'')
  hdf5_path = tmp_path / 'a.h5'
  hdf5_path.write_bytes(b'')
  base = DataArgs(name='lidc_pickle', source_dir=str(tmp_path), image_size=16,
                  num_annotators=2, validation_fraction=0.2, test_fraction=0.2)
  changes = {'seed': 3, 'validation_fraction': 0.1, 'test_fraction': 0.3, 'image_size': 32,
             'num_annotators': 4, 'resize': True, 'image_channels': 3}
  key = lidc_pickle.builder_params(base, [str(pickle_path)])
  for field, value in changes.items():
    other = lidc_pickle.builder_params(dataclasses.replace(base, **{field: value}),
                                       [str(pickle_path)])
    assert other != key, field
  # Records split by an earlier rule (a NumPy permutation) are not reused.
  assert key['split_rule'] == splits.SPLIT_RULE
  unseeded = dataclasses.replace(base, validation_fraction=0.0, test_fraction=0.0)
  assert 'split_rule' not in lidc_pickle.builder_params(unseeded, [str(pickle_path)])
  base = dataclasses.replace(base, name='lidc_hdf5', source_dir=str(hdf5_path))
  key = lidc_hdf5.builder_params(base, str(hdf5_path))
  for field, value in {'hdf5_image_range': (0.0, 1.0), 'image_size': 32, 'resize': True,
                       'num_annotators': 4, 'image_channels': 3}.items():
    other = lidc_hdf5.builder_params(dataclasses.replace(base, **{field: value}),
                                     str(hdf5_path))
    assert other != key, field


def test_intensity_rule_falls_back_to_min_max_and_masks_threshold_above_127(monkeypatch):
  """A sparse scan (a few bright voxels in zeros) has equal 0.5 and 99.5 percentiles:
  the rule then maps [min, max] to [0, 255] instead of making the image black. A
  resized mask keeps a pixel whose grey level is above 127 (128) and drops one at 127."""
  from cimd_jax.data import intensity  # pylint: disable=g-import-not-at-top
  sparse = np.zeros((40, 40), np.float32)
  sparse[3, 4], sparse[10, 10] = 500.0, 250.0
  assert intensity.bounds(sparse, 0.5, 99.5) == (0.0, 500.0)
  out = intensity.to_uint8(sparse, 0.5, 99.5)
  assert out[3, 4] == 255 and out[10, 10] == 128 and out[0, 0] == 0
  np.testing.assert_array_equal(intensity.to_uint8(np.full((4, 4), 7.0), 0.5, 99.5), 0)
  for level, want in ((127, 0), (128, 1)):
    monkeypatch.setattr(intensity, 'resize_u8',
                        lambda grey, size, v=level: np.full((size, size), v, np.uint8))
    np.testing.assert_array_equal(intensity.resize_mask(np.ones((4, 4), np.uint8), 2), want)


def test_config_keys_equal_data_args_fields():
  config = default_config.get_config()
  fields = {f.name for f in dataclasses.fields(DataArgs)}
  assert set(config.data.keys()) == fields
  args = DataArgs(**config.data)
  assert args == DataArgs()
  listed = DataArgs(name='nifti', source_dir='/x', image_channels=2, num_annotators=1,
                    nifti_image_patterns=['*a*', '*b*'], nifti_rater_patterns=['*m*'],
                    hdf5_image_range=[0, 1])
  assert listed.nifti_image_patterns == ('*a*', '*b*') and hash(listed)
  assert listed.hdf5_image_range == (0.0, 1.0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(name='lidc'), 'data.name'),
    (dict(name='lidc_pickle'), 'data.source_dir'),
    (dict(name='lidc_hdf5'), 'data.source_dir'),
    (dict(test_fraction=1.0), r'data.test_fraction must be in \[0, 1\)'),
    (dict(split_file='s.json'), "data.split_file is only read by data.name='lidc_pickle' "
     "and 'nifti', got data.name='synthetic'"),
    (dict(hdf5_image_range=(1.0, 0.0)), 'data.hdf5_image_range'),
    (dict(hdf5_image_range=(0.0,)), 'data.hdf5_image_range must hold 2'),
    (dict(percentile_low=50, percentile_high=40), 'data.percentile_low'),
    (dict(percentile_high=101), 'data.percentile_high'),
    (dict(nifti_axis=3), 'data.nifti_axis must be 0, 1 or 2'),
    (dict(seed=-1), r'^data.seed must be >= 0, got -1$'),
    (dict(synthetic_seed=-2), r'^data.synthetic_seed must be >= 0, got -2$'),
    (dict(nifti_empty_fraction=1.5), r'data.nifti_empty_fraction must be in \[0, 1\]'),
    (dict(nifti_image_patterns='*flair*'), 'data.nifti_image_patterns must be a tuple'),
    (dict(name='nifti', source_dir='/x', nifti_image_patterns=('*a*', '*b*'),
          nifti_rater_patterns=('*m*',) * 4), 'data.nifti_image_patterns must hold'),
    (dict(name='nifti', source_dir='/x', nifti_image_patterns=('*a*',),
          nifti_rater_patterns=('*m*',)), 'data.nifti_rater_patterns must hold'),
    (dict(name='nifti', source_dir='/x', nifti_image_patterns=('*a*',),
          nifti_rater_patterns=('*m*',) * 4, resize=True), 'data.resize must be False'),
])
def test_data_args_checks_new_keys(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DataArgs(**kwargs)


def test_held_out_split_counts_and_errors():
  ids = [f'u{i}' for i in range(10)]
  out = splits.held_out_split(ids, 0.25, 0.2, seed=0, what='patient')
  assert [len(out[s]) for s in ('train', 'validation', 'test')] == [6, 2, 2]
  assert sorted(sum(out.values(), []), key=splits.natural_key) == ids
  assert splits.held_out_split(ids, 0.0, 0.0, 0, 'patient') == {'train': ids}
  with pytest.raises(folder.DataError, match='leave no training patient'):
    splits.held_out_split(ids[:2], 0.5, 0.5, 0, 'patient')


def _sha_order(ids, seed, salt):
  """docs/data.md's one-line rule, recomputed here."""
  return sorted(ids, key=lambda i: hashlib.sha256(f'{salt}:{seed}:{i}'.encode()).hexdigest())


def test_seeded_choices_follow_the_documented_sha256_rule_without_numpy(monkeypatch):
  """Held-out patients/cases, the folder layout's validation cases and NIfTI's empty
  slices are the first ids of the SHA-256 order (recomputed by hand), change with the
  seed, keep every other id's place when one id is added, and use no NumPy generator
  (whose permutation/choice algorithms may change between NumPy releases)."""
  def no_generator(*args, **kwargs):
    raise AssertionError('a seeded choice used np.random')
  monkeypatch.setattr(np.random, 'default_rng', no_generator)
  ids = [f'LIDC-{i:04d}' for i in range(40)]
  want = _sha_order(ids, 7, 'split')
  assert [ids[k] for k in splits.seeded_order(ids, 7, 'split')] == want
  assert _sha_order(ids, 8, 'split') != want and _sha_order(ids, 7, 'x') != want
  grown = _sha_order(ids + ['LIDC-9999'], 7, 'split')
  assert [i for i in grown if i != 'LIDC-9999'] == want
  out = splits.held_out_split(list(reversed(ids)), 0.25, 0.2, seed=7, what='patient')
  assert out['test'] == sorted(want[:8], key=splits.natural_key)            # n_test = 8
  assert out['validation'] == sorted(want[8:16], key=splits.natural_key)    # 0.25 * 32
  assert set(out['train']) == set(want[16:])
  names = [f'case{i}' for i in range(12)]
  held = folder.validation_cases(names, 0.25, seed=3)
  assert [names[k] for k in held] == sorted(_sha_order(names, 3, 'validation')[:3],
                                            key=names.index)
  marked = np.zeros(30, bool)
  marked[[4, 5, 6]] = True
  empty = [i for i in range(30) if not marked[i]]
  extra = _sha_order([f'c7:{i}' for i in empty], 5, 'empty_slices')[:9]   # 0.33 * 27
  assert list(nifti.kept_slices(marked, 0.33, seed=5, case='c7')) == sorted(
      [4, 5, 6] + [int(e.split(':')[1]) for e in extra])


def test_natural_order_is_total_for_names_equal_as_numbers():
  """'p01' and 'p1' are equal as numbers; the name breaks the tie, so the order (and
  so every seeded split, on every host) does not depend on the input order or on
  Python's per-process string hashing."""
  ids = ['p1', 'p01', 'p001', 'p2', 'p02', 'q', 'p10', 'p010']
  forward = sorted(ids, key=splits.natural_key)
  assert forward == sorted(reversed(ids), key=splits.natural_key)
  assert forward == ['p001', 'p01', 'p1', 'p02', 'p2', 'p010', 'p10', 'q']
  assert (splits.held_out_split(ids, 0.25, 0.25, 3, 'patient')
          == splits.held_out_split(ids[::-1], 0.25, 0.25, 3, 'patient'))
  # Characters that are digits to str.isdigit but not to the regex ('²', '①') are text.
  assert sorted(['case1²', 'case1', 'case①', 'case10'], key=splits.natural_key) == [
      'case1', 'case1²', 'case10', 'case①']


def test_missing_validation_split_hint_names_what_decides_it(tmp_path):
  """The hint says what gives a 'validation' split for this reader."""
  h5 = tmp_path / 'src' / 'd.hdf5'
  os.makedirs(h5.parent)
  images = np.full((2, 16, 16), -0.5)      # air: the lower end of PHiSeg's range
  labels = np.zeros((2, 16, 16, 2), np.uint8)
  _write_hdf5(h5, {'train': (images, labels), 'test': (images, labels)})
  args = DataArgs(name='lidc_hdf5', source_dir=str(h5.parent), tfds_dir=str(tmp_path / 'tfds'),
                  image_size=16, num_annotators=2)
  with pytest.raises(ConfigError, match=r"^split 'validation' does not exist; this dataset "
                     r"has \('train', 'test'\) \(the HDF5 file has no 'val' group\)$"):
    pipeline.num_examples(args, str(tmp_path), "validation")
  synthetic = DataArgs(name='synthetic', image_size=16, num_annotators=2,
                       synthetic_num_train=4, synthetic_num_test=2,
                       tfds_dir=str(tmp_path / 'tfds'))
  with pytest.raises(ConfigError, match=r'\(set data.validation_fraction > 0 for a '
                     r'validation split\)$'):
    pipeline.num_examples(synthetic, str(tmp_path), "validation")


def test_inputs_follow_how_training_cases_held_their_channels(tmp_path, caplog):
  """A two-channel folder model trained on cases of two image_* files (recorded in
  data_records.json): an unlabelled case folder given as input_dir is one input (not
  one replicated input per file), and a lone single-channel file is refused instead
  of being replicated into both channels. A model trained on one file per case (here
  LIDC pickle records, replicated) refuses a case of several files."""
  rng = np.random.default_rng(8)
  planes = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(2)]
  for sub, case in (('training', 'c0'), ('testing', 'c1')):
    d = tmp_path / 'src' / sub / case
    os.makedirs(d)
    for k, plane in enumerate(planes):
      Image.fromarray(plane).save(d / f'image_{k}.png')
    for k in range(2):
      Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / f'label{k}_.png')
  s = helpers.settings(str(tmp_path / 'tfds'), data__name='folder',
                       data__source_dir=str(tmp_path / 'src'), data__image_size=16,
                       data__image_channels=2, data__num_annotators=2)
  run = str(tmp_path / 'run')
  os.makedirs(run)
  assert provenance.image_files_per_case(run) is None
  with open(os.path.join(run, provenance.FILE), 'w') as f:   # written before the count was
    name = pipeline.records_name(s.data, run)
    json.dump({'records': [name], 'cases': [name]}, f)
  provenance.record_training(s.data, run)                      # resumed: the count is added
  assert provenance.image_files_per_case(run) == 2
  assert provenance.trained_on(run) == [pipeline.records_name(s.data, run)]
  case = tmp_path / 'inputs' / 'x'
  os.makedirs(case)
  for k, plane in enumerate(planes):
    Image.fromarray(plane).save(case / f'image_{k}.png')
  one = dataclasses.replace(s, sampling=dataclasses.replace(s.sampling, input_dir=str(case)))
  read = sample_inputs.folder_inputs(one, 'folder', provenance.image_files_per_case(run))
  assert [c.case_id for c in read.cases] == ['x']
  np.testing.assert_allclose(read.cases[0].image, np.stack(planes, -1) / 127.5 - 1,
                             atol=1e-6)
  # Not recorded (a checkpoint trained before the count was): read as before, each
  # file its own input, but one warning names the inputs copied into both channels.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert len(sample_inputs.folder_inputs(one, 'folder').cases) == 2
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and '2 input(s) (image_0, image_1)' in warned[0]
  assert 'copied into all 2 channels' in warned[0]
  # One file holding both channels (grey + alpha: 2 bands) is a valid input.
  both = tmp_path / 'both'
  os.makedirs(both)
  Image.fromarray(np.stack(planes, -1), mode='LA').save(both / 'scan.png')
  read = sample_inputs.folder_inputs(
      dataclasses.replace(s, sampling=dataclasses.replace(s.sampling, input_dir=str(both))),
      'folder', 2)
  np.testing.assert_allclose(read.cases[0].image, np.stack(planes, -1) / 127.5 - 1,
                             atol=1e-6)
  # A folder holding case folders and two image_* files of its own: the two are not
  # grouped into one input (only a folder whose only images they are is a case).
  mixed = tmp_path / 'mixed'
  shutil.copytree(case, mixed / 'x')
  for k, plane in enumerate(planes):
    Image.fromarray(plane).save(mixed / f'image_{k}.png')
  assert [c.images for c in image_folder.list_input_images(str(mixed), 2)] == [
      ('image_0.png',), ('image_1.png',), ('image_0.png', 'image_1.png')]
  # Nor three image_* files for two channels, nor two beside another image file.
  for extra in ('image_2.png', 'other.png'):
    flat = tmp_path / f'flat_{extra}'
    shutil.copytree(case, flat)
    Image.fromarray(planes[0]).save(flat / extra)
    assert all(len(c.images) == 1 for c in image_folder.list_input_images(str(flat), 2))
  Image.fromarray(planes[0]).save(tmp_path / 'inputs' / 'lone.png')
  several = dataclasses.replace(s, sampling=dataclasses.replace(
      s.sampling, input_dir=str(tmp_path / 'inputs')))
  with pytest.raises(sample_inputs.InputError,
                     match=r"lone\.png: one single-channel image; the model was trained on cases "
                           r"of 2 image_\* files"):
    sample_inputs.folder_inputs(several, 'folder', 2)
  with pytest.raises(sample_inputs.InputError,
                     match=r"inputs/x: 2 image files \(image_0\.png, image_1\.png\); the "
                           r"model was trained on one image file per case"):
    sample_inputs.folder_inputs(several, 'lidc_pickle')


def test_case_copied_into_both_splits_is_refused(tmp_path):
  """training/c0 and testing/c0 holding the same image bytes (a copy: the model would
  be scored on an image it trained on) is refused naming both; the same name with
  another image (splits numbered separately) is two cases, even where only one of
  its channel files differs and the files have equal sizes and times."""
  rng = np.random.default_rng(4)
  planes = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(2)]
  for sub in ('training', 'testing'):
    d = tmp_path / 'src' / sub / 'c0'
    os.makedirs(d)
    for k, plane in enumerate(planes):
      Image.fromarray(plane).save(d / f'image_{k}.png', compress_level=0)
    for k in range(2):
      Image.fromarray(np.zeros((16, 16), np.uint8)).save(d / f'label{k}_.png')
  tfds_dir = str(tmp_path / 'tfds')
  args = DataArgs(name='folder', source_dir=str(tmp_path / 'src'), tfds_dir=tfds_dir,
                  image_size=16, image_channels=2, num_annotators=2)
  _raises_data_error(args, tfds_dir, tmp_path, [
      'testing/c0', 'training/c0', 'holds the same image file(s)',
      'expected each case in one split'])
  # Also when the training case was held out for validation.
  scanned = {split: folder.scan_split_folder(str(tmp_path / 'src' / sub), 2)
             for split, sub in (('train', 'training'), ('test', 'testing'))}
  with pytest.raises(folder.DataError, match='holds the same image file'):
    folder.check_split_copies({'train': [], 'validation': scanned['train'],
                               'test': scanned['test']})
  changed = tmp_path / 'src' / 'testing' / 'c0' / 'image_1.png'
  Image.fromarray(255 - planes[1]).save(changed, compress_level=0)
  same = tmp_path / 'src' / 'training' / 'c0' / 'image_1.png'
  assert os.path.getsize(changed) == os.path.getsize(same)
  os.utime(changed, ns=(os.stat(same).st_atime_ns, os.stat(same).st_mtime_ns))
  pipeline.prepare(args, str(tmp_path))
  assert [c.case_id for c in folder.scan_source(args)['test']] == ['c0']


def test_empty_slices_are_refused_even_with_resize(tmp_path):
  """With data.resize=True any slice size is accepted, but a slice with no rows or
  columns would become an all-black record with empty masks: both readers refuse it,
  naming the file and key."""
  table = _small_records()
  _edit('p2_s1', image=np.zeros((0, 16)), masks=[np.zeros((0, 16))] * 2)(table)
  root = _write_pickles(tmp_path / 'pickles', table, num_files=1)
  tfds_dir = str(tmp_path / 'tfds_pickle')
  args = DataArgs(name='lidc_pickle', source_dir=root, tfds_dir=tfds_dir, image_size=16,
                  num_annotators=2, resize=True)
  _raises_data_error(args, tfds_dir, tmp_path, [
      os.path.join(root, 'part0.pickle'), "'p2_s1'", "'image'", '(0, 16)', 'H, W > 0'])
  groups = _small_groups()
  groups['test'] = (np.zeros((4, 16, 0)), np.zeros((4, 16, 0, 2), np.uint8))
  os.makedirs(tmp_path / 'h5')
  path = _write_hdf5(tmp_path / 'h5' / 'data_lidc.hdf5', groups)
  tfds_dir = str(tmp_path / 'tfds_h5')
  args = DataArgs(name='lidc_hdf5', source_dir=path, tfds_dir=tfds_dir, image_size=16,
                  num_annotators=2, resize=True)
  _raises_data_error(args, tfds_dir, tmp_path, [path, "'test/images'", '(4, 16, 0)',
                                                'expected N, H, W > 0'])


def test_input_subfolder_without_images_is_named(tmp_path, caplog):
  """A sub-folder of input_dir with no image_* file (slice1.png) is not an input: one
  warning names it instead of dropping it silently."""
  inputs = tmp_path / 'inputs'
  (inputs / 'patientX').mkdir(parents=True)
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(inputs / 'patientX' / 'slice1.png')
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(inputs / 'a.png')
  with caplog.at_level(logging.WARNING):
    cases = image_folder.list_input_images(str(inputs))
  assert [c.case_id for c in cases] == ['a']
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and 'patientX' in warned[0] and 'without image_*' in warned[0]
