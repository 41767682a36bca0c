"""TFDS builder for NIfTI volumes with several raters (`data.name='nifti'`), and the
write-back of per-slice outputs as NIfTI volumes (over 250 lines because reading a
slice and writing it back must use the same geometry: axis, padding, cropping).

  ROOT/training/<case>/...   one file per MR sequence and one per rater -> 'train'
  ROOT/testing/<case>/...    same -> 'test' (optional)

Files are found by glob patterns on the file names (case-sensitive, fnmatch):
`data.nifti_image_patterns` (one per sequence = image channel, in channel order)
and `data.nifti_rater_patterns` (one per rater = annotator); each pattern must match
exactly one file per case folder, and no file may match two patterns.

Splits (case level, never by slice): 'test' is testing/ when it exists, else
`data.test_fraction` of the training cases; 'validation' is
`data.validation_fraction` of the remaining training cases; both seeded with
`data.seed` (`splits.held_out_split`). A case name may not occur in both folders.
With `data.split_file` (JSON {'train': [case, ...], 'validation': [...], 'test':
[...]}, every case folder of training/ and testing/ listed once) the file decides:
needed where one patient has several case folders (scans at several time points).

Per case, all volumes must be 3-D (a trailing axis of length 1 is dropped) with the
shape of the first sequence and its affine within `AFFINE_ATOL`. Each sequence is
normalised over its whole volume by `intensity.to_uint8` (clip to the
[data.percentile_low, data.percentile_high] percentiles, map to 0..255), so int16,
uint16 and float volumes all work; a rater volume must be a binary mask (values in
[0, 1], foreground > 0.5, or only 0 and 255; anything else is an error). The volume
is cut into 2-D slices along `data.nifti_axis` (slice = np.take(volume, k, axis),
the two other axes in their order, no reorientation). Kept: every slice any rater
marked, plus round(data.nifti_empty_fraction * n_empty) of the unmarked ones,
the first in `splits.seeded_order` of '<case>:<index>' with data.seed (`kept_slices`).

Slices are centre padded (with 0) or centre cropped to image_size x image_size,
each in-plane axis on its own (`fit`, inverse `unfit`); a crop that would drop a
marked voxel is an error. Records:

  image    uint8 [S, S, C]  the C sequences' slices
  masks    uint8 [A, S, S]  the raters' slices
  case_id  '<case>_<axis letter><index>', e.g. 'patient01_z57' (axis 0/1/2 = x/y/z)

Everything is read and checked before anything is written; bad input raises
`DataError` naming the case folder, the file or pattern, and what was expected.

Unlabelled scans to sample (`sampling.input_dir`): `input_case_folders`, then
`scan_case(folder, args, raters=False)` and `read_input_case` (every slice, read and
fitted as the records are).

Write-back (for sampling): `write_volume` puts per-slice arrays back into a volume
of the reference file's shape and affine (unsampled slices 0); `write_samples`
writes a case's sampled masks as one 4-D uint8 volume [X, Y, Z, N] and their
per-voxel frequency as a float32 volume [X, Y, Z].
"""

import collections
import dataclasses
import fnmatch
import os
from typing import Any, Callable, Iterator

from absl import logging
import nibabel as nib
import numpy as np
import tensorflow_datasets as tfds

from cimd_jax.data import intensity
from cimd_jax.data import records
from cimd_jax.data import splits as splits_lib
from cimd_jax.data.args import DataArgs, TEST, TRAIN
from cimd_jax.data.records import DataError, SourceNotFoundError

SPLIT_FOLDERS = {TRAIN: 'training', TEST: 'testing'}
AXIS_NAMES = 'xyz'
AFFINE_ATOL = 1e-3   # largest difference of two affines' entries (mm) still "equal"
MAX_FRACTIONAL = 0.1  # share of a rater volume's voxels in (0, 1) still read as a mask


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  """The files of one case folder.

  Attributes:
    case: the folder name.
    folder: absolute path of the case folder.
    images: one file name per sequence (data.nifti_image_patterns order).
    raters: one file name per rater (data.nifti_rater_patterns order).
  """
  case: str
  folder: str
  images: tuple[str, ...]
  raters: tuple[str, ...]


