"""Data: CIMD folder builder, synthetic generator, grain pipelines, bad input.

Datasets are prepared once per session (session-scoped fixtures in temporary dirs).
"""

import collections
import glob
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from tests.conftest import LIDC_SAMPLE
from cimd_jax.data import DataArgs
from cimd_jax.data import folder
from cimd_jax.data import in_memory
from cimd_jax.data import pipeline
from cimd_jax.data import records
from cimd_jax.data import synthetic

HAVE_LIDC = os.path.isdir(os.path.join(LIDC_SAMPLE, 'training'))
needs_lidc = pytest.mark.skipif(
    not HAVE_LIDC, reason=f'real LIDC sample not found at {LIDC_SAMPLE}')


def _complete_datasets(tfds_dir) -> list[str]:
  """Prepared datasets a later run would read as complete."""
  return glob.glob(os.path.join(str(tfds_dir), '*', '*', '*', 'dataset_info.json'))


def _files(tfds_dir) -> list[str]:
  return [p for p in glob.glob(os.path.join(str(tfds_dir), '**'), recursive=True)
          if os.path.isfile(p)]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='session')
def lidc(tmp_path_factory):
  if not HAVE_LIDC:
    pytest.skip(f'real LIDC sample not found at {LIDC_SAMPLE}')
  workdir = str(tmp_path_factory.mktemp('lidc'))
  args = DataArgs(name='folder', source_dir=LIDC_SAMPLE, image_size=128, image_channels=1,
                  num_annotators=4)
  counts = pipeline.prepare(args, workdir)
  return args, workdir, counts


@pytest.fixture(scope='session')
def syn(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('syn'))
  args = DataArgs(name='synthetic', image_size=32, image_channels=1, num_annotators=4,
                  synthetic_num_train=48, synthetic_num_test=10, synthetic_seed=7, seed=3)
  counts = pipeline.prepare(args, workdir)
  return args, workdir, counts


def _write_case(case_dir, size=16, num_labels=2, seed=0, ext='png'):
  os.makedirs(case_dir)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
      os.path.join(case_dir, f'image_1.{ext}'))
  for i in range(num_labels):
    m = np.zeros((size, size), np.uint8)
    m[3:8 + i, 4:9] = 255
    Image.fromarray(m).save(os.path.join(case_dir, f'label{i}_.{ext}'))


def make_cimd_folder(root, num_train=4, num_test=2, size=16, num_labels=2) -> str:
  """A small valid CIMD folder: case_0..case_{n-1} in training/ and testing/."""
  for sub, n in (('training', num_train), ('testing', num_test)):
    for c in range(n):
      _write_case(os.path.join(str(root), sub, f'case_{c}'), size, num_labels,
                  seed=c + 100 * (sub == 'testing'))
  return str(root)


def folder_args(root, tfds_dir, **kw) -> DataArgs:
  base = dict(name='folder', source_dir=str(root), tfds_dir=str(tfds_dir), image_size=16,
              image_channels=1, num_annotators=2)
  base.update(kw)
  return DataArgs(**base)


def _eval_all(args, workdir, split, batch_size=4, **kw):
  batches = list(pipeline.eval_batches(args, workdir, split, batch_size, **kw))
  out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  return batches, out


# --------------------------------------------------------------------------- real LIDC


@needs_lidc
def test_lidc_counts(lidc):
  args, workdir, counts = lidc
  assert counts == {'train': 19, 'test': 9}
  assert pipeline.num_examples(args, workdir, 'train') == 19
  _, test = _eval_all(args, workdir, 'test')
  assert test['masks'].shape == (9, 4, 128, 128)
  assert test['image'].shape == (9, 128, 128, 1)


@needs_lidc
@pytest.mark.parametrize('split,sub', [('train', 'training'), ('test', 'testing')])
def test_lidc_masks_match_direct_reading_at_127(lidc, split, sub):
  args, workdir, _ = lidc
  _, got = _eval_all(args, workdir, split, batch_size=5)
  cases = sorted(os.listdir(os.path.join(LIDC_SAMPLE, sub)), key=int)
  assert list(got['case_id']) == cases          # natural order, every case once
  above_0 = above_127 = 0
  for i, case in enumerate(cases):
    case_dir = os.path.join(LIDC_SAMPLE, sub, case)
    image_file = [f for f in os.listdir(case_dir) if f.startswith('image_')][0]
    image = np.asarray(Image.open(os.path.join(case_dir, image_file)), np.float32)
    np.testing.assert_allclose(got['image'][i, ..., 0], image / 127.5 - 1.0, atol=1e-6)
    for k in range(4):
      raw = np.asarray(Image.open(os.path.join(case_dir, f'label{k}_.jpg')))
      direct = raw > 127
      ours = got['masks'][i, k] > 0
      assert int(ours.sum()) == int(direct.sum()), (case, k)
      np.testing.assert_array_equal(ours, direct)
      above_0 += int((raw > 0).sum())
      above_127 += int(direct.sum())
  # Defect 3 of the official code: '> 0' counts JPEG ringing as foreground.
  assert above_0 > 1.3 * above_127


