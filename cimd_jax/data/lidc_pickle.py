"""TFDS builder for the LIDC pickles of the Probabilistic U-Net (`data.name='lidc_pickle'`;
over 250 lines because the chunked reader, the record checks and the patient-level
split each keep their one-line errors).

  source_dir/*.pickle   each a dict  key -> {'image': float [H, W] in [0, 1],
                                             'masks': list of A arrays [H, W] in [0, 1],
                                             'series_uid': str}

(the 128x128 LIDC-IDRI crops, one record per slice, A = 4 readers). Records:

  image    uint8 [H, W, C]   round(x * 255) (np.rint, half to even), replicated to C
  masks    uint8 [A, H, W]   value > 0.5 is foreground
  case_id  the record key (str)

Splits are by patient (`series_uid`), never by slice: a seeded split
(`splits.held_out_split` with data.test_fraction, data.validation_fraction,
data.seed) or `data.split_file`, a JSON file mapping 'train' / 'validation' / 'test'
to lists of **series_uids**. Within a split records are in natural order of the key.

Files are read whole, in chunks of fewer than 2**31 bytes into one bytearray, then
unpickled (`read_pickle`): some platforms cannot read 2 GiB or more in one call.
Unpickling runs code from the file: read only pickles you trust.

Every record of every file is checked before anything is written; a bad one raises
`DataError` naming the file, the record key and what was expected.
"""

import hashlib
import os
import pickle
from typing import Any, BinaryIO, Iterator

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from cimd_jax.data import intensity
from cimd_jax.data import records
from cimd_jax.data import splits as splits_lib
from cimd_jax.data.args import DataArgs
from cimd_jax.data.records import DataError, SourceNotFoundError

# Largest read per call: < 2**31 bytes (Python's file read fails at 2 GiB on some
# platforms). Tests lower it to exercise several chunks with a small file.
CHUNK_BYTES = 2**31 - 1
RECORD_KEYS = ('image', 'masks', 'series_uid')
_TOLERANCE = 1e-6   # float values this far outside [0, 1] still count as in range


def read_bytes(f: BinaryIO, size: int, chunk_bytes: int) -> bytearray:
  """The first `size` bytes of binary file `f`, read in chunks of <= chunk_bytes."""
  if chunk_bytes < 1:
    raise ValueError(f'chunk_bytes must be >= 1, got {chunk_bytes}')
  buf = bytearray(size)
  view = memoryview(buf)
  done = 0
  while done < size:
    got = f.readinto(view[done:done + min(chunk_bytes, size - done)])
    if not got:
      raise EOFError(f'file ended after {done} of {size} bytes')
    done += got
  return buf


def read_pickle(path: str, chunk_bytes: int | None = None) -> Any:
  """The unpickled content of `path`, read in chunks (module docstring).

  Raises:
    DataError naming the file when it cannot be read or unpickled.
  """
  chunk = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
  try:
    with open(path, 'rb') as f:
      data = read_bytes(f, os.fstat(f.fileno()).st_size, chunk)
    return pickle.loads(data)
  except Exception as e:  # unpickling raises many types on a broken file
    raise DataError(f'file {path}: cannot read pickle ({type(e).__name__}: {e}); '
                    'expected a pickled dict key -> record') from e


def list_pickles(source_dir: str) -> list[str]:
  """Absolute paths of the *.pickle files of `source_dir`, sorted by name."""
  root = os.path.abspath(os.path.expanduser(source_dir))
  if not os.path.isdir(root):
    raise SourceNotFoundError(f'data.source_dir {source_dir!r} ({root}) does not exist '
                              'or is not a folder; expected a folder of *.pickle files')
  names = sorted(n for n in os.listdir(root)
                 if not n.startswith('.') and os.path.isfile(os.path.join(root, n)))
  files = [n for n in names if n.endswith('.pickle')]
  if skipped := [n for n in names if n not in files]:   # e.g. part1.pkl: said, not silent
    logging.warning('data.source_dir %s: %d file(s) not named *.pickle are not read (%s)',
                    root, len(skipped), ', '.join(skipped[:5]) + ' ...' * (len(skipped) > 5))
  if not files:
    raise DataError(f'data.source_dir {root} holds no *.pickle file; expected LIDC '
                    'pickles (dict key -> image, masks, series_uid)')
  return [os.path.join(root, n) for n in files]


