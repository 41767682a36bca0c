"""Fast checks of the pieces behind safe outputs: folder locks, staged output folders,
case folder names (issue 13 items 3-5)."""

import json
import os
import socket

import pytest

from cimd_jax.evaluation import reports
from cimd_jax.utils import atomic
from cimd_jax.utils import locking
from cimd_jax.utils.errors import ConfigError, WorkdirLockedError


def test_a_held_lock_refuses_a_second_holder_naming_host_and_pid(tmp_path):
  path = tmp_path / '.lock'
  with locking.FolderLock(str(path), 'workdir X'):
    holder = json.loads(path.read_text())
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    with pytest.raises(WorkdirLockedError, match=rf'workdir X is in use by PID {os.getpid()} '
                                                 rf'on host {socket.gethostname()}'):
      locking.FolderLock(str(path), 'workdir X').acquire()
  # Released: the next holder gets it, and the file no longer names anyone.
  assert path.read_text() == ''
  with locking.FolderLock(str(path), 'workdir X'):
    pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
  path = tmp_path / '.lock'
  # A holder that no longer exists (PID 2**22 + 7 is above Linux's default pid_max).
  path.write_text(json.dumps({'host': socket.gethostname(), 'pid': 2**22 + 7,
                              'started': 'earlier', 'command': 'train'}))
  with caplog.at_level('INFO'):
    with locking.FolderLock(str(path), 'workdir Y'):
      assert json.loads(path.read_text())['pid'] == os.getpid()
  assert any('Taking over the lock on workdir Y' in r.getMessage() for r in caplog.records)


def test_staged_folder_replaces_the_old_output_only_on_commit(tmp_path):
  final = tmp_path / 'out'
  final.mkdir()
  (final / 'sample_07.png').write_text('old')
  (final / 'metrics.json').write_text('old')
  killed = atomic.StagedFolder(str(final))       # a run that never commits
  (tmp_path / os.path.basename(killed.path) / 'sample_00.png').write_text('new')
  assert sorted(os.listdir(final)) == ['metrics.json', 'sample_07.png']
  staged = atomic.StagedFolder(str(final))       # the next run removes the leftover
  assert os.listdir(staged.path) == []
  with open(os.path.join(staged.path, 'sample_00.png'), 'w') as f:
    f.write('new')
  staged.commit()
  staged.discard()                              # no-op after commit
  assert os.listdir(final) == ['sample_00.png']
  assert [n for n in os.listdir(tmp_path) if n != 'out'] == []


@pytest.mark.parametrize('ids', [
    ['a b', 'a_b', 'a?b'],
    ['x', 'x', 'x'],
    ['../up', 'ok', '.hidden', ''],
    ['case/1', 'case_1', 'case 1'],
    ['Case1', 'case1', 'CASE1'],
])
def test_case_folder_names_are_distinct_and_safe(ids):
  names = reports.case_folder_names(ids)
  assert len(names) == len(ids) and len(set(names)) == len(ids)
  for cid, name in zip(ids, names):
    assert name and not name.startswith('.') and '/' not in name and ' ' not in name
    assert set(name) <= set('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.')
  # Safe ids keep their own name; the first of repeated ids too.
  if ids == ['a b', 'a_b', 'a?b']:
    assert names[1] == 'a_b'
  if ids == ['x', 'x', 'x']:
    assert names == ['x', 'x-2', 'x-3']
  # One folder each on a case-insensitive file system (macOS, Windows) too.
  assert len({n.lower() for n in names}) == len(ids)
  if ids == ['Case1', 'case1', 'CASE1']:
    assert names == ['Case1', 'case1-2', 'CASE1-3']