@needs_lidc
def test_lidc_empty_expert_masks_survive_pipeline(lidc):
  args, workdir, _ = lidc
  _, train = _eval_all(args, workdir, 'train')
  empty = (train['masks'] > 0).reshape(19, 4, -1).sum(-1) == 0
  assert empty.any(), 'the sample has cases where an expert drew nothing'
  it = pipeline.train_iterator(args, workdir, global_batch_size=19)
  seen_empty = 0
  for _ in range(4):   # 4 epochs, one batch each
    batch = next(it)
    assert batch['image'].shape == (19, 128, 128, 1)
    assert batch['mask'].shape == (19, 128, 128, 1)
    assert np.all(np.isfinite(batch['mask']))
    assert set(np.unique(batch['mask'])) <= {-1.0, 1.0}
    seen_empty += int(np.sum(np.all(batch['mask'] < 0, axis=(1, 2, 3))))
  assert seen_empty > 0


@needs_lidc
def test_lidc_validation_split_is_seeded_case_level(lidc, tmp_path):
  base, _, _ = lidc
  ids = {}
  for seed in (0, 0, 1):
    args = DataArgs(**{**base.__dict__, 'validation_fraction': 0.2, 'seed': seed,
                       'tfds_dir': str(tmp_path / 'tfds')})
    counts = pipeline.prepare(args, str(tmp_path))
    assert counts == {'train': 15, 'validation': 4, 'test': 9}
    train = _eval_all(args, str(tmp_path), 'train')[1]['case_id']
    val = _eval_all(args, str(tmp_path), 'validation')[1]['case_id']
    assert not set(train) & set(val)
    assert sorted(set(train) | set(val), key=int) == sorted(
        os.listdir(os.path.join(LIDC_SAMPLE, 'training')), key=int)
    ids.setdefault(seed, []).append(tuple(val))
  assert ids[0][0] == ids[0][1]
  assert ids[0][0] != ids[1][0]
  with pytest.raises(ValueError, match='validation_fraction'):
    pipeline.eval_batches(base, lidc[1], 'validation', 4).__next__()


# --------------------------------------------------------------------------- synthetic


def test_synthetic_case_is_deterministic():
  args = DataArgs(name='synthetic', image_size=32, num_annotators=4)
  a = synthetic.make_case(args, 'train', 5)
  b = synthetic.make_case(args, 'train', 5)
  c = synthetic.make_case(args, 'test', 5)
  for k in ('image', 'masks', 'structures', 'structure_probs'):
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a['image'], c['image'])
  assert a['image'].shape == (32, 32, 1) and a['image'].dtype == np.uint8
  assert a['masks'].shape == (4, 32, 32) and a['masks'].dtype == np.uint8
  assert a['structures'].shape == (3, 32, 32)
  assert a['structure_probs'].dtype == np.float32
  for size in (16, 64, 128):
    case = synthetic.generate_case(np.random.default_rng(0), size, 2, image_channels=3)
    assert case['image'].shape == (size, size, 3)
    assert case['masks'].shape == (2, size, size)


def _structure_stats(cases):
  """Per valid structure: (p, coverage of its region by each expert mask)."""
  probs, cover = [], []
  for case in cases:
    masks = case['masks'].astype(bool)
    for region, p in zip(case['structures'], case['structure_probs']):
      if p < 0:
        assert not region.any(), 'padding slots have an empty region'
        continue
      region = region.astype(bool)
      assert region.sum() >= 4
      probs.append(float(p))
      cover.append(masks[:, region].mean(1))
  return np.array(probs), np.stack(cover)


def _check_frequencies(probs, included):
  """Empirical inclusion frequency per p level within 4 binomial sd."""
  total = 0
  for p in synthetic.PROB_LEVELS:
    draws = included[probs == p].ravel()
    total += draws.size
    sd = np.sqrt(p * (1 - p) / draws.size)
    assert abs(draws.mean() - p) < 4 * sd + 1e-9, (p, draws.mean(), draws.size)
  assert total >= 2000
  assert not included[probs == 0].any(), 'a decoy was drawn'


def test_synthetic_expert_frequencies_match_stored_probabilities():
  args = DataArgs(name='synthetic', image_size=32, num_annotators=4, synthetic_seed=11)
  cases = [synthetic.make_case(args, 'train', i) for i in range(700)]
  probs, cover = _structure_stats(cases)
  # An expert either draws the whole region or none of it: inclusion is unambiguous.
  assert np.all((cover == 0) | (cover == 1))
  _check_frequencies(probs, cover == 1)
  assert (probs == 0).sum() > 100                       # decoys exist
  assert set(np.unique(probs)) == {0.0, 0.25, 0.5, 0.75}
  # The main lesion: every expert draws it, boundaries differ between experts.
  differ = 0
  for i, case in enumerate(cases[:200]):
    params = synthetic.sample_params(synthetic.case_rng(11, 'train', i), 32)
    core = synthetic.region(params.lesion, 32, grow=-1.0)
    outer = synthetic.region(params.lesion, 32, grow=1.0)
    masks = case['masks'].astype(bool)
    assert masks[:, core].all()
    differ += int(any(not np.array_equal(masks[0] & outer, m & outer) for m in masks[1:]))
  assert differ > 150


