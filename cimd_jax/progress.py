"""A console progress bar with rate and ETA for long loops (sampling, evaluation)."""

import sys
import time
from typing import TextIO


def _fmt_seconds(seconds: float) -> str:
  seconds = max(int(round(seconds)), 0)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h:d}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


class ProgressBar:
  """`[#####.....] 12/40 images  0.8 images/s  elapsed 00:15  ETA 00:35` on one line.

  Draws on `stream` (stderr by default) at most every `min_interval` seconds; the
  final update always draws and ends the line. `enabled=False` draws nothing (for
  processes other than 0).
  """

  def __init__(self, total: int, unit: str = 'images', desc: str = '',
               stream: TextIO | None = None, width: int = 30,
               min_interval: float = 0.5, enabled: bool = True):
    self.total, self.unit, self.desc = max(int(total), 0), unit, desc
    self.stream = stream or sys.stderr
    self.width, self.min_interval, self.enabled = width, min_interval, enabled
    self.count = 0
    self.start = time.perf_counter()
    self._last_draw = -1e9
    self._closed = False
    if enabled:
      self._draw()

  def line(self) -> str:
    """The current progress line (no carriage return)."""
    elapsed = time.perf_counter() - self.start
    frac = self.count / self.total if self.total else 1.0
    filled = int(round(frac * self.width))
    rate = self.count / elapsed if elapsed > 0 else 0.0
    eta = (self.total - self.count) / rate if rate > 0 else float('nan')
    eta_s = _fmt_seconds(eta) if eta == eta else '--:--'
    prefix = f'{self.desc} ' if self.desc else ''
    return (f'{prefix}[{"#" * filled}{"." * (self.width - filled)}] '
            f'{self.count}/{self.total} {self.unit}  {rate:.2f} {self.unit}/s  '
            f'elapsed {_fmt_seconds(elapsed)}  ETA {eta_s}')

  def _draw(self) -> None:
    self.stream.write('\r' + self.line())
    self.stream.flush()
    self._last_draw = time.perf_counter()

  def update(self, n: int = 1) -> None:
    """Adds `n` finished items and redraws if due."""
    self.count += n
    if not self.enabled:
      return
    if self.count >= self.total:
      self.close()
    elif time.perf_counter() - self._last_draw >= self.min_interval:
      self._draw()

  def close(self) -> None:
    """Draws the final state and ends the line (once)."""
    if self._closed:
      return
    self._closed = True
    if self.enabled:
      self._draw()
      self.stream.write('\n')
      self.stream.flush()
