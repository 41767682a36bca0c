"""What `--mode=sample` and `--mode=evaluate` draw masks for: the images of a data
split (experts included), or the unlabelled inputs of `sampling.input_dir` (image
files and CIMD case folders; with data.name='nifti', NIfTI case folders, every slice
along data.nifti_axis). For NIfTI cases also which volume each case's sampled masks
are written back into (its shape and affine)."""

import dataclasses
import os
from typing import Callable

from absl import logging
import numpy as np

from cimd_jax.data import image_folder
from cimd_jax.data import nifti
from cimd_jax.data import pipeline
from cimd_jax.data import provenance
from cimd_jax.data.records import DataError
from cimd_jax import settings as settings_lib
from cimd_jax.utils.errors import InputError


@dataclasses.dataclass(frozen=True)
class Case:
  """One image to sample: image float [H, W, C] in [-1, 1], experts bool [A, H, W]
  (None for unlabelled images), extras (synthetic: structures, structure_probs)."""
  case_id: str
  image: np.ndarray
  experts: np.ndarray | None = None
  extras: dict[str, np.ndarray] | None = None


@dataclasses.dataclass(frozen=True)
class Inputs:
  """The cases to sample, the messages of skipped bad inputs, and for NIfTI sources
  `volume_of`: case name (case_id without its '_<axis><index>') -> the volume whose
  shape and affine the sampled masks are written back with (None: no volumes)."""
  cases: list[Case]
  skipped: list[str]
  volume_of: Callable[[str], str] | None = None


def dataset_cases(settings: settings_lib.Settings, workdir: str) -> list[Case]:
  """The cases of sampling.split (its first sampling.max_images), all experts."""
  provenance.prepare_for_sampling(settings.data, workdir, settings.sampling.split)
  batches = pipeline.eval_batches(settings.data, workdir, settings.sampling.split,
                                  batch_size=8, max_examples=settings.sampling.max_images)
  cases = []
  for batch in batches:
    for i in range(len(batch['image'])):
      extras = {k: np.asarray(v[i]) for k, v in batch.items()
                if k not in ('image', 'masks', 'case_id')}
      cid = batch['case_id'][i]
      cases.append(Case(cid.decode() if isinstance(cid, bytes) else str(cid),
                        np.asarray(batch['image'][i]), batch['masks'][i] > 0, extras))
  return cases


def split_inputs(settings: settings_lib.Settings, workdir: str) -> Inputs:
  """`dataset_cases`, with the source's case volumes for data.name='nifti'."""
  data = settings.data
  volume_of = (lambda case: nifti.reference_file(data, case)) if data.name == 'nifti' else None
  return Inputs(dataset_cases(settings, workdir), [], volume_of)


# Sources whose float images were scaled to 0..255 by a fixed rule (the model's inputs
# must be too): image files wider than 8 bits are refused for models trained on them.
FIXED_SCALE_SOURCES = {
    'lidc_pickle': "lidc_pickle records (images in [0, 1] stored as rint(255 x))",
    'lidc_hdf5': "lidc_hdf5 records (images mapped from data.hdf5_image_range to 0..255)",
}


def folder_inputs(settings: settings_lib.Settings, trained_on: str = '',
                  case_files: int | None = None) -> Inputs:
  """The inputs of sampling.input_dir (its first sampling.max_images usable images, as
  for NIfTI scans) for a model trained on data source `trained_on` whose training cases
  had `case_files` image files each (None: not recorded); without
  sampling.skip_bad_inputs the first bad input raises InputError naming the file."""
  if settings.data.name == 'nifti':
    return _nifti_inputs(settings)
  data, sampling = settings.data, settings.sampling
  cases, skipped, copied = [], [], []
  if trained_on in FIXED_SCALE_SOURCES:
    case_files = 1   # one grey image per record, replicated to the channels
  found = image_folder.list_input_images(sampling.input_dir, case_files or 1)
  for found_case in found:
    if 0 < sampling.max_images <= len(cases):
      break
    try:
      if trained_on in FIXED_SCALE_SOURCES:
        image_folder.check_8bit(found_case, FIXED_SCALE_SOURCES[trained_on])
      image_folder.check_channel_files(found_case, data.image_channels, case_files)
      img = image_folder.read_input_image(found_case, data)
    except image_folder.BadInputImage as e:
      if not sampling.skip_bad_inputs:
        raise InputError(str(e)) from e
      skipped.append(str(e))
      continue
    cases.append(Case(found_case.case_id, img.image))
    if (case_files is None and data.image_channels > 1 and len(found_case.images) == 1
        and image_folder.is_single_channel(found_case.path)):
      copied.append(found_case.case_id)
  if copied:   # a checkpoint that does not record its cases' files (trained before it was)
    logging.warning('%d input(s) (%s) are one single-channel file copied into all %d '
                    'channels; if the training cases had one file per channel, give '
                    'case folders of %d image_* files', len(copied), ', '.join(copied[:5]),
                    data.image_channels, data.image_channels)
  return Inputs(cases, skipped)


def _nifti_inputs(settings: settings_lib.Settings) -> Inputs:
  """Every slice of each NIfTI case of sampling.input_dir, read as the records are
  (same normalisation, axis and centre pad/crop; nifti.read_input_case)."""
  data, sampling = settings.data, settings.sampling
  cases, skipped, volumes = [], [], {}
  try:
    found = nifti.input_case_folders(sampling.input_dir, data)
  except DataError as e:
    raise InputError(str(e)) from e
  for folder in found:
    if 0 < sampling.max_images <= len(cases):
      break
    try:
      case = nifti.scan_case(folder, data, raters=False)
      slices = nifti.read_input_case(case, data)
    except DataError as e:
      if not sampling.skip_bad_inputs:
        raise InputError(str(e)) from e
      skipped.append(str(e))
      continue
    volumes[case.case] = os.path.join(case.folder, case.images[0])
    cases += [Case(cid, image.astype(np.float32) / 127.5 - 1.0) for cid, image in slices]
  if sampling.max_images > 0:
    cases = cases[:sampling.max_images]
  return Inputs(cases, skipped, volumes.__getitem__)
