"""Which prepared records a run was trained on (WORKDIR/data_records.json), so that
sampling or scoring a split of data that changed since training is not silent.

The records' name (`pipeline.records_name`) is '<shape>_<hash of every parameter that
changes the records>': for data read from disk it covers the files (names, sizes,
modification times), the split file's content and the split settings. A pickle added
to the folder, a split file edited or an HDF5 file regenerated at the same path gives
a new name, and may put patients the model trained on into the test split. Training
records every name it ran on; sampling or evaluating a split of other records logs
one warning naming the data (a copy of the same files on another machine also differs
by its modification times, hence a warning rather than a refusal). Synthetic data is
generated from the training keys themselves and is not checked.
"""

import json
import os

from absl import logging

from cimd_jax.data import pipeline
from cimd_jax.data.args import DataArgs
from cimd_jax.utils import atomic

FILE = 'data_records.json'


def trained_on(workdir: str) -> list[str]:
  """The records names WORKDIR's training ran on, oldest first ([] when unknown)."""
  try:
    with open(os.path.join(workdir, FILE)) as f:
      return list(json.load(f)['records'])
  except (OSError, ValueError, KeyError, TypeError):
    return []


def record_training(args: DataArgs, workdir: str) -> None:
  """Adds the records of `args` to WORKDIR's list (process 0, at each training start);
  warns when a resumed training continues on other records than it started with."""
  name = pipeline.records_name(args, workdir)
  names = trained_on(workdir)
  if name in names:
    return
  if names:
    logging.warning('%s: training continues on other records than it started on (%s: %s, '
                    'then %s): the data or split file changed; the splits may differ',
                    workdir, _source(args), ', '.join(names), name)
  atomic.write_text(os.path.join(workdir, FILE),
                    json.dumps({'records': names + [name]}, indent=1))


def check_sampling(args: DataArgs, workdir: str, split: str) -> bool:
  """False, after one warning, when `split` is read from other records than WORKDIR's
  training ran on; True otherwise (also when unknown or synthetic)."""
  names = trained_on(workdir)
  if not names or args.name == 'synthetic':
    return True
  name = pipeline.records_name(args, workdir)
  if name in names:
    return True
  logging.warning('%s: the %r split is read from other records than the training of %s '
                  'used (%s, trained on %s): the data or split file changed since '
                  'training, so it may hold cases the model was trained on',
                  _source(args), split, workdir, name, ', '.join(names))
  return False


def prepare_for_sampling(args: DataArgs, workdir: str, split: str) -> bool:
  """check_sampling, then pipeline.prepare (the records written once); returns the
  check's answer."""
  same = check_sampling(args, workdir, split)
  pipeline.prepare(args, workdir)
  return same


def _source(args: DataArgs) -> str:
  return f'data.source_dir={args.source_dir!r}' + (
      f' with data.split_file={args.split_file!r}' if args.split_file else '')