def test_a_file_written_atomically_is_complete_or_untouched(tmp_path, monkeypatch):
  """A write that dies before its rename leaves the earlier file as it was (config.json,
  reports and data_records.json all go through atomic.write_text / reports.write_json)."""
  path = tmp_path / 'config.json'
  reports.write_json(str(path), {'a': 1})
  assert json.loads(path.read_text()) == {'a': 1}

  def killed(src, dst):
    raise OSError('killed before the rename')

  monkeypatch.setattr(os, 'replace', killed)
  with pytest.raises(OSError):
    reports.write_json(str(path), {'a': 2, 'b': 'x' * 10000})
  assert json.loads(path.read_text()) == {'a': 1}
  assert sorted(os.listdir(tmp_path)) == ['config.json']   # no temporary file left
  monkeypatch.undo()
  # The data reach the disk before the rename (else a power loss can leave the new
  # name on an empty file), through a temporary file of this process only.
  events = []
  real_fsync, real_replace = os.fsync, os.replace
  monkeypatch.setattr(os, 'fsync', lambda fd: (events.append('fsync'), real_fsync(fd)))
  monkeypatch.setattr(os, 'replace', lambda src, dst: (events.append(('replace', src)),
                                                       real_replace(src, dst)))
  reports.write_json(str(path), {'a': 3})
  assert events == ['fsync', ('replace', f'{path}.tmp.{os.getpid()}')]
  assert json.loads(path.read_text()) == {'a': 3}


def test_only_an_earlier_output_or_a_new_folder_may_be_replaced(tmp_path):
  """A commit deletes what is at final_dir: refused for the workdir and the folders
  above it, a file, and a folder of other files; allowed for a new folder, an empty
  one, and an earlier output (it holds the marker)."""
  workdir = tmp_path / 'runs' / 'lidc'
  (workdir / 'checkpoints').mkdir(parents=True)
  refusal = lambda p: atomic.replace_refusal(str(p), 'manifest.json', (str(workdir),))
  for path in (workdir, tmp_path / 'runs', tmp_path):
    assert 'which a new output would delete' in refusal(path), path
  (tmp_path / 'notes.txt').write_text('mine')
  assert refusal(tmp_path / 'notes.txt') == 'is a file'
  (tmp_path / 'photos').mkdir()
  (tmp_path / 'photos' / 'a.png').write_text('x')
  assert 'no manifest.json' in refusal(tmp_path / 'photos')
  assert refusal(workdir / 'samples' / 'test') is None          # new, inside the workdir
  (tmp_path / 'empty').mkdir()
  assert refusal(tmp_path / 'empty') is None
  (tmp_path / 'earlier').mkdir()
  (tmp_path / 'earlier' / 'manifest.json').write_text('{}')
  (tmp_path / 'earlier' / 'case_0').mkdir()
  assert refusal(tmp_path / 'earlier') is None
  with pytest.raises(ConfigError, match=r'^sampling.output_dir .*photos: exists and holds'):
    atomic.check_replaceable(str(tmp_path / 'photos'), 'manifest.json',
                             'sampling.output_dir')


def test_best_checkpoint_ranks_real_scores_and_never_a_nan_one(tmp_path):
  """`best`: the scores are stored (Orbax writes them only with best_fn set) and the
  highest finite one wins and is kept beyond the latest `keep`; a NaN score (a metric
  the validation data cannot give) ranks below every real one instead of winning by
  comparing False; only NaN scores: an error, not an arbitrary step."""
  import jax.numpy as jnp   # pylint: disable=g-import-not-at-top
  from cimd_jax import checkpoint   # pylint: disable=g-import-not-at-top
  from cimd_jax.utils.errors import CheckpointNotFoundError   # pylint: disable=g-import-not-at-top

  def save_all(workdir, scores, keep=10):
    manager = checkpoint.make_manager(str(workdir), keep=keep, best=True)
    for step, score in scores:
      metrics = score if score is None or isinstance(score, dict) else {
          checkpoint.BEST_KEY: score}
      checkpoint.save(manager, step, {'w': jnp.full((2,), step, jnp.float32)}, None, {},
                      metrics)
    manager.wait_until_finished()
    manager.close()

  save_all(tmp_path / 'a', [(1, float('nan')), (2, 0.4), (3, 0.7), (4, 0.5)])
  assert checkpoint.resolve_step(str(tmp_path / 'a'), 'best') == 3
  # Retention: the latest `keep` steps plus the best one, however old.
  save_all(tmp_path / 'c', [(1, 0.9), (2, 0.4), (3, 0.5), (4, 0.6)], keep=2)
  assert checkpoint.complete_steps(str(tmp_path / 'c')) == [1, 3, 4]
  assert checkpoint.resolve_step(str(tmp_path / 'c'), 'best') == 1
  save_all(tmp_path / 'd', [(1, 0.9), (2, float('nan')), (3, 0.5), (4, 0.6)], keep=2)
  assert checkpoint.complete_steps(str(tmp_path / 'd')) == [1, 3, 4]
  # Steps saved without validation (between evaluations) have no metrics and are not
  # ranked; a metrics dict without the score is refused before anything is written.
  save_all(tmp_path / 'e', [(1, None), (2, 0.4), (3, None)])
  assert checkpoint.resolve_step(str(tmp_path / 'e'), 'best') == 2
  with pytest.raises(ValueError, match="lack 'score'"):
    save_all(tmp_path / 'f', [(1, {'loss': 0.3})])
  assert checkpoint.complete_steps(str(tmp_path / 'f')) == []
  save_all(tmp_path / 'b', [(1, float('nan')), (2, float('nan'))])
  with pytest.raises(CheckpointNotFoundError, match='finite validation score'):
    checkpoint.resolve_step(str(tmp_path / 'b'), 'best')


