"""TFDS builder for the PHiSeg LIDC HDF5 file (`data.name='lidc_hdf5'`).

The layout written by PHiSeg's preprocessing (baumgach/PHiSeg-code,
data/lidc_data_loader.py, `prepare_data`), one file with a group per split:

  /train/images  float64 [N, H, W]      LIDC pickle image - 0.5, i.e. in [-0.5, 0.5]
  /train/labels  uint8   [N, H, W, A]   the A = 4 readers' masks, {0, 1}, annotator last
  /train/uids    int64   [N]            Python hash() of series_uid (ignored: salted
                                        per process, not a stable patient id)
  /val/...  /test/...                   same

`data.source_dir` is the .hdf5/.h5 file or a folder holding exactly one. Groups map
to splits 'train' <- train, 'validation' <- val, 'test' <- test ('train' is
required; a missing val or test group means no such split; any other top-level key,
e.g. 'validation', is refused rather than dropped); the file's own split is used as
is (data.validation_fraction / test_fraction are ignored). Records:

  image    uint8 [H, W, C]  float images: rint((clip(x, lo, hi) - lo) / (hi - lo) * 255)
                            with (lo, hi) = data.hdf5_image_range (default (-0.5, 0.5));
                            uint8 images are kept; replicated to C channels
  masks    uint8 [A, H, W]  label value > 0.5 is foreground
  case_id  '<group>_<index:05d>', e.g. 'val_00012' (the row in the file's group)

Read lazily, `READ_ROWS` slices at a time. Every value is checked before anything is
written (a first pass); a bad one, or float images that never reach the range's lower
half, raises `DataError` naming the file, key (e.g. 'val/labels'), row and expectation.
"""

import dataclasses
import os
from typing import Any, Iterator

import h5py
import numpy as np
import tensorflow_datasets as tfds

from cimd_jax.data import intensity
from cimd_jax.data import records
from cimd_jax.data.args import DataArgs, TEST, TRAIN, VALIDATION
from cimd_jax.data.records import DataError, SourceNotFoundError

GROUPS = {'train': TRAIN, 'val': VALIDATION, 'test': TEST}   # file group -> split
EXTENSIONS = ('.hdf5', '.h5')
READ_ROWS = 64        # slices per read
_TOLERANCE = 1e-6     # relative to the image range / label range


@dataclasses.dataclass(frozen=True)
class Group:
  """One split's datasets in the file."""
  group: str      # the file's group name: 'train', 'val' or 'test'
  split: str      # our split name
  num: int        # N, rows
  height: int     # H of a slice
  width: int      # W of a slice


def find_file(source_dir: str) -> str:
  """The HDF5 file: `source_dir` itself, or the one .hdf5/.h5 file in that folder."""
  path = os.path.abspath(os.path.expanduser(source_dir))
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise SourceNotFoundError(f'data.source_dir {source_dir!r} ({path}) does not exist; '
                              'expected the PHiSeg .hdf5 file or its folder')
  found = sorted(n for n in os.listdir(path) if n.lower().endswith(EXTENSIONS)
                 and os.path.isfile(os.path.join(path, n)))
  if len(found) != 1:
    raise DataError(f'data.source_dir {path} holds {len(found)} HDF5 files '
                    f'({", ".join(found) or "none"}); expected exactly one .hdf5/.h5 file '
                    '(or set data.source_dir to the file)')
  return os.path.join(path, found[0])


def _open(path: str) -> h5py.File:
  try:
    return h5py.File(path, 'r')
  except Exception as e:  # h5py raises OSError and others for non-HDF5 files
    raise DataError(f'file {path}: cannot open as HDF5 ({type(e).__name__}: {e}); '
                    'expected the PHiSeg LIDC .hdf5 file') from e