def _where(folder: str, file: str | None = None) -> str:
  return f'case folder {folder}' + (f', file {file}' if file else '')


def _visible_files(folder: str) -> list[str]:
  """Names of the files of `folder` not starting with '.', sorted."""
  return sorted(n for n in os.listdir(folder)
                if not n.startswith('.') and os.path.isfile(os.path.join(folder, n)))


def scan_case(folder: str, args: DataArgs, raters: bool = True) -> CaseFiles:
  """Matches the patterns in one case folder (reads no file); with raters=False
  (an unlabelled input) only the sequences' patterns, and `raters` is ()."""
  names = _visible_files(folder)
  owner: dict[str, str] = {}
  chosen = {'nifti_rater_patterns': ()}
  for key in ('nifti_image_patterns', 'nifti_rater_patterns')[:2 if raters else 1]:
    picked = []
    for i, pattern in enumerate(getattr(args, key)):
      hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
      if len(hits) != 1:
        raise DataError(
            f'{_where(folder)}: pattern {pattern!r} (data.{key}[{i}]) matches '
            f'{len(hits)} files ({", ".join(hits) or "none"}); expected exactly one')
      tag = f'{pattern!r} (data.{key}[{i}])'
      if hits[0] in owner:
        raise DataError(f'{_where(folder, hits[0])}: matched by both {owner[hits[0]]} and '
                        f'{tag}; expected each file matched by one pattern')
      owner[hits[0]] = tag
      picked.append(hits[0])
    chosen[key] = tuple(picked)
  return CaseFiles(case=os.path.basename(folder), folder=folder,
                   images=chosen['nifti_image_patterns'],
                   raters=chosen['nifti_rater_patterns'])


def _case_folders(folder: str, none_found: str | None = None) -> list[str]:
  """Names of the visible sub-folders of `folder` (natural order); DataError with
  `none_found` (or the split-folder message) when there are none."""
  names = sorted((n for n in os.listdir(folder)
                  if not n.startswith('.') and os.path.isdir(os.path.join(folder, n))),
                 key=splits_lib.natural_key)
  if not names:
    raise DataError(none_found or f'split folder {folder} holds no case folders; expected '
                    f'{folder}/<case>/ with one file per sequence and per rater')
  return names


def scan_source(args: DataArgs) -> dict[str, list[CaseFiles]]:
  """split -> cases (natural order of the folder names), split as in the docstring."""
  root = os.path.abspath(os.path.expanduser(args.source_dir))
  if not os.path.isdir(root):
    raise SourceNotFoundError(f'data.source_dir {args.source_dir!r} ({root}) does not '
                              'exist or is not a folder')
  train_dir = os.path.join(root, SPLIT_FOLDERS[TRAIN])
  test_dir = os.path.join(root, SPLIT_FOLDERS[TEST])
  if not os.path.isdir(train_dir):
    raise SourceNotFoundError(f'split folder {train_dir} does not exist; expected '
                              'ROOT/training/<case>/ (and optionally ROOT/testing/<case>/)')
  train = _case_folders(train_dir)
  test = _case_folders(test_dir) if os.path.isdir(test_dir) else []
  both = sorted(set(test) & set(train), key=splits_lib.natural_key)
  if both:
    raise DataError(f'case folder {os.path.join(test_dir, both[0])}: its name is also a '
                    f'case of {train_dir}; expected case names unique across training/ '
                    'and testing/')
  folders = {n: os.path.join(train_dir, n) for n in train}
  folders.update({n: os.path.join(test_dir, n) for n in test})
  if args.split_file:   # over both folders: e.g. all scans of one patient in one split
    by_name = splits_lib.read_split_file(args.split_file, folders, 'case')
  else:
    by_name = splits_lib.held_out_split(train, args.validation_fraction,
                                        0.0 if test else args.test_fraction, args.seed, 'case')
    if test:
      by_name[TEST] = test
  return {split: [scan_case(folders[n], args) for n in names]
          for split, names in by_name.items()}


