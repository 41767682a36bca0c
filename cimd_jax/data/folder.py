"""TFDS builder for the CIMD folder layout (LIDC crops as shipped by the official repo);
over 250 lines because every check of the layout keeps its one-line error here.

  ROOT/training/<case>/image_<anything>.<ext>   the image (one file; or C single-
                                                channel files stacked as channels)
  ROOT/training/<case>/label<i>_<anything>.<ext>  expert i = 0 .. A-1
  ROOT/testing/<case>/...                       same, the 'test' split

A file's type is its name up to the first '_', as the official CIMD loader reads it
('image_case0042.jpg' is the image, 'label2_.jpg' and 'label2_anna.png' expert 2;
'label2.jpg' too); other files are ignored and listed once in the log, and two files
claiming the same expert are an error. Cases are ordered by natural sort of the
folder names ('2' before '10'); that is the record order of every split; several
image files stack in natural order of their names; <ext> is jpg, jpeg, png, bmp, tif or
tiff. A label pixel is
foreground when > mask_threshold (127 of 255: the masks are JPEGs, and `> 0` would
add JPEG ringing as foreground). Images wider than 8 bits (16-bit PNG/TIFF, float
TIFF) are mapped to 8 bits per image by the percentile rule of `intensity`; 8-bit
images are kept byte for byte.

A case folder name in both training/ and testing/ is refused when the two hold the
same image bytes (one case copied into both splits: the model would be scored on
images it trained on); same names with other images (splits numbered separately)
are read as two cases.

Everything is validated before anything is written: bad input raises `DataError` (a
ValueError; `SourceNotFoundError` is also a FileNotFoundError) naming the case folder
and the file and saying what was expected.
"""

import dataclasses
import filecmp
import os
import re
from typing import Any, Iterator

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cimd_jax.data import intensity
from cimd_jax.data import records
from cimd_jax.data import splits as splits_lib
from cimd_jax.data.splits import natural_key  # re-exported: folder.natural_key
from cimd_jax.data.args import DataArgs, TEST, TRAIN, VALIDATION

SPLIT_FOLDERS = {TRAIN: 'training', TEST: 'testing'}
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')   # as image_folder's
# A file's type is its name up to the first '_' (the official CIMD loader's rule), or
# the name without extension when it has no '_': 'image' or 'label<i>'.
_LABEL_TYPE = re.compile(r'^label(\d+)$', re.IGNORECASE)
# Modes PIL gives 8-bit images in (wider ones are mapped to L by `to_8bit`).
_IMAGE_MODES = {'L': 1, 'LA': 2, 'RGB': 3, 'RGBA': 4}
_MASK_MODES = ('L', '1')


# Defined in records.py (shared by every reader), exported here as before.
DataError = records.DataError
SourceNotFoundError = records.SourceNotFoundError


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  """The files of one case folder.

  Attributes:
    case_id: the folder name.
    folder: absolute path of the case folder.
    images: image file names (type 'image'), in natural order of their names.
    labels: label file names, label0 .. label{A-1} in expert order.
    ignored: files of the folder that are neither (other types or extensions).
  """
  case_id: str
  folder: str
  images: tuple[str, ...]
  labels: tuple[str, ...]
  ignored: tuple[str, ...] = ()


def file_type(name: str) -> str:
  """The type of a case file by the official CIMD loader's rule: the name up to the
  first '_' ('image_case42.png' -> 'image', 'label2_.jpg' -> 'label2'), or the name
  without its extension when there is no '_' ('label2.jpg' -> 'label2'); lower case."""
  stem = name.split('_', 1)[0] if '_' in name else os.path.splitext(name)[0]
  return stem.lower()


def _where(folder: str, file: str | None = None) -> str:
  return f'case folder {folder}' + (f', file {file}' if file else '')