def test_synthetic_probability_is_readable_from_image():
  args = DataArgs(name='synthetic', image_size=32, num_annotators=2)
  means = {p: [] for p in (0.0,) + synthetic.PROB_LEVELS}
  background = []
  for i in range(300):
    case = synthetic.make_case(args, 'test', i)
    image = case['image'][..., 0].astype(np.float32)
    for region, p in zip(case['structures'], case['structure_probs']):
      if p >= 0:
        means[float(p)].append(image[region.astype(bool)].mean())
    background.append(np.median(image))
  levels = [means[p] for p in synthetic.PROB_LEVELS]
  for lo, hi in zip(levels, levels[1:]):
    assert max(lo) < min(hi)          # contrast separates the p levels exactly
  assert max(means[0.0]) < min(background) < min(levels[0])   # decoys are dark


def test_oracle_masks_agree_in_distribution():
  args = DataArgs(name='synthetic', image_size=32, num_annotators=4, synthetic_seed=5)
  cases, oracle = [], []
  for i in range(250):
    case = synthetic.make_case(args, 'test', i)
    draws = synthetic.oracle_masks(args, 'test', i, num_draws=12, seed=9)
    assert draws.shape == (12, 32, 32) and draws.dtype == np.uint8
    cases.append(case)
    oracle.append({**case, 'masks': draws})
  probs, cover = _structure_stats(oracle)
  assert np.all((cover == 0) | (cover == 1))
  _check_frequencies(probs, cover == 1)
  # Same distribution as the stored experts (pooled over all structures of a level).
  e_probs, e_cover = _structure_stats(cases)
  for p in synthetic.PROB_LEVELS:
    f_oracle, f_expert = (cover[probs == p] == 1).mean(), (e_cover[e_probs == p] == 1).mean()
    assert abs(f_oracle - f_expert) < 0.08, p
  again = synthetic.oracle_masks(args, 'test', 3, 12, seed=9)
  other = synthetic.oracle_masks(args, 'test', 3, 12, seed=10)
  np.testing.assert_array_equal(again, oracle[3]['masks'])
  assert not np.array_equal(again, other)