def _load_volume(folder: str, name: str) -> nib.spatialimages.SpatialImage:
  path = os.path.join(folder, name)
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises several types for broken files
    raise DataError(f'{_where(folder, name)}: cannot read NIfTI ({type(e).__name__}: '
                    f'{e}); expected a .nii or .nii.gz volume') from e
  shape = img.shape
  if len(shape) == 4 and shape[3] == 1:
    img = img.slicer[..., 0]
  elif len(shape) != 3:
    raise DataError(f'{_where(folder, name)}: has shape {shape}; expected a 3-D volume')
  return img


def _data(img, folder: str, name: str) -> np.ndarray:
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # truncated .gz and others
    raise DataError(f'{_where(folder, name)}: cannot read the voxels '
                    f'({type(e).__name__}: {e}); expected a complete NIfTI volume') from e
  if data.dtype.kind not in 'biuf':
    raise DataError(f'{_where(folder, name)}: has dtype {data.dtype}; expected a numeric '
                    'volume')
  if data.dtype.kind == 'f' and not np.all(np.isfinite(data)):
    raise DataError(f'{_where(folder, name)}: {int(np.sum(~np.isfinite(data)))} voxel(s) '
                    'are NaN or inf; expected finite values')
  return data


def rater_mask(data: np.ndarray, where: str) -> np.ndarray:
  """A rater volume as bool (same shape): 0/1 or [0, 1] values are foreground above
  0.5 (fractional values allowed on at most MAX_FRACTIONAL of the voxels: a resampled
  mask's edges); a volume holding only 0 and 255 is foreground at 255. Anything else
  (labels 2, 3, ..., interpolated 0..255 edges, negative values, an intensity scan
  matched by mistake, [0, 1]-normalised ones included) raises DataError naming
  `where`, instead of counting every voxel > 0.5."""
  if not data.size:
    return np.zeros(data.shape, bool)
  low, high = data.min(), data.max()
  if low >= 0 and high <= 1:
    fractional = float(np.mean((data > 0) & (data < 1)))
    if fractional > MAX_FRACTIONAL:
      raise DataError(f'{where}: {fractional:.0%} of the voxels lie strictly between 0 and '
                      f'1 (an intensity scan matched by a rater pattern?); expected a mask: '
                      f'0/1, fractional only at resampled edges (at most '
                      f'{MAX_FRACTIONAL:.0%} of the voxels)')
    return data > 0.5
  if low >= 0 and high == 255 and np.all((data == 0) | (data == 255)):
    return data == 255
  distinct = np.unique(data.ravel()[:1_000_000])
  shown = ', '.join(f'{v:g}' for v in distinct[:6]) + (', ...' if len(distinct) > 6 else '')
  raise DataError(f'{where}: rater values range over [{float(low):g}, {float(high):g}] '
                  f'({shown}); expected a binary mask: values in [0, 1] (> 0.5 is '
                  'foreground) or only 0 and 255 (resample masks with nearest neighbour; '
                  'map multi-label maps to 0/1 first)')


def fit(plane: np.ndarray, size: int) -> np.ndarray:
  """[size, size, ...] from [h, w, ...]: each of the first two axes centre cropped
  (start (h - size) // 2) or centre padded with 0 (before (size - h) // 2)."""
  out = plane
  for axis in (0, 1):
    n = out.shape[axis]
    if n > size:
      start = (n - size) // 2
      out = np.take(out, np.arange(start, start + size), axis=axis)
    elif n < size:
      before = (size - n) // 2
      pad = [(0, 0)] * out.ndim
      pad[axis] = (before, size - n - before)
      out = np.pad(out, pad)
  return out


