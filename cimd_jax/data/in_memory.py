"""Decoded records of a small split held in memory, so that training epochs after the
first do not decode the ArrayRecord files again.

The training pipeline reads every record once per epoch; decoding the demo's records
from their TFDS files costs ≈ 0.11 ms each, 10.7 ms of CPU per batch of 32 against
3.8 ms from memory, beside a 0.24 s train step on the same two cores
(docs/benchmarks.md, "The demo in 8 minutes"). A split whose decoded records fit in
`max_bytes` is decoded once and served from a list; a larger split is read from the
files as before. The records and their order are exactly the source's.
"""

from typing import Any, Protocol

import numpy as np

# Decoded splits up to this size are held in memory (the demo's 2,000 training records:
# 16 MiB; LIDC-sized splits exceed it and stay on disk).
DEFAULT_MAX_BYTES = 256 * 2**20


class RandomAccessSource(Protocol):
  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> dict[str, Any]: ...


class InMemorySource:
  """Every record of `source`, decoded once: `len(s)` and `s[i]` as `source`'s."""

  def __init__(self, source: RandomAccessSource):
    self._records = [source[i] for i in range(len(source))]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._records[index]

  def __repr__(self) -> str:
    return f'InMemorySource({len(self._records)} records)'


def record_bytes(record: dict[str, Any]) -> int:
  """Bytes one decoded record holds (its arrays and strings)."""
  return sum(np.asarray(v).nbytes for v in record.values())


def maybe_in_memory(source: RandomAccessSource, max_bytes: int = DEFAULT_MAX_BYTES
                    ) -> RandomAccessSource:
  """`source` held in memory when len × (bytes of its first record) <= max_bytes,
  else `source` itself (also when it is empty or max_bytes <= 0)."""
  n = len(source)
  if n == 0 or max_bytes <= 0 or n * record_bytes(source[0]) > max_bytes:
    return source
  return InMemorySource(source)
