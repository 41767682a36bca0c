"""Unlabelled input images for `--mode=sample --config.sampling.input_dir=DIR`.

Accepted layouts: image files directly in DIR (case id = file name without
extension), and/or case folders DIR/<case>/image_*.(png|jpg) as in the CIMD layout
(case id = folder name; label files, if any, are ignored).
"""

import dataclasses
import os

import numpy as np
from PIL import Image

from cimd_jax.data import folder

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


class BadInputImage(ValueError):
  """An input image that cannot be read or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class InputImage:
  case_id: str
  path: str
  image: np.ndarray   # float32 [H, W, C] in [-1, 1]


def list_input_images(input_dir: str) -> list[tuple[str, str]]:
  """(case_id, path) of every input image in `input_dir`, sorted by case id."""
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f'sampling.input_dir {input_dir!r} does not exist or is not a folder')
  found = []
  for name in sorted(os.listdir(input_dir)):
    path = os.path.join(input_dir, name)
    if os.path.isfile(path) and name.lower().endswith(IMAGE_EXTENSIONS):
      found.append((os.path.splitext(name)[0], path))
    elif os.path.isdir(path):
      images = sorted(f for f in os.listdir(path)
                      if f.startswith('image') and f.lower().endswith(IMAGE_EXTENSIONS))
      if images:
        found.append((name, os.path.join(path, images[0])))
  if not found:
    raise FileNotFoundError(
        f'sampling.input_dir {input_dir!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}) '
        'and no case folders with image_* files')
  return found


def read_input_image(case_id: str, path: str, image_size: int, image_channels: int,
                     resize: bool, percentile_low: float = 0.5,
                     percentile_high: float = 99.5) -> InputImage:
  """Reads one image as float32 [H, W, C] in [-1, 1]; BadInputImage names the file.

  The conversion is the folder reader's (`folder.to_8bit`, `folder.match_channels`):
  images wider than 8 bits (16-bit, float) are mapped to 0..255 by the per-image
  percentile rule with `percentile_low` / `percentile_high` (data.percentile_low /
  data.percentile_high), a single-channel image is replicated to `image_channels`,
  and a colour image with unequal channels for image_channels=1 is refused, as in
  training; 8-bit images keep their values.
  """
  try:
    with Image.open(path) as img:
      img.load()
      img = img.copy()
  except Exception as e:  # PIL raises several types for broken files
    raise BadInputImage(f'{path}: cannot read image ({type(e).__name__}: {e})') from e
  try:
    if img.size != (image_size, image_size) and not resize:
      raise BadInputImage(
          f'{path}: image is {img.size[0]}x{img.size[1]}, expected '
          f'{image_size}x{image_size} (set data.resize=True to resize)')
    img8 = folder.to_8bit(img, path, percentile_low, percentile_high)
    if img8.size != (image_size, image_size):
      img8 = img8.resize((image_size, image_size), Image.BILINEAR)
    arr = np.asarray(img8, np.uint8)
    arr = arr[..., None] if arr.ndim == 2 else arr
    arr = folder.match_channels(arr, image_channels, path, img8.mode)
  except folder.DataError as e:
    raise BadInputImage(str(e)) from None
  return InputImage(case_id, path, arr.astype(np.float32) / 127.5 - 1.0)