def test_synthetic_records_equal_generator(syn):
  args, workdir, counts = syn
  assert counts == {'train': 48, 'test': 10}
  batches, test = _eval_all(args, workdir, 'test', batch_size=4)
  assert [len(b['image']) for b in batches] == [4, 4, 2]   # last batch kept, smaller
  assert test['structures'].dtype == np.uint8 and test['structures'].shape == (10, 3, 32, 32)
  assert test['structure_probs'].dtype == np.float32
  for i in range(10):
    case = synthetic.make_case(args, 'test', i)
    assert test['case_id'][i] == case['case_id'] == f'test_{i:05d}'
    np.testing.assert_allclose(test['image'][i], case['image'] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(test['masks'][i], case['masks'] * 2.0 - 1.0)
    np.testing.assert_array_equal(test['structures'][i], case['structures'])
    np.testing.assert_array_equal(test['structure_probs'][i], case['structure_probs'])


def test_cache_is_reused_and_keyed_by_parameters(syn, tmp_path):
  args, workdir, _ = syn
  path = synthetic.make_builder(args, args.cache_dir(workdir)).data_path
  info = os.path.join(os.fspath(path), 'dataset_info.json')
  stamp = os.stat(info).st_mtime_ns
  assert pipeline.prepare(args, workdir) == {'train': 48, 'test': 10}
  assert os.stat(info).st_mtime_ns == stamp            # reused, not rebuilt
  params = json.load(open(os.path.join(os.fspath(path), 'cimd_params.json')))
  assert params['synthetic_seed'] == 7 and params['image_size'] == 32
  names = {path.parent.name}
  for change in ({'synthetic_seed': 8}, {'image_size': 64}, {'num_annotators': 3},
                 {'image_channels': 3}, {'synthetic_num_train': 40}):
    other = DataArgs(**{**args.__dict__, **change})
    names.add(synthetic.make_builder(other, str(tmp_path)).data_path.parent.name)
  assert len(names) == 6
  # A default tfds_dir lives under WORKDIR/tfds.
  assert DataArgs().cache_dir('/w') == '/w/tfds'


def test_synthetic_validation_split(tmp_path):
  args = DataArgs(name='synthetic', image_size=16, num_annotators=3, synthetic_num_train=20,
                  synthetic_num_test=4, validation_fraction=0.25, tfds_dir=str(tmp_path))
  assert pipeline.prepare(args, str(tmp_path)) == {'train': 20, 'validation': 5, 'test': 4}
  _, val = _eval_all(args, str(tmp_path), 'validation')
  assert list(val['case_id']) == [f'validation_{i:05d}' for i in range(5)]
  np.testing.assert_array_equal(
      val['masks'][2], synthetic.make_case(args, 'validation', 2)['masks'] * 2.0 - 1.0)


# --------------------------------------------------------------------------- train pipeline


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_batches_format_and_expert_masks(syn):
  args, workdir, _ = syn
  it = pipeline.train_iterator(args, workdir, global_batch_size=8)
  batch = next(it)
  assert batch['image'].shape == (8, 32, 32, 1) and batch['image'].dtype == np.float32
  assert batch['mask'].shape == (8, 32, 32, 1) and batch['mask'].dtype == np.float32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  assert set(np.unique(batch['mask'])) <= {-1.0, 1.0}
  for i in range(8):
    index = int(str(batch['case_id'][i]).split('_')[1])
    case = synthetic.make_case(args, 'train', index)
    expert = int(batch['expert'][i])
    np.testing.assert_array_equal(batch['mask'][i, ..., 0],
                                  case['masks'][expert] * 2.0 - 1.0)
    np.testing.assert_allclose(batch['image'][i], case['image'] / 127.5 - 1.0, atol=1e-6)


def test_train_order_is_seeded_epochs_cover_split(syn):
  args, workdir, _ = syn
  a = _take(pipeline.train_iterator(args, workdir, 8), 12)
  b = _take(pipeline.train_iterator(args, workdir, 8), 12)
  _same(a, b)
  epoch1 = np.concatenate([x['case_id'] for x in a[:6]])
  epoch2 = np.concatenate([x['case_id'] for x in a[6:]])
  everything = sorted(f'train_{i:05d}' for i in range(48))
  assert sorted(epoch1) == everything and sorted(epoch2) == everything
  assert list(epoch1) != list(epoch2)                       # reshuffled each epoch
  assert list(epoch1) != everything                         # shuffled at all
  other = DataArgs(**{**args.__dict__, 'seed': args.seed + 1})
  c = _take(pipeline.train_iterator(other, workdir, 8), 6)
  assert list(np.concatenate([x['case_id'] for x in c])) != list(epoch1)


def test_expert_draws_vary_per_epoch_and_are_uniform(syn):
  args, workdir, _ = syn
  batches = _take(pipeline.train_iterator(args, workdir, 8), 60)   # 10 epochs
  drawn: dict[str, list[int]] = {}
  for b in batches:
    for cid, e in zip(b['case_id'], b['expert']):
      drawn.setdefault(str(cid), []).append(int(e))
  assert all(len(v) == 10 for v in drawn.values())
  assert np.mean([len(set(v)) for v in drawn.values()]) > 2.5
  counts = np.bincount(np.concatenate([b['expert'] for b in batches]), minlength=4)
  assert np.all(np.abs(counts - 120) < 4 * np.sqrt(480 * 0.25 * 0.75))


def test_in_memory_split_gives_the_files_batches(syn, monkeypatch):
  """A split held in memory (data.in_memory) yields exactly the batches read from the
  files, over two epochs, and resumes from the same state."""
  args, workdir, _ = syn
  source = pipeline._source(args, workdir, 'train')
  held = in_memory.maybe_in_memory(source)
  assert isinstance(held, in_memory.InMemorySource) and len(held) == len(source) == 48
  for i in (0, 17, 47):
    assert set(held[i]) == set(source[i])
    for k in source[i]:
      np.testing.assert_array_equal(held[i][k], source[i][k])
  reads = []

  class Counting:   # the split's source, counting reads by record index
    def __len__(self):
      return len(source)

    def __getitem__(self, i):
      reads.append(i)
      return source[i]

  monkeypatch.setattr(pipeline, '_source', lambda *a: Counting())
  cached = pipeline.train_iterator(args, workdir, 8)
  from_memory = _take(cached, 12)                           # two epochs
  assert sorted(reads) == [0] + list(range(48))             # size probe, then once each
  reads.clear()
  from_files = _take(pipeline.train_iterator(args, workdir, 8, in_memory_max_bytes=0), 12)
  assert min(collections.Counter(reads)[i] for i in range(48)) >= 2   # once per epoch
  _same(from_memory, from_files)
  resumed = pipeline.train_iterator(args, workdir, 8, in_memory_max_bytes=0)
  resumed.set_state(json.loads(json.dumps(cached.get_state())))
  _same(_take(resumed, 2), _take(cached, 2))


def test_in_memory_only_below_its_size_cap():
  records = [{'image': np.zeros((4, 4), np.float32), 'masks': np.zeros((2, 4, 4), np.uint8),
              'case_id': b'c'} for _ in range(10)]
  per_record = 64 + 32 + 1
  assert in_memory.record_bytes(records[0]) == per_record
  assert isinstance(in_memory.maybe_in_memory(records, 10 * per_record),
                    in_memory.InMemorySource)
  assert in_memory.maybe_in_memory(records, 10 * per_record - 1) is records
  assert in_memory.maybe_in_memory(records, 0) is records
  assert in_memory.maybe_in_memory([], 1000) == []


def test_train_iterator_state_resumes_exact_sequence(syn):
  args, workdir, _ = syn
  it = pipeline.train_iterator(args, workdir, 8)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))        # what a checkpoint stores
  expected = _take(it, 5)                               # crosses the epoch boundary
  resumed = pipeline.train_iterator(args, workdir, 8)
  resumed.set_state(state)
  _same(_take(resumed, 5), expected)