def unfit(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """The inverse of `fit`: [h, w, ...] = `shape` from [size, size, ...]; what `fit`
  cropped away is 0."""
  out = plane
  for axis in (0, 1):
    n, size = shape[axis], out.shape[axis]
    if n > size:
      start = (n - size) // 2
      pad = [(0, 0)] * out.ndim
      pad[axis] = (start, n - size - start)
      out = np.pad(out, pad)
    elif n < size:
      before = (size - n) // 2
      out = np.take(out, np.arange(before, before + n), axis=axis)
  return out


def _crop_window(shape: tuple[int, int], size: int) -> tuple[slice, slice]:
  return tuple(slice((n - size) // 2, (n - size) // 2 + size) if n > size
               else slice(0, n) for n in shape)


def case_slice_id(case: str, axis: int, index: int) -> str:
  """'<case>_<axis letter><index>', e.g. ('p01', 2, 57) -> 'p01_z57'."""
  return f'{case}_{AXIS_NAMES[axis]}{index}'


def parse_case_id(case_id: str) -> tuple[str, int, int]:
  """(case, axis, slice index) of a 'nifti' record's case_id."""
  case, _, tail = case_id.rpartition('_')
  if not case or len(tail) < 2 or tail[0] not in AXIS_NAMES or not tail[1:].isdigit():
    raise ValueError(f'case_id {case_id!r} is not <case>_<x|y|z><index>')
  return case, AXIS_NAMES.index(tail[0]), int(tail[1:])


def kept_slices(marked: np.ndarray, fraction: float, seed: int, case: str) -> np.ndarray:
  """Sorted slice indices kept of a case: every marked one plus
  round(fraction * n_empty) unmarked ones: the first in `splits.seeded_order` of
  the ids f'{case}:{index}' (salt 'empty_slices')."""
  empty = np.flatnonzero(~marked)
  count = int(round(fraction * len(empty)))
  order = splits_lib.seeded_order([f'{case}:{i}' for i in empty], seed, 'empty_slices')
  extra = empty[np.asarray(order[:count], np.int64)]
  return np.sort(np.concatenate([np.flatnonzero(marked), extra]))


def _load_case(case: CaseFiles) -> list[tuple[str, Any]]:
  """(file name, image) of the case's sequences then raters; all of one shape and
  (within AFFINE_ATOL) one affine, else DataError."""
  folder = case.folder
  vols = [(name, _load_volume(folder, name)) for name in case.images + case.raters]
  ref_name, ref = vols[0]
  for name, img in vols[1:]:
    if img.shape != ref.shape:
      raise DataError(f'{_where(folder, name)}: has shape {img.shape}, but {ref_name} has '
                      f'{ref.shape}; expected equal shapes for all sequences and raters')
    if not np.allclose(img.affine, ref.affine, rtol=0.0, atol=AFFINE_ATOL):
      diff = float(np.max(np.abs(img.affine - ref.affine)))
      raise DataError(f'{_where(folder, name)}: affine differs from {ref_name}\'s by up to '
                      f'{diff:.4g}; expected equal affines (within {AFFINE_ATOL})')
  return vols


def _sequence_slices(case: CaseFiles, vols: list[tuple[str, Any]], args: DataArgs
                     ) -> np.ndarray:
  """The sequences normalised (intensity.to_uint8) and cut along data.nifti_axis:
  uint8 [n, h, w, C]."""
  images = [intensity.to_uint8(_data(img, case.folder, name), args.percentile_low,
                               args.percentile_high) for name, img in vols[:len(case.images)]]
  return np.stack([np.moveaxis(v, args.nifti_axis, 0) for v in images], -1)


def read_input_case(case: CaseFiles, args: DataArgs) -> list[tuple[str, np.ndarray]]:
  """(case_id, image uint8 [S, S, C]) of every slice of an unlabelled case
  (`scan_case(..., raters=False)`), in order, fitted as the records are (`fit`)."""
  images = _sequence_slices(case, _load_case(case), args)
  return [(case_slice_id(case.case, args.nifti_axis, k), fit(images[k], args.image_size))
          for k in range(images.shape[0])]


def read_case(case: CaseFiles, args: DataArgs) -> list[dict[str, Any]]:
  """The records of one case (kept slices in order): image uint8 [S, S, C], masks
  uint8 [A, S, S], case_id. Checks shapes, affines, values and the crop."""
  folder = case.folder
  vols = _load_case(case)
  axis, size = args.nifti_axis, args.image_size
  masks = [rater_mask(_data(img, folder, name), _where(folder, name))
           for name, img in vols[len(case.images):]]
  # Move the slicing axis first: volume [n, h, w].
  images = _sequence_slices(case, vols, args)                        # [n, h, w, C]
  masks = np.stack([np.moveaxis(m, axis, 0) for m in masks], 1)      # [n, A, h, w]
  plane = images.shape[1:3]
  window = _crop_window(plane, size)
  inside = np.zeros(plane, bool)
  inside[window] = True
  for a, name in enumerate(case.raters):
    lost = int(masks[:, a][:, ~inside].sum())
    if lost:
      raise DataError(f'{_where(folder, name)}: {lost} marked voxel(s) lie outside the '
                      f'centre {size}x{size} crop of the {plane[0]}x{plane[1]} slices '
                      f'(data.nifti_axis={axis}); expected data.image_size >= the extent '
                      'of the marks (slices are centre cropped, never resized)')
  marked = masks.reshape(masks.shape[0], -1).any(1)
  out = []
  for k in kept_slices(marked, args.nifti_empty_fraction, args.seed, case.case):
    out.append({
        'image': fit(images[k], size),
        'masks': np.moveaxis(fit(np.moveaxis(masks[k], 0, -1), size), -1, 0
                             ).astype(np.uint8),
        'case_id': case_slice_id(case.case, axis, int(k)),
    })
  return out


def _fingerprint(splits: dict[str, list[CaseFiles]]) -> str:
  """Hash of every matched file's name, size and modification time."""
  listing = []
  for split in sorted(splits):
    for case in splits[split]:
      for name in case.images + case.raters:
        stat = os.stat(os.path.join(case.folder, name))
        listing.append((split, case.case, name, stat.st_size, stat.st_mtime_ns))
  return records.short_hash({'files': listing}, 16)


def builder_params(args: DataArgs, splits: dict[str, list[CaseFiles]]) -> dict[str, Any]:
  """Every parameter that changes the records (hashed into the config name)."""
  root = os.path.realpath(os.path.expanduser(args.source_dir))
  has_test = os.path.isdir(os.path.join(root, SPLIT_FOLDERS[TEST]))
  fractions = not args.split_file    # else the split file decides ('files' holds its split)
  seeded = ((fractions and (args.validation_fraction > 0 or
                            (not has_test and args.test_fraction > 0)))
            or 0 < args.nifti_empty_fraction < 1)
  return {
      'kind': 'cimd_nifti',
      'source_dir': root,
      'files': _fingerprint(splits),
      'image_size': args.image_size,
      'image_channels': args.image_channels,
      'num_annotators': args.num_annotators,
      'image_patterns': list(args.nifti_image_patterns),
      'rater_patterns': list(args.nifti_rater_patterns),
      'axis': args.nifti_axis,
      'percentiles': [args.percentile_low, args.percentile_high],
      'empty_fraction': args.nifti_empty_fraction,
      'validation_fraction': args.validation_fraction if fractions else None,
      'test_fraction': None if has_test or not fractions else args.test_fraction,
      'seed': args.seed if seeded else None,
      **({'split_rule': splits_lib.SPLIT_RULE} if seeded else {}),
      'format': records.VERSION,
  }


class CimdNifti(records.CimdBuilder, skip_registration=True):
  """NIfTI volumes with several raters -> ArrayRecord of 2-D slices. Build with
  `make_builder`."""

  def _info(self) -> tfds.core.DatasetInfo:
    p = self.builder_config.params
    return records.dataset_info(
        self, f'NIfTI volumes from {p["source_dir"]}',
        records.features(p['image_size'], p['image_channels'], p['num_annotators'],
                         with_structures=False))

  def _split_generators(self, dl_manager):
    del dl_manager
    args, splits = self.builder_config.payload
    records.write_params(self.data_dir, self.builder_config.params)
    return {split: self._generate_examples(args, cases) for split, cases in splits.items()}

  def _generate_examples(self, args: DataArgs, cases: list[CaseFiles]
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    index = 0
    for case in cases:
      for record in read_case(case, args):
        yield index, record
        index += 1


def make_builder(args: DataArgs, tfds_dir: str) -> CimdNifti:
  """The builder of `args` (lists the case folders and matches the patterns; reads
  no volume)."""
  splits = scan_source(args)
  params = builder_params(args, splits)
  prefix = (f's{args.image_size}_c{args.image_channels}_a{args.num_annotators}_'
            f'{AXIS_NAMES[args.nifti_axis]}')
  config = records.CimdConfig(name=records.config_name(prefix, params), params=params,
                              payload=(args, splits))
  return CimdNifti(config=config, data_dir=tfds_dir)


def check_orientations(splits: dict[str, list[CaseFiles]]) -> None:
  """Every case's voxel axes point the same anatomical way (`nib.aff2axcodes` of its
  first sequence, e.g. 'RAS'): slices are taken along one voxel axis without
  reorientation, so a case stored otherwise would give slices of another plane.
  Raises DataError naming the first case that differs from the most common one."""
  found = []      # (case folder, first sequence, codes), splits in order
  for cases in splits.values():
    for case in cases:
      name = case.images[0]
      affine = _load_volume(case.folder, name).affine
      found.append((case.folder, name, ''.join(str(c) for c in nib.aff2axcodes(affine))))
  counts = collections.Counter(codes for _, _, codes in found)
  if len(counts) < 2:
    return
  usual = counts.most_common(1)[0][0]
  example = next(os.path.join(f, n) for f, n, codes in found if codes == usual)
  folder, name, codes = next(item for item in found if item[2] != usual)
  raise DataError(
      f'{_where(folder, name)}: voxel axes are {codes} (nib.aff2axcodes), but '
      f'{counts[usual]} of {len(found)} cases\' are {usual} (e.g. {example}); expected one '
      'orientation for all cases (slices follow data.nifti_axis of the voxel array; '
      'reorient first, e.g. nib.as_closest_canonical)')


def validate(builder: CimdNifti) -> None:
  """Reads every volume of every case; raises DataError on the first bad one, and
  when a split would have no slice."""
  args, splits = builder.builder_config.payload
  check_orientations(splits)
  for split, cases in splits.items():
    counts = {case.folder: len(read_case(case, args)) for case in cases}
    total = sum(counts.values())
    dropped = [f for f, n in counts.items() if not n]
    if dropped and total:
      logging.warning(
          'split %r: %d of %d case(s) contribute no slice (no rater marked any, and '
          'data.nifti_empty_fraction=%g keeps none of their empty slices), e.g. %s; '
          'their lesion-free scans are left out of this split (set '
          'data.nifti_empty_fraction > 0 to keep empty slices)', split, len(dropped),
          len(cases), args.nifti_empty_fraction, ', '.join(dropped[:3]))
    if not total:
      raise DataError(f'split {split!r} ({len(cases)} case(s), first '
                      f'{cases[0].folder}): no slice is marked by any rater and '
                      f'data.nifti_empty_fraction={args.nifti_empty_fraction} keeps none; '
                      'expected at least one slice')


def input_case_folders(input_dir: str, args: DataArgs) -> list[str]:
  """The unlabelled case folders of `sampling.input_dir` (natural order; read each
  with `scan_case(folder, args, raters=False)`): INPUT/<case>/ folders, or INPUT
  itself when it holds a file for every data.nifti_image_patterns entry."""
  root = os.path.abspath(os.path.expanduser(input_dir))
  if not os.path.isdir(root):
    raise SourceNotFoundError(f'sampling.input_dir {input_dir!r} ({root}) does not exist or '
                              'is not a folder')
  files = _visible_files(root)        # as scan_case sees them
  if all(any(fnmatch.fnmatchcase(n, p) for n in files) for p in args.nifti_image_patterns):
    return [root]
  names = _case_folders(root, f'sampling.input_dir {root}: holds no case folder and no file '
                        f'of each of data.nifti_image_patterns {list(args.nifti_image_patterns)}; '
                        'expected INPUT/<case>/ with one file per sequence')
  return [os.path.join(root, n) for n in names]


# --------------------------------------------------------------------------- write-back


def reference_file(args: DataArgs, case: str) -> str:
  """Path of the case's first sequence (data.nifti_image_patterns[0]): the volume
  whose shape and affine `write_volume` copies."""
  root = os.path.abspath(os.path.expanduser(args.source_dir))
  for sub in SPLIT_FOLDERS.values():
    folder = os.path.join(root, sub, case)
    if os.path.isdir(folder):
      found = scan_case(folder, args)
      return os.path.join(folder, found.images[0])
  raise SourceNotFoundError(f'case {case!r}: no folder {root}/training/{case} or '
                            f'{root}/testing/{case}')


def _save_atomic(img: nib.Nifti1Image, path: str) -> None:
  """Saves under a temporary name with the same extension, then renames."""
  folder, base = os.path.split(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f'.tmp-{os.getpid()}-{base}')
  try:
    nib.save(img, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_volume(path: str, slices: dict[int, np.ndarray], reference_path: str,
                 axis: int, dtype: Any = None) -> str:
  """Writes per-slice arrays back as a NIfTI volume shaped like the reference.

  Args:
    path: output file (.nii or .nii.gz), written atomically.
    slices: slice index along `axis` -> array [S, S] (one value per voxel) or
      [N, S, S] (N values per voxel, e.g. N sampled masks), as in the records
      (S = image_size); each is un-padded/un-cropped (`unfit`) to the slice plane.
    reference_path: the input volume whose shape [X, Y, Z] and affine are copied.
    axis: the data.nifti_axis the slices were cut along.
    dtype: stored dtype (default: the slices' common dtype).

  Returns:
    `path`. The volume is [X, Y, Z] or [X, Y, Z, N]; slices not given are 0.
  """
  ref = nib.load(reference_path)
  shape = tuple(ref.shape[:3])
  values = [np.asarray(v) for v in slices.values()]
  where = f'writing {path} (reference {reference_path})'
  if not values:
    raise ValueError(f'{where}: no slice given; expected at least one')
  ndim = values[0].ndim
  if (ndim not in (2, 3) or any(v.ndim != ndim for v in values)
      or any(v.shape[-1] != v.shape[-2] for v in values)):
    raise ValueError(f'{where}: slice shapes {sorted({v.shape for v in values})}; expected '
                     'all [S, S] or all [N, S, S] (channels-last [S, S, 1] is not a slice)')
  extra = values[0].shape[:1] if ndim == 3 else ()
  dtype = np.dtype(dtype) if dtype is not None else np.result_type(*values)
  plane = tuple(n for a, n in enumerate(shape) if a != axis)
  moved = np.zeros((shape[axis],) + plane + extra, dtype)   # [n, h, w(, N)]
  for index, value in slices.items():
    if not 0 <= index < shape[axis]:
      raise ValueError(f'{where}: slice {index} is outside 0..{shape[axis] - 1} (axis {axis})')
    if ndim == 3:
      value = np.moveaxis(value, 0, -1)
      if value.shape[-1] != extra[0]:
        raise ValueError(f'{where}: slice {index} holds {value.shape[-1]} values per voxel, '
                         f'slice {next(iter(slices))} {extra[0]}; expected the same N')
    moved[index] = unfit(value, plane).astype(dtype)
  volume = np.moveaxis(moved, 0, axis)
  header = ref.header.copy() if isinstance(ref, nib.Nifti1Image) else None
  out = nib.Nifti1Image(volume, ref.affine, header)
  out.set_data_dtype(dtype)
  out.header.set_slope_inter(1.0, 0.0)
  # The scan's display window (e.g. cal_max 1500) would show 0/1 masks as black.
  out.header['cal_min'], out.header['cal_max'] = 0.0, 0.0
  _save_atomic(out, path)
  return path


def write_samples(output_dir: str, case: str, samples: dict[int, np.ndarray],
                  reference_path: str, axis: int) -> tuple[str, str]:
  """Writes a case's sampled masks and their frequency map next to each other.

  Args:
    samples: slice index -> {0, 1} (or bool) masks [N, S, S] of that slice.

  Returns:
    (OUTPUT_DIR/<case>_samples.nii.gz: uint8 [X, Y, Z, N] in {0, 1},
     OUTPUT_DIR/<case>_frequency.nii.gz: float32 [X, Y, Z], the mean of the N
     masks per voxel), both with the reference's affine; unsampled slices are 0.
  """
  masks = {k: (np.asarray(v) > 0).astype(np.uint8) for k, v in samples.items()}
  freq = {k: v.mean(0, dtype=np.float32) for k, v in masks.items()}
  samples_path = os.path.join(output_dir, f'{case}_samples.nii.gz')
  freq_path = os.path.join(output_dir, f'{case}_frequency.nii.gz')
  write_volume(samples_path, masks, reference_path, axis, np.uint8)
  write_volume(freq_path, freq, reference_path, axis, np.float32)
  return samples_path, freq_path


def write_sampled_cases(output_dir: str, axis: int, drawn: list[tuple[str, np.ndarray]],
                        reference_of: Callable[[str], str]) -> dict[str, dict[str, Any]]:
  """Writes every case's sampled slices back as NIfTI volumes (`write_samples`).

  Args:
    output_dir: folder for <case>_samples.nii.gz and <case>_frequency.nii.gz.
    axis: the data.nifti_axis the slices were cut along.
    drawn: per sampled slice, (its case_id '<case>_<x|y|z><index>', masks bool
      [N, S, S]).
    reference_of: case name -> the volume whose shape and affine the output takes
      (`reference_file` for a split's case, the first sequence of an input case).

  Returns:
    case -> {'samples': file name, 'frequency': file name, 'slices': the sampled slice
    indices along data.nifti_axis}; the volumes are 0 on every other slice.
  """
  by_case: dict[str, dict[int, np.ndarray]] = collections.defaultdict(dict)
  for case_id, masks in drawn:
    case, cut, index = parse_case_id(case_id)
    if cut != axis:
      raise DataError(f'record {case_id!r} was cut along {AXIS_NAMES[cut]}; expected '
                      f'data.nifti_axis={axis} ({AXIS_NAMES[axis]})')
    by_case[case][index] = masks
  written = {}
  for case, slices in by_case.items():
    paths = write_samples(output_dir, case, slices, reference_of(case), axis)
    written[case] = {'samples': os.path.basename(paths[0]),
                     'frequency': os.path.basename(paths[1]), 'slices': sorted(slices)}
  return written