def scan(path: str, args: DataArgs) -> list[Group]:
  """The groups of the file with their shapes checked (reads metadata only)."""
  out = []
  with _open(path) as f:
    if 'train' not in f:
      raise DataError(f"file {path}: has no group 'train' (has {sorted(f.keys())}); "
                      "expected groups 'train', 'val', 'test' (PHiSeg layout)")
    if other := sorted(set(f.keys()) - set(GROUPS)):
      raise DataError(f"file {path}: has top-level key(s) {other}; expected only the "
                      "groups 'train', 'val', 'test' (PHiSeg layout)")
    for group, split in ((k, v) for k, v in GROUPS.items() if k in f):
      g = f[group]
      if not isinstance(g, h5py.Group):
        raise DataError(f"file {path}, key '{group}': is a {type(g).__name__}, not a "
                        f"group; expected '{group}/images' and '{group}/labels' in it")
      for name in ('images', 'labels'):
        if not isinstance(g.get(name), h5py.Dataset):
          raise DataError(f"file {path}, key '{group}/{name}': missing; expected "
                          f"datasets '{group}/images' [N, H, W] and '{group}/labels' "
                          '[N, H, W, A]')
      images, labels = g['images'], g['labels']
      where = f"file {path}, key '{group}/images'"
      if images.ndim != 3:
        raise DataError(f'{where}: has shape {images.shape}; expected [N, H, W]')
      if images.dtype.kind != 'f' and images.dtype != np.uint8:
        raise DataError(f'{where}: has dtype {images.dtype}; expected float or uint8')
      where = f"file {path}, key '{group}/labels'"
      if labels.ndim != 4:
        raise DataError(f'{where}: has shape {labels.shape}; expected [N, H, W, A]')
      if labels.dtype.kind not in 'biuf':
        raise DataError(f'{where}: has dtype {labels.dtype}; expected uint8 0/1')
      if labels.shape[:3] != images.shape:
        raise DataError(f'{where}: has shape {labels.shape}; expected [N, H, W] equal to '
                        f"'{group}/images' {images.shape}, then A")
      if labels.shape[3] != args.num_annotators:
        raise DataError(f'{where}: has {labels.shape[3]} annotator(s) (shape '
                        f'{labels.shape}); expected {args.num_annotators} '
                        '(data.num_annotators)')
      n, h, w = images.shape
      if not (n and h and w):
        raise DataError(f"file {path}, key '{group}/images': has shape {images.shape}; "
                        'expected N, H, W > 0')
      if (h, w) != (args.image_size, args.image_size) and not args.resize:
        raise DataError(f"file {path}, key '{group}/images': slices are {h}x{w}, "
                        f'expected {args.image_size}x{args.image_size} (data.image_size;'
                        ' set data.resize=True to resize)')
      out.append(Group(group, split, n, h, w))
  return out


def _check_rows(path: str, group: str, start: int, images: np.ndarray,
                labels: np.ndarray, args: DataArgs) -> None:
  """Value checks of rows [start, start + len(images)); DataError names the row."""
  if images.dtype.kind == 'f':
    lo, hi = args.hdf5_image_range
    tol = _TOLERANCE * (hi - lo)
    bad = ~np.isfinite(images) | (images < lo - tol) | (images > hi + tol)
    if bad.any():
      row = int(np.argwhere(bad)[0][0])
      value = images[row][bad[row]][0]
      raise DataError(f"file {path}, key '{group}/images', row {start + row}: value "
                      f'{value} outside data.hdf5_image_range [{lo}, {hi}]; expected '
                      'finite values in that range')
  bad = ~np.isfinite(labels) | (labels < -_TOLERANCE) | (labels > 1 + _TOLERANCE)
  if bad.any():
    row = int(np.argwhere(bad)[0][0])
    value = labels[row][bad[row]][0]
    raise DataError(f"file {path}, key '{group}/labels', row {start + row}: value "
                    f'{value}; expected labels in [0, 1] (0/1 masks)')


def _convert(image: np.ndarray, labels: np.ndarray, args: DataArgs) -> dict[str, Any]:
  """image [H, W], labels [H, W, A] -> record image uint8 [S, S, C], masks [A, S, S]."""
  if image.dtype != np.uint8:
    lo, hi = args.hdf5_image_range
    image = intensity.scale(image, lo, hi)
  size = args.image_size
  image = intensity.resize_u8(image, size)
  masks = np.stack([intensity.resize_mask((labels[..., a] > 0.5).astype(np.uint8), size)
                    for a in range(labels.shape[-1])])
  return {'image': np.repeat(image[..., None], args.image_channels, -1), 'masks': masks}