def test_train_process_slices_are_disjoint_and_cover(syn):
  args, workdir, _ = syn
  per_process = []
  for index in range(2):
    it = pipeline.train_iterator(args, workdir, global_batch_size=8, process_index=index,
                                 process_count=2)
    first_epoch = _take(it, 6)     # 24 examples per process, 4 per batch
    assert all(b['image'].shape[0] == 4 for b in first_epoch)
    ids = np.concatenate([b['case_id'] for b in first_epoch])
    assert len(set(ids)) == 24
    per_process.append(set(ids))
  assert not per_process[0] & per_process[1]
  assert per_process[0] | per_process[1] == {f'train_{i:05d}' for i in range(48)}
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    pipeline.train_iterator(args, workdir, global_batch_size=8, process_index=0,
                            process_count=3)


def test_train_iterator_with_worker_processes_matches_in_process(syn):
  args, workdir, _ = syn
  expected = _take(pipeline.train_iterator(args, workdir, 8), 4)
  mp_args = DataArgs(**{**args.__dict__, 'worker_count': 1})
  it = pipeline.train_iterator(mp_args, workdir, 8)
  try:
    got = _take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    got += _take(it, 2)
  finally:
    it.close()
  _same(got, expected)
  it = pipeline.train_iterator(mp_args, workdir, 8)
  try:
    it.set_state(state)
    _same(_take(it, 2), expected[2:])
  finally:
    it.close()


# --------------------------------------------------------------------------- eval pipeline


def test_eval_process_slices_and_padding(syn):
  args, workdir, _ = syn
  _, full = _eval_all(args, workdir, 'test', batch_size=3)
  assert list(full['case_id']) == [f'test_{i:05d}' for i in range(10)]   # record order
  seen, nbatches = [], set()
  for index in range(3):
    batches, part = _eval_all(args, workdir, 'test', batch_size=3, process_index=index,
                              process_count=3)
    seen += list(part['case_id'])
    padded = list(pipeline.eval_batches(args, workdir, 'test', 3, index, 3, pad=True))
    assert all(len(b['image']) == 3 for b in padded)
    nbatches.add(len(padded))
    valid = np.concatenate([b['valid'] for b in padded])
    ids = np.concatenate([b['case_id'] for b in padded])[valid]
    assert list(ids) == list(part['case_id'])
  assert sorted(seen) == list(full['case_id']) and len(seen) == 10   # disjoint, cover
  assert nbatches == {2}            # every process the same number of batches
  _, head = _eval_all(args, workdir, 'test', batch_size=4, max_examples=5)
  assert list(head['case_id']) == list(full['case_id'][:5])
  # Several processes share the first max_examples between them (not 5 each).
  shared = []
  for index in range(2):
    shared += list(_eval_all(args, workdir, 'test', batch_size=2, process_index=index,
                             process_count=2, max_examples=5)[1]['case_id'])
  assert sorted(shared) == list(full['case_id'][:5])


def test_eval_padding_repeats_a_real_example(syn):
  """A process whose examples fill its batches exactly but that must pad a whole batch
  more (5 examples, 2 processes, batch 2: process 1 has 2) pads with its examples as
  they are (its last one, record 3), not transformed twice."""
  args, workdir, _ = syn
  _, full = _eval_all(args, workdir, 'test', batch_size=5, max_examples=5)
  padded = list(pipeline.eval_batches(args, workdir, 'test', 2, 1, 2, max_examples=5,
                                      pad=True))
  assert [list(b['valid']) for b in padded] == [[True, True], [False, False]]
  last = {k: v[3] for k, v in full.items()}   # process 1 has records 1 and 3
  for row in range(2):
    for key in ('image', 'masks'):
      np.testing.assert_array_equal(padded[1][key][row], last[key])
    assert padded[1]['case_id'][row] == last['case_id']


def test_make_global_batch_shards_numeric_fields(syn):
  args, workdir, _ = syn
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  local = next(pipeline.train_iterator(args, workdir, 8))
  batch = pipeline.make_global_batch(local, sharding)
  assert 'case_id' not in batch
  assert batch['image'].shape == (8, 32, 32, 1) and batch['mask'].shape == (8, 32, 32, 1)
  assert batch['image'].sharding == sharding
  np.testing.assert_array_equal(np.asarray(batch['mask']), local['mask'])


# --------------------------------------------------------------------------- folder builder


