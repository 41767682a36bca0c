"""Unlabelled input images for `--mode=sample --config.sampling.input_dir=DIR`.

Accepted layouts: image files directly in DIR (.png, .jpg, .jpeg, .bmp, .tif, .tiff),
and/or case folders DIR/<case>/ holding `image_*` files as in the CIMD layout (several
stack as channels). Label files (`label<i>_*`, the experts' masks) are never inputs;
when DIR holds them it is itself a case folder, and its `image_*` files are one input
named after DIR (channels stacked, as training read it); so are they, without label
files, for a model trained on cases of several image files (`case_files`), where a
lone single-channel file cannot be an input. Every input is read
by the training reader (`folder.read_image` with the run's DataArgs): the same channel
rules, the same percentile rule for images wider than 8 bits (`check_8bit` refuses
them for models trained on fixed-scale records), the same size checks.

Case ids: a file's name without its extension, or the folder's name; when two inputs
would get the same id (`x.png` and `x.jpg`, or `x.png` and a folder `x`), the files
keep their full names (`x.png`, `x.jpg`), so every input has its own id.
"""

import collections
import dataclasses
import os
import re

from absl import logging
import numpy as np
from PIL import Image

from cimd_jax.data import folder
from cimd_jax.data.args import DataArgs

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
_LABEL_TYPE = re.compile(r'label\d*')   # folder.file_type of an expert mask file


class BadInputImage(ValueError):
  """An input image that cannot be read or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class InputImage:
  case_id: str
  path: str           # the image file, or the case folder
  image: np.ndarray   # float32 [H, W, C] in [-1, 1]


@dataclasses.dataclass(frozen=True)
class InputCase:
  """One input: `folder` holds the image file(s) `images` (natural order)."""
  case_id: str
  folder: str
  images: tuple[str, ...]

  @property
  def path(self) -> str:
    return (os.path.join(self.folder, self.images[0]) if len(self.images) == 1
            else self.folder)


def list_input_images(input_dir: str, case_files: int = 1) -> list[InputCase]:
  """Every input of `input_dir` with a distinct case id, sorted by case id;
  `case_files` > 1: the model's training cases had that many image files (one per
  channel), and a DIR without case folders holding that many image_* files is one."""
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f'sampling.input_dir {input_dir!r} does not exist or is not '
                            'a folder')
  files, folders, labels = [], [], []
  for name in sorted(os.listdir(input_dir), key=folder.natural_key):
    path = os.path.join(input_dir, name)
    if name.startswith('.'):
      continue
    if os.path.isfile(path) and name.lower().endswith(IMAGE_EXTENSIONS):
      if _LABEL_TYPE.fullmatch(folder.file_type(name)):
        labels.append(name)   # DIR is a case folder: its expert masks are no inputs
      else:
        files.append(name)
    elif os.path.isdir(path):
      images = [f for f in sorted(os.listdir(path), key=folder.natural_key)
                if folder.file_type(f) == 'image' and f.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(path, f))]
      if images:
        folders.append(InputCase(name, path, tuple(images)))
      else:
        logging.warning('sampling.input_dir: %s skipped: a folder without image_* files',
                        path)
  own = [n for n in files if folder.file_type(n) == 'image']
  as_case = labels or (case_files > 1 and not folders and len(own) == len(files) == case_files)
  if as_case and not labels:
    logging.info('sampling.input_dir %s: its %d image_* files (%s) are one input, stacked as '
                 'the channels of the training cases', input_dir, len(own), ', '.join(own))
  if as_case and own:   # DIR is a case folder: its image_* files are one case's channels
    files = [n for n in files if n not in own]
    folders.append(InputCase(os.path.basename(os.path.normpath(input_dir)), input_dir,
                             tuple(own)))
  stems = collections.Counter([os.path.splitext(n)[0] for n in files] +
                              [c.case_id for c in folders])
  cases = [InputCase(os.path.splitext(n)[0] if stems[os.path.splitext(n)[0]] == 1 else n,
                     input_dir, (n,)) for n in files] + folders
  if labels:
    logging.info('sampling.input_dir %s: %d label file(s) skipped (%s)', input_dir,
                 len(labels), ', '.join(labels[:3]) + (' ...' if len(labels) > 3 else ''))
  if not cases:
    raise FileNotFoundError(
        f'sampling.input_dir {input_dir!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}) '
        'and no case folders with image_* files')
  ids = [c.case_id for c in cases]
  assert len(set(ids)) == len(ids), ids
  return sorted(cases, key=lambda c: folder.natural_key(c.case_id))


def check_8bit(case: InputCase, trained_on: str) -> None:
  """BadInputImage naming a file of `case` wider than 8 bits: a model trained on
  `trained_on` (a fixed scaling of its float images) would get it by the percentile
  rule instead, at another contrast. Unreadable files are left to read_input_image."""
  for name in case.images:
    path = os.path.join(case.folder, name)
    try:
      with Image.open(path) as img:
        mode = img.mode
    except OSError:
      continue
    if mode in folder.WIDE_MODES:
      raise BadInputImage(
          f'{path}: a {mode!r} image (wider than 8 bits); the model was trained on '
          f'{trained_on}, which the percentile rule for wide inputs does not reproduce; '
          'expected an 8-bit image scaled by that rule (docs/data.md)')


def check_channel_files(case: InputCase, channels: int, case_files: int | None) -> None:
  """BadInputImage unless `case` has its channels as the model's training cases had
  them: `case_files` image files each (1: one file, replicated or C-channel; C: one
  single-channel file per channel, or one C-channel file). None: not recorded."""
  if case_files is None or channels == 1:
    return
  if case_files == 1 and len(case.images) > 1:
    raise BadInputImage(
        f'{case.folder}: {len(case.images)} image files ({", ".join(case.images)}); the '
        f'model was trained on one image file per case; expected one image file')
  if case_files > 1 and len(case.images) == 1:
    path = os.path.join(case.folder, case.images[0])
    if is_single_channel(path):
      raise BadInputImage(
          f'{path}: one single-channel image; the model was trained on cases of '
          f'{case_files} image_* files (one per channel); expected a case folder holding '
          f'{case_files} image_* files, or one {channels}-channel image')


def is_single_channel(path: str) -> bool:
  """Whether the training reader would replicate this image file's one channel (grey,
  1-bit or wider than 8 bits; palette, CMYK and YCbCr files are read as colour);
  False for an unreadable file (left to read_input_image)."""
  try:
    with Image.open(path) as img:
      return img.mode in ('L', '1') or img.mode in folder.WIDE_MODES
  except OSError:
    return False


def read_input_image(case: InputCase, args: DataArgs) -> InputImage:
  """Reads one input as float32 [H, W, C] in [-1, 1] by the training reader's rules;
  BadInputImage names the file and what was expected."""
  files = folder.CaseFiles(case_id=case.case_id, folder=case.folder, images=case.images,
                           labels=())
  try:
    image, _ = folder.read_image(files, args)
  except folder.DataError as e:
    raise BadInputImage(str(e)) from None
  return InputImage(case.case_id, case.path, image.astype(np.float32) / 127.5 - 1.0)