def _range_problem(x: np.ndarray) -> str | None:
  """Why `x` is not in [0, 1] (within _TOLERANCE), or None when it is."""
  if not x.size:
    return None
  finite = np.isfinite(x)
  if not finite.all():
    return f'{int((~finite).sum())} value(s) are NaN or inf'
  if x.min() < -_TOLERANCE or x.max() > 1 + _TOLERANCE:
    return f'values are in [{x.min()}, {x.max()}]'
  return None


def _numeric(value: Any, where: str, what: str) -> np.ndarray:
  try:
    arr = np.asarray(value)
  except Exception as e:  # ragged lists and odd objects
    raise DataError(f'{where}: {what} is not an array ({type(e).__name__}); expected a '
                    'numeric array') from None
  if arr.dtype.kind not in 'biuf':
    raise DataError(f'{where}: {what} has dtype {arr.dtype}; expected a numeric array')
  return arr


def check_record(value: Any, path: str, key: Any, args: DataArgs) -> str:
  """Checks one pickle record; returns its series_uid. DataError names file and key."""
  where = f'file {path}, record key {key!r}'
  if not isinstance(value, dict):
    raise DataError(f'{where}: is a {type(value).__name__}; expected a dict with keys '
                    f'{", ".join(RECORD_KEYS)}')
  for name in RECORD_KEYS:
    if name not in value:
      raise DataError(f"{where}: missing key '{name}'; expected a dict with keys "
                      f'{", ".join(RECORD_KEYS)}')
  uid = value['series_uid']
  if not isinstance(uid, str) or not uid:
    raise DataError(f"{where}, key 'series_uid': is {uid!r}; expected a non-empty "
                    'string (the patient series)')
  image = _numeric(value['image'], f"{where}, key 'image'", 'the image')
  if image.ndim != 2 or not image.size:
    raise DataError(f"{where}, key 'image': has shape {image.shape}; expected a 2-D "
                    'array [H, W] with H, W > 0')
  if problem := _range_problem(image):
    raise DataError(f"{where}, key 'image': {problem}; expected floats in [0, 1]")
  if image.shape != (args.image_size, args.image_size) and not args.resize:
    raise DataError(f"{where}, key 'image': is {image.shape[0]}x{image.shape[1]}, "
                    f'expected {args.image_size}x{args.image_size} (data.image_size; '
                    'set data.resize=True to resize)')
  masks = value['masks']
  if isinstance(masks, np.ndarray) and masks.ndim == 3:
    masks = list(masks)
  if not isinstance(masks, (list, tuple)):
    raise DataError(f"{where}, key 'masks': is a {type(masks).__name__}; expected a "
                    f'list of {args.num_annotators} arrays (data.num_annotators)')
  if len(masks) != args.num_annotators:
    raise DataError(f"{where}, key 'masks': has {len(masks)} mask(s); expected "
                    f'{args.num_annotators} (data.num_annotators)')
  for i, m in enumerate(masks):
    mask = _numeric(m, f"{where}, key 'masks'[{i}]", 'the mask')
    if mask.shape != image.shape:
      raise DataError(f"{where}, key 'masks'[{i}]: has shape {mask.shape}; expected "
                      f"the image's shape {image.shape}")
    if problem := _range_problem(mask):
      raise DataError(f"{where}, key 'masks'[{i}]: {problem}; expected values in [0, 1]")
  return uid


def convert_record(value: dict[str, Any], key: str, args: DataArgs) -> dict[str, Any]:
  """The stored record of a checked pickle record: image uint8 [H, W, C] =
  round(x * 255), masks uint8 [A, H, W] = value > 0.5, case_id = key."""
  image = np.asarray(value['image'], np.float64)
  image = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  masks = [(np.asarray(m, np.float64) > 0.5).astype(np.uint8) for m in value['masks']]
  size = args.image_size
  image = intensity.resize_u8(image, size)
  masks = np.stack([intensity.resize_mask(m, size) for m in masks])
  return {'image': np.repeat(image[..., None], args.image_channels, -1),
          'masks': masks, 'case_id': key}