def scan_case(folder: str, num_annotators: int) -> CaseFiles:
  """Lists and checks the file names of one case folder (reads no pixels).

  By the official loader's rule (`file_type`), files of type 'image' with an image
  extension are the image (several stack as channels in natural order of their
  names) and files of type 'label<i>' are expert i; two files claiming the same
  expert are an error; anything else is ignored (and listed in `ignored`).
  """
  images, labels, ignored = [], {}, []
  for name in sorted(os.listdir(folder), key=natural_key):
    if name.startswith('.') or os.path.isdir(os.path.join(folder, name)):
      continue
    kind = file_type(name)
    is_image_file = name.lower().endswith(EXTENSIONS)
    if kind == 'image' and is_image_file:
      images.append(name)
    elif (m := _LABEL_TYPE.match(kind)) and is_image_file:
      index = int(m.group(1))
      if index in labels:
        raise DataError(f'{_where(folder, name)}: two label files for expert {index} '
                        f'({labels[index]} and {name}); expected one label{index}_* file')
      labels[index] = name
    else:
      ignored.append(name)
  if not images:
    raise DataError(f'{_where(folder)}: no image file; expected image_<anything>.<ext> '
                    f'with <ext> one of {", ".join(EXTENSIONS)}')
  expected = set(range(num_annotators))
  missing, extra = sorted(expected - set(labels)), sorted(set(labels) - expected)
  if missing or extra:
    parts = []
    if missing:
      parts.append('missing ' + ', '.join(f'label{i}_*' for i in missing))
    if extra:
      parts.append('extra ' + ', '.join(labels[i] for i in extra))
    raise DataError(
        f'{_where(folder)}: has {len(labels)} label file(s) '
        f'({", ".join(labels[i] for i in sorted(labels)) or "none"}); expected '
        f'{num_annotators} (data.num_annotators): label0_* .. label{num_annotators - 1}_*; '
        + '; '.join(parts))
  return CaseFiles(case_id=os.path.basename(folder), folder=folder, images=tuple(images),
                   labels=tuple(labels[i] for i in range(num_annotators)),
                   ignored=tuple(ignored))


def scan_split_folder(split_dir: str, num_annotators: int) -> list[CaseFiles]:
  """Every case folder of `split_dir`, in natural order."""
  if not os.path.isdir(split_dir):
    raise SourceNotFoundError(
        f'split folder {split_dir} does not exist; expected ROOT/training/<case>/ and '
        'ROOT/testing/<case>/ (CIMD layout)')
  names = sorted((n for n in os.listdir(split_dir)
                  if not n.startswith('.') and os.path.isdir(os.path.join(split_dir, n))),
                 key=natural_key)
  if not names:
    raise DataError(f'split folder {split_dir} holds no case folders; expected '
                    f'{split_dir}/<case>/image_<anything>.jpg + label0_<anything>.jpg ...')
  cases = [scan_case(os.path.join(split_dir, n), num_annotators) for n in names]
  ignored = [f'{c.case_id}/{name}' for c in cases for name in c.ignored]
  if ignored:
    shown = ', '.join(ignored[:8]) + (f' and {len(ignored) - 8} more' if len(ignored) > 8
                                      else '')
    logging.info('%s: ignored %d file(s) that are neither image_* nor label<i>_* images: '
                 '%s', split_dir, len(ignored), shown)
  return cases


def validation_cases(case_ids: list[str], fraction: float, seed: int) -> list[int]:
  """Sorted indices of the training cases held out for 'validation' (case level): the
  first max(1, round(fraction * n)) in `splits.seeded_order(case_ids, seed,
  'validation')`."""
  if fraction <= 0:
    return []
  count = max(1, int(round(fraction * len(case_ids))))
  if count >= len(case_ids):
    raise DataError(f'data.validation_fraction={fraction} of {len(case_ids)} training '
                    f'case(s) leaves no training case')
  return sorted(splits_lib.seeded_order(case_ids, seed, 'validation')[:count])


def check_image_file_counts(splits: dict[str, list[CaseFiles]], channels: int) -> None:
  """With channels > 1, either every case has one image file (replicated or already
  C-channel) or every case has `channels` of them: a case with one file among cases
  with several is a missing channel (it would be replicated silently), a DataError."""
  cases = [c for split in sorted(splits) for c in splits[split]]
  several = [c for c in cases if len(c.images) > 1]
  single = [c for c in cases if len(c.images) == 1]
  if channels > 1 and several and single:
    raise DataError(
        f'{_where(single[0].folder)}: has one image file ({single[0].images[0]}) while '
        f'{len(several)} case(s) such as {several[0].folder} have '
        f'{len(several[0].images)}; expected data.image_channels={channels} image files '
        f'in every case ({len(single)} case(s) have one)')