def test_folder_threshold_channels_and_resize(tmp_path):
  root = make_cimd_folder(tmp_path / 'src', num_train=2, num_test=1)
  case = os.path.join(root, 'training', 'case_0')
  ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))   # 0..240 per column
  ramp[:, 7], ramp[:, 8] = 127, 128
  Image.fromarray(ramp).save(os.path.join(case, 'label0_.png'))
  args = folder_args(root, tmp_path / 'tfds')
  pipeline.prepare(args, str(tmp_path))
  _, train = _eval_all(args, str(tmp_path), 'train')
  np.testing.assert_array_equal(train['masks'][0, 0] > 0, ramp > 127)   # 127 out, 128 in
  low = folder_args(root, tmp_path / 'tfds', mask_threshold=0)
  pipeline.prepare(low, str(tmp_path))
  _, train0 = _eval_all(low, str(tmp_path), 'train')
  np.testing.assert_array_equal(train0['masks'][0, 0] > 0, ramp > 0)
  assert len(_complete_datasets(tmp_path / 'tfds')) == 2      # separate caches
  # Grayscale replicated to 3 channels.
  rgb = folder_args(root, tmp_path / 'tfds', image_channels=3)
  pipeline.prepare(rgb, str(tmp_path))
  _, train3 = _eval_all(rgb, str(tmp_path), 'train')
  assert train3['image'].shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(train3['image'][..., 0], train3['image'][..., 2])
  np.testing.assert_array_equal(train3['image'][..., :1], train['image'])
  # Resize: a 24 px source read at 16 px.
  big = make_cimd_folder(tmp_path / 'big', num_train=1, num_test=1, size=24)
  with pytest.raises(folder.DataError, match='expected 16x16'):
    pipeline.prepare(folder_args(big, tmp_path / 'tfds2'), str(tmp_path))
  resized = folder_args(big, tmp_path / 'tfds2', resize=True)
  assert pipeline.prepare(resized, str(tmp_path)) == {'train': 1, 'test': 1}
  assert _eval_all(resized, str(tmp_path), 'test')[1]['masks'].shape == (1, 2, 16, 16)


def test_folder_multichannel_images(tmp_path):
  root = make_cimd_folder(tmp_path / 'src', num_train=1, num_test=1)
  case = os.path.join(root, 'training', 'case_0')
  rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(os.path.join(case, 'image_1.png'))
  args = folder_args(root, tmp_path / 'tfds', image_channels=3)
  pipeline.prepare(args, str(tmp_path))
  got = _eval_all(args, str(tmp_path), 'train')[1]['image'][0]
  np.testing.assert_allclose(got, rgb / 127.5 - 1.0, atol=1e-6)
  with pytest.raises(folder.DataError, match=r'image_1\.png.*3 channels.*expected 1'):
    pipeline.prepare(folder_args(root, tmp_path / 'tfds1'), str(tmp_path))
  # Several single-channel files are stacked as channels, in order of <k>.
  root2 = make_cimd_folder(tmp_path / 'src2', num_train=1, num_test=1)
  for sub in ('training', 'testing'):
    second = np.full((16, 16), 200, np.uint8)
    Image.fromarray(second).save(os.path.join(root2, sub, 'case_0', 'image_2.png'))
  args2 = folder_args(root2, tmp_path / 'tfds2', image_channels=2)
  pipeline.prepare(args2, str(tmp_path))
  img = _eval_all(args2, str(tmp_path), 'train')[1]['image'][0]
  assert img.shape == (16, 16, 2)
  np.testing.assert_allclose(img[..., 1], 200 / 127.5 - 1.0, atol=1e-6)


def _remove(rel):
  return lambda root: os.remove(os.path.join(root, rel))


def _save(rel, array, fmt=None):
  return lambda root: Image.fromarray(array).save(os.path.join(root, rel), format=fmt)


def _write_bytes(rel, data):
  def fn(root):
    with open(os.path.join(root, rel), 'wb') as f:
      f.write(data)
  return fn


