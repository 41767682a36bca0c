"""Figures a person can read: the per-case overview and the training image grid.

All inputs are numpy arrays; outputs are uint8 RGB arrays [H, W, 3] (PIL draws the
labels). Nothing here touches JAX.
"""

import numpy as np
from PIL import Image, ImageDraw

_LABEL_H = 14
_PAD = 4


def to_uint8_image(image: np.ndarray) -> np.ndarray:
  """An image in [-1, 1], [H, W, C], as uint8 [H, W] (first channel) for display."""
  img = np.asarray(image, np.float32)
  if img.ndim == 3:
    img = img[..., 0]
  return np.clip(np.round((img + 1.0) * 127.5), 0, 255).astype(np.uint8)


def mask_to_uint8(mask: np.ndarray) -> np.ndarray:
  """A boolean (or {0,1}) mask [H, W] as uint8 0/255."""
  return (np.asarray(mask) > 0).astype(np.uint8) * 255


def heat(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1], [H, W], as an RGB heat map uint8 [H, W, 3] (black-red-yellow-white)."""
  v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
  r = np.clip(3 * v, 0, 1)
  g = np.clip(3 * v - 1, 0, 1)
  b = np.clip(3 * v - 2, 0, 1)
  return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def _rgb(tile: np.ndarray) -> np.ndarray:
  return np.repeat(tile[..., None], 3, -1) if tile.ndim == 2 else tile


def _upscale(tile: np.ndarray, scale: int) -> np.ndarray:
  return np.repeat(np.repeat(tile, scale, 0), scale, 1) if scale > 1 else tile


def labelled_rows(rows: list[tuple[str, list[np.ndarray]]], per_row: int = 8,
                  min_tile: int = 96) -> np.ndarray:
  """Lays out labelled rows of equally sized tiles ([H, W] or [H, W, 3] uint8).

  Each (label, tiles) row wraps after `per_row` tiles; small tiles are enlarged by an
  integer factor so each is at least `min_tile` pixels wide. Returns uint8 [H', W', 3].
  """
  first = next(t for _, tiles in rows for t in tiles)
  scale = max(1, int(np.ceil(min_tile / first.shape[1])))
  th, tw = first.shape[0] * scale, first.shape[1] * scale
  lines = []
  for label, tiles in rows:
    for start in range(0, max(len(tiles), 1), per_row):
      lines.append((label if start == 0 else '', tiles[start:start + per_row]))
  width = _PAD + per_row * (tw + _PAD)
  height = _PAD + len(lines) * (_LABEL_H + th + _PAD)
  canvas = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  y = _PAD
  for label, tiles in lines:
    if label:
      draw.text((_PAD, y), label, fill=(0, 0, 0))
    for i, tile in enumerate(tiles):
      x = _PAD + i * (tw + _PAD)
      canvas.paste(Image.fromarray(_upscale(_rgb(tile), scale)), (x, y + _LABEL_H))
    y += _LABEL_H + th + _PAD
  return np.asarray(canvas)


def overview(image: np.ndarray, samples: np.ndarray, experts: np.ndarray | None = None,
             title: str = '') -> np.ndarray:
  """image | experts (when known) | samples | foreground frequency, as RGB uint8.

  Args:
    image: [H, W, C] in [-1, 1].
    samples: bool [N, H, W].
    experts: bool [A, H, W] or None.
  """
  samples = np.asarray(samples, bool)
  freq = samples.mean(0)
  rows = [(f'image {title}'.strip(), [to_uint8_image(image)])]
  if experts is not None:
    experts = np.asarray(experts, bool)
    rows.append((f'experts (A={len(experts)}), frequency',
                 [mask_to_uint8(e) for e in experts] + [heat(experts.mean(0))]))
  rows.append((f'samples (N={len(samples)})', [mask_to_uint8(s) for s in samples]))
  rows.append(('sampled frequency | std', [heat(freq), heat(2 * samples.std(0))]))
  return labelled_rows(rows)