def check_split_copies(splits: dict[str, list[CaseFiles]]) -> None:
  """DataError naming a case whose folder in testing/ holds the same image files, byte
  for byte, as the training/ case of the same name (validation cases included)."""
  tested = {c.case_id: c for c in splits[TEST]}
  for case in splits[TRAIN] + splits.get(VALIDATION, []):
    other = tested.get(case.case_id)
    if other is None or other.images != case.images:
      continue
    if all(filecmp.cmp(os.path.join(case.folder, n), os.path.join(other.folder, n),
                       shallow=False) for n in case.images):
      raise DataError(f'{_where(other.folder)}: holds the same image file(s) as '
                      f'{_where(case.folder)}; expected each case in one split (a copy '
                      'would be scored on an image the model trained on)')


def scan_source(args: DataArgs) -> dict[str, list[CaseFiles]]:
  """split -> cases of `args.source_dir`, with the validation split carved out."""
  root = os.path.abspath(os.path.expanduser(args.source_dir))
  if not os.path.isdir(root):
    raise SourceNotFoundError(f'data.source_dir {args.source_dir!r} ({root}) does not '
                              'exist or is not a folder')
  splits = {split: scan_split_folder(os.path.join(root, sub), args.num_annotators)
            for split, sub in SPLIT_FOLDERS.items()}
  check_image_file_counts(splits, args.image_channels)
  held_out = set(validation_cases([c.case_id for c in splits[TRAIN]],
                                  args.validation_fraction, args.seed))
  if held_out:
    train = splits[TRAIN]
    splits[VALIDATION] = [c for i, c in enumerate(train) if i in held_out]
    splits[TRAIN] = [c for i, c in enumerate(train) if i not in held_out]
  return splits


def _load(folder: str, name: str) -> Image.Image:
  """The file's one 2-D image; a multi-page file (TIFF stack, animation) is refused,
  since PIL would read only its first page."""
  path = os.path.join(folder, name)
  try:
    with Image.open(path) as img:
      pages = getattr(img, 'n_frames', 1)
      img.load()
      copy = img.copy()
  except Exception as e:  # PIL raises several types for broken or truncated files
    raise DataError(f'{_where(folder, name)}: cannot read image '
                    f'({type(e).__name__}: {e}); expected a readable JPEG, PNG or TIFF'
                    ) from e
  if pages != 1:
    raise DataError(f'{_where(folder, name)}: holds {pages} pages (a multi-page TIFF?); '
                    'expected one 2-D image per file (several channels: one image_* file '
                    'per channel)')
  return copy


def _check_size(img: Image.Image, folder: str, name: str, args: DataArgs) -> None:
  if img.size != (args.image_size, args.image_size) and not args.resize:
    raise DataError(
        f'{_where(folder, name)}: is {img.size[0]}x{img.size[1]} pixels, expected '
        f'{args.image_size}x{args.image_size} (data.image_size; set data.resize=True '
        'to resize)')


def _resized(img: Image.Image, size: int) -> Image.Image:
  if img.size == (size, size):
    return img
  return img.resize((size, size), Image.BILINEAR)


# Modes of images wider than 8 bits: 16-bit grey (PNG, TIFF), 32-bit int, float.
WIDE_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F')