def test_standard_error_uses_the_sample_std_and_needs_two_images():
  """[0.2, 0.8]: sample std 0.6/sqrt(2), standard error 0.3 (the population std would
  give 0.212); one image: no standard error (NaN), not 0."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  two = reports.summarize({'ci': np.array([0.2, 0.8])})['ci']
  assert two['mean'] == pytest.approx(0.5) and two['sem'] == pytest.approx(0.3)
  assert two['count'] == 2
  one = reports.summarize({'ci': np.array([0.7])})['ci']
  assert one['mean'] == pytest.approx(0.7) and np.isnan(one['sem'])
  # metrics.json format 2 is this summary (keys, ddof = 1 standard error): a change
  # here must come with a new reports.METRICS_FORMAT, or --mode=ablations would reuse
  # evaluations scored the old way beside new ones.
  assert reports.METRICS_FORMAT == 2 and sorted(two) == ['count', 'mean', 'sem', 'std']


def test_json_outputs_are_strict_json_with_numbers_not_strings(tmp_path):
  """metrics.json of one image: its standard error is null, not a bare NaN token that
  jq and JavaScript refuse; NumPy scalars and arrays are numbers and lists, not their
  str() (which json's default=str would write)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  content = {'metrics': reports.summarize({'ci': np.array([0.7])}),
             'freq': np.float32(0.25), 'counts': np.array([1, 2]), 'inf': float('inf'),
             'nested': [{'x': np.nan}, (np.int64(3), 'a')]}
  path = tmp_path / 'metrics.json'
  reports.write_json(str(path), content)
  text = path.read_text()
  assert 'NaN' not in text and 'Infinity' not in text
  back = json.loads(text, parse_constant=lambda c: pytest.fail(f'non-strict token {c}'))
  assert back == {'metrics': {'ci': {'mean': 0.7, 'std': 0.0, 'sem': None, 'count': 1}},
                  'freq': 0.25, 'counts': [1, 2], 'inf': None,
                  'nested': [{'x': None}, [3, 'a']]}


def test_more_than_100_samples_read_back_in_written_order(tmp_path):
  """sample_100.png sorts before sample_11.png by name; read back by number."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  masks = np.zeros((101, 4, 4), bool)
  for i in range(101):
    masks[i].flat[i % 16] = True
    masks[i, 3, 3] = i == 100          # only the last mask has the corner
  reports.write_case(str(tmp_path / 'c'), np.zeros((4, 4, 1), np.float32), masks)
  np.testing.assert_array_equal(reports.read_case_masks(str(tmp_path / 'c')), masks)


def test_case_frequency_and_std_pngs_by_hand(tmp_path):
  """mean.png is the sampled frequency ×255 and std.png the per-pixel standard
  deviation of the binary samples ×510 (0.5, its largest value, is white): four
  samples of a 2×2 image with a pixel in 2, 1, 4 and 0 of them."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  masks = np.zeros((4, 2, 2), bool)
  masks[:2, 0, 0] = True
  masks[:1, 0, 1] = True
  masks[:, 1, 0] = True
  reports.write_case(str(tmp_path / 'c'), np.zeros((2, 2, 1), np.float32), masks)
  mean = np.asarray(Image.open(tmp_path / 'c' / 'mean.png'))
  std = np.asarray(Image.open(tmp_path / 'c' / 'std.png'))
  np.testing.assert_array_equal(mean, [[128, 64], [255, 0]])      # 127.5, 63.75 rounded
  np.testing.assert_array_equal(std, [[255, round(np.sqrt(0.25 * 0.75) * 510)], [0, 0]])
