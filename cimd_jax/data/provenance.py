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

For the folder layout with data.image_channels > 1 the file also records how many
image files each training case had (1: one file, replicated or already C-channel; C:
one single-channel file per channel), so that sampling reads inputs the same way.
"""

import dataclasses
import json
import os

from absl import logging

from cimd_jax.data import folder
from cimd_jax.data import pipeline
from cimd_jax.data.args import DataArgs
from cimd_jax.utils import atomic

FILE = 'data_records.json'


def _stored(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, FILE)) as f:
      stored = json.load(f)
    return stored if isinstance(stored, dict) else {}
  except (OSError, ValueError):
    return {}


def trained_on(workdir: str) -> list[str]:
  """The records names WORKDIR's training ran on, oldest first ([] when unknown)."""
  names = _stored(workdir).get('records')
  return list(names) if isinstance(names, list) else []


def image_files_per_case(workdir: str) -> int | None:
  """How many image files each of WORKDIR's training cases had (folder layout with
  data.image_channels > 1 only; None when not recorded)."""
  count = _stored(workdir).get('image_files_per_case')
  return count if isinstance(count, int) else None


def _files_per_case(args: DataArgs) -> int | None:
  if args.name != 'folder' or args.image_channels == 1:
    return None
  counts = {len(c.images) for cases in folder.scan_source(args).values() for c in cases}
  return max(counts) if counts else None   # one count: scan_source refuses a mix


def _cases_name(args: DataArgs, workdir: str, name: str) -> str:
  """The records' name (`name` is that of `args`) with the settings that choose slices
  within a case, not which cases a split holds, held fixed (NIfTI:
  nifti_empty_fraction, which sampling may raise to draw every slice): equal for
  records of the same cases in each split. Other sources: `name` itself."""
  if args.name != 'nifti':
    return name
  return pipeline.records_name(dataclasses.replace(args, nifti_empty_fraction=0.0), workdir)


def record_training(args: DataArgs, workdir: str) -> None:
  """Adds the records of `args` to WORKDIR's list (process 0, at each training start);
  warns when a resumed training continues on other records than it started with."""
  stored, name = _stored(workdir), pipeline.records_name(args, workdir)
  names, case_names = trained_on(workdir), list(stored.get('cases') or [])
  cases, files = _cases_name(args, workdir, name), _files_per_case(args)
  if name in names and cases in case_names and files == stored.get('image_files_per_case'):
    return
  if names and name not in names:
    logging.warning('%s: training continues on other records than it started on (%s: %s, '
                    'then %s): the data or split file changed; the splits may differ',
                    workdir, _source(args), ', '.join(names), name)
  record = {'records': names + [name] * (name not in names),
            'cases': case_names + [cases] * (cases not in case_names)}
  if files is not None:
    record['image_files_per_case'] = files
  atomic.write_text(os.path.join(workdir, FILE), json.dumps(record, indent=1))


def check_sampling(args: DataArgs, workdir: str, split: str) -> bool:
  """False, after one warning, when `split` is read from other records than WORKDIR's
  training ran on, unless only the slices drawn within its cases differ; True
  otherwise (also when unknown or synthetic)."""
  names = trained_on(workdir)
  if not names or args.name == 'synthetic':
    return True
  name = pipeline.records_name(args, workdir)
  if name in names or _cases_name(args, workdir, name) in (_stored(workdir).get('cases') or []):
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