def to_8bit(img: Image.Image, where: str, percentile_low: float,
            percentile_high: float) -> Image.Image:
  """The image in an 8-bit mode of _IMAGE_MODES (L, LA, RGB, RGBA).

  8-bit images are returned unchanged (palette, 1-bit, CMYK and YCbCr converted by
  PIL). Single-channel images wider than 8 bits (16-bit PNG/TIFF, 32-bit int,
  float TIFF) are mapped to mode L by the per-image percentile rule of
  `intensity.to_uint8`. `where` starts the one-line DataError of anything else.
  """
  if img.mode == 'P':
    img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
  elif img.mode == '1':
    img = img.convert('L')
  elif img.mode in ('CMYK', 'YCbCr'):
    img = img.convert('RGB')
  elif img.mode in WIDE_MODES:
    try:
      u8 = intensity.to_uint8(np.asarray(img), percentile_low, percentile_high)
    except intensity.NonFiniteError as e:
      raise DataError(f'{where}: {e}; expected finite pixel values') from None
    return Image.fromarray(u8, 'L')
  if img.mode not in _IMAGE_MODES:
    raise DataError(f'{where}: image mode {img.mode!r} is not supported; expected an '
                    '8-bit grayscale or RGB(A) image, or a single-channel 16-bit or '
                    'float image')
  return img


def match_channels(arr: np.ndarray, channels: int, where: str, mode: str) -> np.ndarray:
  """uint8 [H, W, channels] from uint8 [H, W, K] by the folder layout's rule.

  K == channels: unchanged; K == 1: replicated; channels == 1 and an RGB(A) image
  with equal colour channels (and opaque alpha): its first channel. Anything else
  (e.g. a colour image for channels=1) raises DataError starting with `where`.
  """
  have = arr.shape[-1]
  if have == channels:
    return arr
  if have == 1:
    return np.repeat(arr, channels, -1)
  if channels == 1 and have in (3, 4):
    gray = arr[..., :3]
    opaque = have == 3 or bool(np.all(arr[..., 3] == 255))
    if opaque and np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(
        gray[..., 0], gray[..., 2]):
      return gray[..., :1]
  raise DataError(f'{where}: image has {have} channels ({mode}), expected {channels} '
                  '(data.image_channels) or a single-channel image')


def read_image(case: CaseFiles, args: DataArgs) -> tuple[np.ndarray, tuple[int, int]]:
  """The case image as uint8 [H, W, C] (C = args.image_channels) and its original
  (width, height).

  One file: its channels must equal C, or be 1 (replicated to C), or be RGB(A) with
  equal colour channels (and opaque alpha) when C = 1. Several image files: each
  single-channel, exactly C of them, stacked in order of <k>. Images wider than 8
  bits are mapped to 8 bits per file by the percentile rule (`to_8bit`).
  """
  c = args.image_channels
  folder = case.folder
  if len(case.images) > 1 and len(case.images) != c:
    raise DataError(
        f'{_where(folder)}: has {len(case.images)} image files '
        f'({", ".join(case.images)}); expected one image file, or exactly '
        f'data.image_channels={c} single-channel files')
  arrays, size = [], None
  for name in case.images:
    img = _load(folder, name)
    if size is not None and img.size != size:
      raise DataError(f'{_where(folder, name)}: is {img.size[0]}x{img.size[1]}, but '
                      f'{case.images[0]} is {size[0]}x{size[1]}; expected equal sizes')
    size = img.size
    _check_size(img, folder, name, args)
    img8 = to_8bit(img, _where(folder, name), args.percentile_low, args.percentile_high)
    arr = np.asarray(_resized(img8, args.image_size), np.uint8)
    arr = arr[..., None] if arr.ndim == 2 else arr
    if len(case.images) > 1 and arr.shape[-1] != 1:
      raise DataError(f'{_where(folder, name)}: has {arr.shape[-1]} channels; with '
                      'several image files each must be single-channel')
    arrays.append(arr)
  arr = np.concatenate(arrays, -1)
  return match_channels(arr, c, _where(folder, case.images[0]), img8.mode), size


def read_mask(case: CaseFiles, name: str, image_wh: tuple[int, int],
              args: DataArgs) -> np.ndarray:
  """One expert mask as uint8 [H, W] in {0, 1}: pixel > args.mask_threshold."""
  folder = case.folder
  img = _load(folder, name)
  if img.mode not in _MASK_MODES:
    bands = len(img.getbands())
    raise DataError(
        f'{_where(folder, name)}: mask has mode {img.mode!r} ({bands} channel(s)); '
        'expected a single-channel 8-bit image (mode L or 1)')
  if img.size != image_wh:
    raise DataError(
        f'{_where(folder, name)}: mask is {img.size[0]}x{img.size[1]}, but the image '
        f'{case.images[0]} is {image_wh[0]}x{image_wh[1]}; expected equal sizes')
  _check_size(img, folder, name, args)
  img = img.convert('L')
  peak = int(np.asarray(img, np.uint8).max())
  if 0 < peak <= args.mask_threshold:
    raise DataError(
        f'{_where(folder, name)}: mask values are 0..{peak}, none above '
        f'data.mask_threshold={args.mask_threshold}, so it would read as empty; expected '
        '0/255 masks (set data.mask_threshold=0 for 0/1 masks)')
  img = _resized(img, args.image_size)
  return (np.asarray(img, np.uint8) > args.mask_threshold).astype(np.uint8)