class Source:
  """The pickles of `args.source_dir`, loaded and checked on first use (cached).

  Attributes:
    args: the DataArgs.
    files: absolute paths of the pickles.
  """

  def __init__(self, args: DataArgs, files: list[str]):
    self.args = args
    self.files = files
    self._loaded: tuple[dict[str, tuple[str, dict]], dict[str, list[str]]] | None = None

  def load(self) -> tuple[dict[str, tuple[str, dict]], dict[str, list[str]]]:
    """(key -> (file, record), split -> keys in natural order); reads and checks
    every record of every file and makes the patient-level split."""
    if self._loaded is None:
      entries: dict[str, tuple[str, dict]] = {}
      uid_of: dict[str, str] = {}
      for path in self.files:
        data = read_pickle(path)
        if not isinstance(data, dict):
          raise DataError(f'file {path}: holds a {type(data).__name__}; expected a dict '
                          'key -> record')
        for key, value in data.items():
          uid = check_record(value, path, key, self.args)
          name = str(key)
          if name in entries:
            raise DataError(f'file {path}, record key {key!r}: also in '
                            f'{entries[name][0]}; expected each key once')
          entries[name] = (path, value)
          uid_of[name] = uid
      args = self.args
      if args.split_file:
        by_uid = splits_lib.read_split_file(args.split_file, uid_of.values(), 'series_uid')
      else:
        by_uid = splits_lib.held_out_split(uid_of.values(), args.validation_fraction,
                                           args.test_fraction, args.seed,
                                           'patient (series_uid)')
      split_of = {uid: split for split, uids in by_uid.items() for uid in uids}
      keys: dict[str, list[str]] = {split: [] for split in by_uid}
      for name in sorted(entries, key=splits_lib.natural_key):
        keys[split_of[uid_of[name]]].append(name)
      self._loaded = (entries, keys)
    return self._loaded


def _file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def builder_params(args: DataArgs, files: list[str]) -> dict[str, Any]:
  """Every parameter that changes the records (hashed into the config name)."""
  listing = []
  for path in files:
    stat = os.stat(path)
    listing.append((os.path.basename(path), stat.st_size, stat.st_mtime_ns))
  split_file = None
  if args.split_file:
    path = os.path.realpath(os.path.expanduser(args.split_file))
    if not os.path.isfile(path):
      raise DataError(f'data.split_file {args.split_file}: does not exist; expected a '
                      'JSON file')
    split_file = {'path': path, 'sha256': _file_sha256(path)}
  seeded = not args.split_file and (args.validation_fraction > 0 or args.test_fraction > 0)
  return {
      'kind': 'cimd_lidc_pickle',
      'source_dir': os.path.realpath(os.path.expanduser(args.source_dir)),
      'files': listing,
      'image_size': args.image_size,
      'image_channels': args.image_channels,
      'num_annotators': args.num_annotators,
      'resize': args.resize,
      'split_file': split_file,
      'validation_fraction': None if args.split_file else args.validation_fraction,
      'test_fraction': None if args.split_file else args.test_fraction,
      'seed': args.seed if seeded else None,
      **({'split_rule': splits_lib.SPLIT_RULE} if seeded else {}),
      'format': records.VERSION,
  }


class CimdLidcPickle(records.CimdBuilder, skip_registration=True):
  """LIDC pickles -> ArrayRecord. Build with `make_builder`."""

  def _info(self) -> tfds.core.DatasetInfo:
    p = self.builder_config.params
    return records.dataset_info(
        self, f'LIDC pickles from {p["source_dir"]}',
        records.features(p['image_size'], p['image_channels'], p['num_annotators'],
                         with_structures=False))

  def _split_generators(self, dl_manager):
    del dl_manager
    source: Source = self.builder_config.payload
    entries, keys = source.load()
    records.write_params(self.data_dir, self.builder_config.params)
    return {split: self._generate_examples(source.args, entries, names)
            for split, names in keys.items()}

  def _generate_examples(self, args: DataArgs, entries: dict[str, tuple[str, dict]],
                         names: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, name in enumerate(names):
      yield index, convert_record(entries[name][1], name, args)


def make_builder(args: DataArgs, tfds_dir: str) -> CimdLidcPickle:
  """The builder of `args` (lists and stats the files; reads no record)."""
  files = list_pickles(args.source_dir)
  params = builder_params(args, files)
  prefix = f's{args.image_size}_c{args.image_channels}_a{args.num_annotators}'
  config = records.CimdConfig(name=records.config_name(prefix, params), params=params,
                              payload=Source(args, files))
  return CimdLidcPickle(config=config, data_dir=tfds_dir)


def validate(builder: CimdLidcPickle) -> None:
  """Reads and checks every record of every pickle and makes the split (kept for the
  writing that follows); raises DataError on the first bad record."""
  builder.builder_config.payload.load()
