"""Intensity rule for images wider than 8 bits (NIfTI volumes, 16-bit / float files).

`to_uint8(x, p_low, p_high)`: per image (or per volume), clip to the [p_low, p_high]
percentiles of its own values (numpy's default linear interpolation) and map that
range linearly to 0..255, rounding half to even (np.rint):

  lo, hi = percentile(x, [p_low, p_high])
  u8 = rint((clip(x, lo, hi) - lo) / (hi - lo) * 255)

If hi == lo (e.g. a sparse image whose percentiles coincide) the image's min and
max are used instead; a constant image becomes all 0. Non-finite values are an
error. 8-bit images never go through this rule (they are kept byte for byte).

Also the resize helpers of the readers that accept `data.resize` ('lidc_pickle',
'lidc_hdf5'): PIL bilinear, masks resized as grey levels and thresholded (the
folder reader's rule).
"""

import numpy as np
from PIL import Image


class NonFiniteError(ValueError):
  """The array holds NaN or inf; callers turn it into a DataError naming the file."""


def bounds(x: np.ndarray, p_low: float, p_high: float) -> tuple[float, float]:
  """(lo, hi) of `x` (any shape) that `to_uint8` maps to 0 and 255."""
  x = np.asarray(x)
  if x.size == 0:
    return 0.0, 0.0
  if x.dtype.kind == 'f' and not np.all(np.isfinite(x)):
    raise NonFiniteError(f'{int(np.sum(~np.isfinite(x)))} value(s) are NaN or inf')
  lo, hi = (float(v) for v in np.percentile(x, [p_low, p_high]))
  if hi <= lo:
    lo, hi = float(np.min(x)), float(np.max(x))
  return lo, hi


def scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """uint8, same shape as `x`: [lo, hi] clipped and mapped linearly to 0..255."""
  x = np.asarray(x, np.float64)
  if hi <= lo:
    return np.zeros(x.shape, np.uint8)
  return np.rint((np.clip(x, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)


def to_uint8(x: np.ndarray, p_low: float, p_high: float) -> np.ndarray:
  """uint8, same shape as `x` (any real dtype): the percentile rule above."""
  lo, hi = bounds(x, p_low, p_high)
  return scale(x, lo, hi)


def resize_u8(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [size, size] from uint8 [H, W]: PIL bilinear, as the folder reader."""
  if image.shape == (size, size):
    return image
  return np.asarray(Image.fromarray(image, 'L').resize((size, size), Image.BILINEAR),
                    np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """uint8 [size, size] in {0, 1} from a {0, 1} mask [H, W]: resized as grey levels
  0/255 (bilinear) and thresholded at > 127, as the folder reader's masks."""
  if mask.shape == (size, size):
    return mask.astype(np.uint8)
  grey = resize_u8(mask.astype(np.uint8) * 255, size)
  return (grey > 127).astype(np.uint8)