def blocks(path: str, group: Group) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """(start, images [n, H, W], labels [n, H, W, A]) of one group, READ_ROWS rows at
  a time (n <= READ_ROWS): the only reads of the file's pixels."""
  with _open(path) as f:
    images, labels = f[group.group]['images'], f[group.group]['labels']
    for start in range(0, group.num, READ_ROWS):
      stop = min(start + READ_ROWS, group.num)
      try:
        block = images[start:stop], labels[start:stop]
      except Exception as e:  # h5py: OSError for corrupt data, missing filters, ...
        raise DataError(f"file {path}, key '{group.group}': cannot read rows {start}.."
                        f'{stop - 1} ({type(e).__name__}: {e}); expected readable data') from e
      yield start, *block


def read_rows(path: str, group: Group, args: DataArgs
              ) -> Iterator[tuple[int, dict[str, Any]]]:
  """(row, record) of every row of one group, in file order."""
  for start, images, labels in blocks(path, group):
    for i in range(len(images)):
      record = _convert(images[i], labels[i], args)
      record['case_id'] = f'{group.group}_{start + i:05d}'
      yield start + i, record


def builder_params(args: DataArgs, path: str) -> dict[str, Any]:
  """Every parameter that changes the records (hashed into the config name)."""
  stat = os.stat(path)
  return {'kind': 'cimd_lidc_hdf5', 'file': os.path.realpath(path), 'size': stat.st_size,
          'mtime_ns': stat.st_mtime_ns, 'image_size': args.image_size,
          'image_channels': args.image_channels, 'num_annotators': args.num_annotators,
          'resize': args.resize, 'hdf5_image_range': list(args.hdf5_image_range),
          'format': records.VERSION}


class CimdLidcHdf5(records.CimdBuilder, skip_registration=True):
  """PHiSeg LIDC HDF5 -> ArrayRecord. Build with `make_builder`."""

  def _info(self) -> tfds.core.DatasetInfo:
    p = self.builder_config.params
    return records.dataset_info(
        self, f'PHiSeg LIDC HDF5 file {p["file"]}',
        records.features(p['image_size'], p['image_channels'], p['num_annotators'],
                         with_structures=False))

  def _split_generators(self, dl_manager):
    del dl_manager
    args, path, groups = self.builder_config.payload
    records.write_params(self.data_dir, self.builder_config.params)
    return {g.split: self._generate_examples(path, g, args) for g in groups}

  def _generate_examples(self, path: str, group: Group, args: DataArgs
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    yield from read_rows(path, group, args)


def make_builder(args: DataArgs, tfds_dir: str) -> CimdLidcHdf5:
  """The builder of `args` (opens the file for its shapes; reads no pixels)."""
  path = find_file(args.source_dir)
  groups = scan(path, args)
  params = builder_params(args, path)
  prefix = f's{args.image_size}_c{args.image_channels}_a{args.num_annotators}'
  config = records.CimdConfig(name=records.config_name(prefix, params), params=params,
                              payload=(args, path, groups))
  return CimdLidcHdf5(config=config, data_dir=tfds_dir)


def validate(builder: CimdLidcHdf5) -> None:
  """Reads every row of every group once; raises DataError on the first bad value,
  or when no float image value reaches the lower half of data.hdf5_image_range."""
  args, path, groups = builder.builder_config.payload
  least = np.inf        # smallest float image value in the file
  for group in groups:
    for start, images, labels in blocks(path, group):
      _check_rows(path, group.group, start, images, labels, args)
      if images.dtype.kind == 'f' and images.size:
        least = min(least, float(images.min()))
  lo, hi = args.hdf5_image_range
  if np.isfinite(least) and least >= (lo + hi) / 2:  # PHiSeg's crops hold air at lo
    raise DataError(f"file {path}, key 'images': every float value is >= {least:.4g}, in "
                    f'the upper half of data.hdf5_image_range [{lo}, {hi}]; expected the '
                    'range the images were scaled to (e.g. (0.0, 1.0) for unshifted ones)')