def _truncate_jpeg(rel):
  """Replaces `rel` (a .png) by a JPEG of the same stem cut in half."""
  def fn(root):
    os.remove(os.path.join(root, rel))
    path = os.path.join(root, rel[:-len('.png')] + '.jpg')
    noise = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(noise).save(path, format='JPEG', quality=95)
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
      f.write(data[:len(data) // 2])
  return fn


def _empty_split(root):
  for case in os.listdir(os.path.join(root, 'testing')):
    for name in os.listdir(os.path.join(root, 'testing', case)):
      os.remove(os.path.join(root, 'testing', case, name))
    os.rmdir(os.path.join(root, 'testing', case))


def _remove_split(root):
  _empty_split(root)
  os.rmdir(os.path.join(root, 'testing'))


def _second_channel_except(missing_case):
  """Adds image_2.png to every case but `missing_case` (a split/case path)."""
  def fn(root):
    for sub in ('training', 'testing'):
      for case in os.listdir(os.path.join(root, sub)):
        if f'{sub}/{case}' != missing_case:
          Image.fromarray(_GRAY).save(os.path.join(root, sub, case, 'image_2.png'))
  return fn


_GRAY = np.zeros((16, 16), np.uint8)
_ZERO_ONE = np.zeros((16, 16), np.uint8)
_ZERO_ONE[4:9, 4:9] = 1
BAD_INPUTS = {
    # name: (break the folder, DataArgs overrides, substrings the message must hold)
    'missing_label': (_remove('training/case_1/label1_.png'), {},
                      ['training/case_1', 'missing label1_', 'expected 2']),
    'extra_label': (_save('testing/case_0/label2_.png', _GRAY), {},
                    ['testing/case_0', 'extra label2_.png', 'expected 2']),
    'duplicate_label': (_save('training/case_0/label0_.jpg', _GRAY), {},
                        ['training/case_0', 'label0_.jpg', 'two label files']),
    'annotator_count': (lambda root: None, {'num_annotators': 3},
                        ['training/case_0', 'has 2 label file(s)', 'expected 3',
                         'missing label2_']),
    'missing_image': (_remove('training/case_2/image_1.png'), {},
                      ['training/case_2', 'no image file']),
    'ambiguous_label_names': (_save('training/case_0/label1_second.png', _GRAY), {},
                              ['training/case_0', 'label1_.png', 'label1_second.png',
                               'two label files for expert 1']),
    'image_wrong_size': (_save('training/case_3/image_1.png', np.zeros((16, 20), np.uint8)),
                         {}, ['training/case_3', 'image_1.png', '20x16',
                              'expected 16x16', 'resize']),
    'mask_wrong_size': (_save('testing/case_1/label0_.png', np.zeros((12, 12), np.uint8)),
                        {}, ['testing/case_1', 'label0_.png', '12x12', 'expected']),
    'mask_differs_from_image_with_resize': (
        _save('testing/case_1/label1_.png', np.zeros((20, 20), np.uint8)), {'resize': True},
        ['testing/case_1', 'label1_.png', '20x20', 'expected equal sizes']),
    'unreadable_image': (_write_bytes('training/case_1/image_1.png', b'not an image'), {},
                         ['training/case_1', 'image_1.png', 'cannot read image']),
    'truncated_image': (_truncate_jpeg('training/case_2/image_1.png'), {},
                        ['training/case_2', 'image_1.jpg', 'cannot read image']),
    'truncated_mask': (_truncate_jpeg('testing/case_0/label1_.png'), {},
                       ['testing/case_0', 'label1_.jpg', 'cannot read image']),
    'rgb_mask': (_save('training/case_0/label1_.png', np.zeros((16, 16, 3), np.uint8)), {},
                 ['training/case_0', 'label1_.png', "mode 'RGB'", 'single-channel']),
    'colour_image_for_one_channel': (
        _save('training/case_1/image_1.png',
              np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)), {},
        ['training/case_1', 'image_1.png', '3 channels', 'expected 1']),
    'empty_split': (_empty_split, {}, ['testing', 'holds no case folders']),
    # A 0/1 mask would read as empty at the default threshold.
    'zero_one_mask': (_save('training/case_1/label0_.png', _ZERO_ONE), {},
                      ['training/case_1', 'label0_.png', 'values are 0..1',
                       'data.mask_threshold=127', 'read as empty']),
    # One case missing a channel file among cases with two: not replicated silently.
    'missing_channel_file': (_second_channel_except('training/case_2'),
                             {'image_channels': 2},
                             ['training/case_2', 'one image file (image_1.png)',
                              'data.image_channels=2']),
}


def test_file_names_follow_the_official_rule(tmp_path, caplog):
  """A file's type is its name up to the first '_' (the official loader's rule):
  images named after the case, labels with any suffix; several images stack in
  natural order; other files are ignored and listed once."""
  root = tmp_path / 'src'
  rng = np.random.default_rng(3)
  expected = {}
  for split, sub in (('train', 'training'), ('test', 'testing')):
    case = root / sub / 'case0042'
    case.mkdir(parents=True)
    channels = [rng.integers(0, 256, (16, 16), dtype=np.uint8) for _ in range(2)]
    # natural order: image_t2 before image_t10
    Image.fromarray(channels[0]).save(case / 'image_t2.png')
    Image.fromarray(channels[1]).save(case / 'image_t10.png')
    masks = []
    for i, name in enumerate(('label0_anna.png', 'label1_.png', 'label2.bmp')):
      m = (rng.random((16, 16)) > 0.6).astype(np.uint8) * 255
      Image.fromarray(m).save(case / name)
      masks.append(m > 127)
    (case / 'notes.txt').write_text('reader notes')
    Image.fromarray(_GRAY).save(case / 'mask_extra.png')
    expected[split] = (np.stack(channels, -1), np.stack(masks))
  args = DataArgs(name='folder', source_dir=str(root), tfds_dir=str(tmp_path / 'tfds'),
                  image_size=16, image_channels=2, num_annotators=3)
  with caplog.at_level('INFO'):
    pipeline.prepare(args, str(tmp_path))
  ignored = [r.getMessage() for r in caplog.records if 'ignored' in r.getMessage()]
  assert len(ignored) == 2, ignored   # one line per split folder, not per file
  assert 'case0042/mask_extra.png' in ignored[0] and 'case0042/notes.txt' in ignored[0]
  for split in ('train', 'test'):
    batch = next(pipeline.eval_batches(args, str(tmp_path), split, batch_size=1))
    image, masks = expected[split]
    np.testing.assert_array_equal(np.round((batch['image'][0] + 1) * 127.5), image)
    np.testing.assert_array_equal(batch['masks'][0] > 0, masks)
    assert batch['case_id'][0] == 'case0042'


@pytest.mark.parametrize('kind', sorted(BAD_INPUTS))
def test_bad_input_is_named_and_nothing_is_written(tmp_path, kind):
  root = make_cimd_folder(tmp_path / 'src')
  breaker, overrides, expected = BAD_INPUTS[kind]
  breaker(root)
  tfds_dir = tmp_path / 'tfds'
  with pytest.raises(folder.DataError) as err:
    pipeline.prepare(folder_args(root, tfds_dir, **overrides), str(tmp_path))
  message = str(err.value)
  for part in expected:
    assert part in message, (part, message)
  assert not tfds_dir.exists(), 'validation must fail before anything is written'


def test_missing_source_or_split_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    pipeline.prepare(folder_args(tmp_path / 'nowhere', tmp_path / 'tfds'), str(tmp_path))
  root = make_cimd_folder(tmp_path / 'src')
  _remove_split(root)
  with pytest.raises(folder.SourceNotFoundError, match='testing'):
    pipeline.prepare(folder_args(root, tmp_path / 'tfds'), str(tmp_path))
  assert not (tmp_path / 'tfds').exists()


def test_failed_preparation_leaves_nothing_complete(tmp_path, monkeypatch):
  root = make_cimd_folder(tmp_path / 'src')
  args = folder_args(root, tmp_path / 'tfds')
  real_read = folder.read_case
  calls = []

  def failing_read(case, a):
    calls.append(case.case_id)
    if len(calls) == 5:      # fails half-way through writing (train written, test not)
      raise OSError('disk full (simulated)')
    return real_read(case, a)

  # Skip the up-front validation so the failure happens while TFDS writes.
  monkeypatch.setattr(folder, 'validate', lambda builder: None)
  monkeypatch.setattr(folder, 'read_case', failing_read)
  with pytest.raises(OSError, match='simulated'):
    pipeline.prepare(args, str(tmp_path))
  assert len(calls) == 5
  assert _complete_datasets(tmp_path / 'tfds') == []
  assert not [f for f in _files(tmp_path / 'tfds') if 'array_record' in f]
  assert not records.is_complete(folder.make_builder(args, str(tmp_path / 'tfds')))
  monkeypatch.undo()
  # A later run prepares from scratch and reads everything.
  assert pipeline.prepare(args, str(tmp_path)) == {'train': 4, 'test': 2}
  assert len(_eval_all(args, str(tmp_path), 'train')[1]['case_id']) == 4


def test_half_written_final_folder_is_rebuilt(tmp_path):
  root = make_cimd_folder(tmp_path / 'src')
  args = folder_args(root, tmp_path / 'tfds')
  pipeline.prepare(args, str(tmp_path))
  path = os.fspath(folder.make_builder(args, str(tmp_path / 'tfds')).data_path)
  os.remove(os.path.join(path, 'dataset_info.json'))     # e.g. an interrupted copy
  with open(os.path.join(path, 'cimd_folder-train.array_record-00000-of-00001'), 'wb') as f:
    f.write(b'junk')
  assert pipeline.prepare(args, str(tmp_path)) == {'train': 4, 'test': 2}
  assert len(_eval_all(args, str(tmp_path), 'train')[1]['case_id']) == 4


def test_changed_source_gets_a_new_cache(tmp_path):
  root = make_cimd_folder(tmp_path / 'src')
  args = folder_args(root, tmp_path / 'tfds')
  before = folder.make_builder(args, str(tmp_path / 'tfds')).data_path
  _write_case(os.path.join(root, 'training', 'case_9'))
  after = folder.make_builder(args, str(tmp_path / 'tfds')).data_path
  assert before != after
  # A file rewritten at the same size (here: only its modification time moves).
  path = os.path.join(root, 'testing', 'case_1', 'label0_.png')
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert folder.make_builder(args, str(tmp_path / 'tfds')).data_path != after
  assert pipeline.prepare(args, str(tmp_path))['train'] == 5


def test_data_args_validation():
  with pytest.raises(ValueError, match='data.name'):
    DataArgs(name='lidc')
  with pytest.raises(ValueError, match='source_dir'):
    DataArgs(name='folder')
  with pytest.raises(ValueError, match='mask_threshold'):
    DataArgs(mask_threshold=255)
  with pytest.raises(ValueError, match='validation_fraction'):
    DataArgs(validation_fraction=1.0)
  with pytest.raises(ValueError, match='image_size >= 16'):
    synthetic.make_builder(DataArgs(image_size=8), '/tmp/unused')