def read_case(case: CaseFiles, args: DataArgs) -> dict[str, Any]:
  """The record of one case: image uint8 [H, W, C], masks uint8 [A, H, W], case_id."""
  image, wh = read_image(case, args)
  masks = np.stack([read_mask(case, name, wh, args) for name in case.labels])
  return {'image': image, 'masks': masks, 'case_id': case.case_id}


def _fingerprint(splits: dict[str, list[CaseFiles]]) -> str:
  """Hash of every file name, size and modification time: a changed source (a file
  added, removed or rewritten, even at the same size) gets a new cache."""
  listing = []
  for split in sorted(splits):
    for case in splits[split]:
      for name in case.images + case.labels:
        st = os.stat(os.path.join(case.folder, name))
        listing.append((split, case.case_id, name, st.st_size, st.st_mtime_ns))
  return records.short_hash({'files': listing}, 16)


def builder_params(args: DataArgs, splits: dict[str, list[CaseFiles]]) -> dict[str, Any]:
  """Every parameter that changes the records (hashed into the config name)."""
  return {
      'kind': 'cimd_folder',
      'source_dir': os.path.realpath(os.path.expanduser(args.source_dir)),
      'files': _fingerprint(splits),
      'image_size': args.image_size,
      'image_channels': args.image_channels,
      'num_annotators': args.num_annotators,
      'mask_threshold': args.mask_threshold,
      'resize': args.resize,
      'validation_fraction': args.validation_fraction,
      # The seed only changes the records through the validation split.
      'seed': args.seed if args.validation_fraction > 0 else None,
      **({'split_rule': splits_lib.SPLIT_RULE} if args.validation_fraction > 0 else {}),
      # Only change images wider than 8 bits (8-bit images are kept byte for byte).
      'percentiles': (args.percentile_low, args.percentile_high),
      'format': records.VERSION,
  }


class CimdFolder(records.CimdBuilder, skip_registration=True):
  """CIMD folder layout -> ArrayRecord. Build with `make_builder`."""

  def _info(self) -> tfds.core.DatasetInfo:
    p = self.builder_config.params
    return records.dataset_info(
        self,
        f'CIMD folder layout from {p["source_dir"]}',
        records.features(p['image_size'], p['image_channels'],
                                  p['num_annotators'], with_structures=False))

  def _split_generators(self, dl_manager):
    del dl_manager
    args, splits = self.builder_config.payload
    records.write_params(self.data_dir, self.builder_config.params)
    return {split: self._generate_examples(args, cases) for split, cases in splits.items()}

  def _generate_examples(self, args: DataArgs, cases: list[CaseFiles]
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    for index, case in enumerate(cases):
      yield index, read_case(case, args)


def make_builder(args: DataArgs, tfds_dir: str) -> CimdFolder:
  """The builder of `args` (scans the file names; reads no pixels)."""
  splits = scan_source(args)
  params = builder_params(args, splits)
  prefix = f's{args.image_size}_c{args.image_channels}_a{args.num_annotators}'
  config = records.CimdConfig(name=records.config_name(prefix, params), params=params,
                              payload=(args, splits))
  return CimdFolder(config=config, data_dir=tfds_dir)


def validate(builder: CimdFolder) -> None:
  """Reads every case of every split; raises DataError on the first bad one, then on a
  case copied into both splits."""
  args, splits = builder.builder_config.payload
  for cases in splits.values():
    for case in cases:
      read_case(case, args)
  check_split_copies(splits)
