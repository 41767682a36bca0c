"""grain pipelines over the prepared ArrayRecord files (over 250 lines because the
train and eval pipelines share their record decoding and process slicing).

Train (`train_iterator`): the split shuffled with `seed` (a new order every epoch),
repeated forever, one expert mask drawn at random per example and epoch (seeded by
the example's position in the stream: reproducible), batched with the remainder
dropped. All processes share this one global stream of global batches; each process
reads and yields only its contiguous rows of every global batch, so training is the
same whatever the number of processes. Batches:

  image  float32 [B, H, W, C] in [-1, 1]
  mask   float32 [B, H, W, 1] in {-1, +1}
  expert int32 [B]            which expert was drawn (for inspection)
  case_id  str [B]

with B = global_batch_size / process_count. The iterator is grain's own
`DatasetIterator`: `get_state()` is a JSON-serialisable dict and `set_state()`
continues the exact data order (same examples, same expert draws).

Eval (`eval_batches`): this process's slice of the split in record order (no
shuffle), all experts in order, the last batch smaller (not padded) unless
`pad=True`. Batches:

  image    float32 [B, H, W, C] in [-1, 1]
  masks    float32 [B, A, H, W] in {-1, +1}
  case_id  str [B]
  (synthetic) structures uint8 [B, S, H, W], structure_probs float32 [B, S]
  (pad=True) valid bool [B]
"""

import math
import os
from typing import Any, Iterator

import grain
import jax
import numpy as np

from cimd_jax.data import folder
from cimd_jax.data import in_memory
from cimd_jax.data import lidc_hdf5
from cimd_jax.data import lidc_pickle
from cimd_jax.data import nifti
from cimd_jax.data import records
from cimd_jax.data import synthetic
from cimd_jax.data.args import DataArgs, TRAIN
from cimd_jax.utils.errors import ConfigError

_READ_THREADS = max(1, min(4, os.cpu_count() or 1))
_PREFETCH_BATCHES = 4


# data.name -> the reader module: make_builder(args, tfds_dir) and, for sources
# read from disk, validate(builder) (reads and checks everything; DataError).
_READERS = {
    'synthetic': synthetic,
    'folder': folder,
    'lidc_pickle': lidc_pickle,
    'lidc_hdf5': lidc_hdf5,
    'nifti': nifti,
}


def _builder(args: DataArgs, workdir: str):
  """The TFDS builder of `args` with its records under the cache directory."""
  return _READERS[args.name].make_builder(args, args.cache_dir(workdir))


def records_name(args: DataArgs, workdir: str) -> str:
  """The prepared records' name: '<shape>_<hash of every parameter that changes the
  records>' (for data on disk: file names, sizes and times, the split file's content,
  the split settings). Lists and stats the files; reads no record."""
  return _builder(args, workdir).builder_config.name


def prepare(args: DataArgs, workdir: str) -> dict[str, int]:
  """Writes the dataset's ArrayRecord files once (later calls reuse them).

  The cache is `args.tfds_dir` (or WORKDIR/tfds), under
  `cimd_<reader>/<config name>/1.0.0/`, where the config name encodes a hash of
  every parameter that changes the records. Datasets read from disk (every
  `data.name` but 'synthetic') are fully validated (every file read) before
  anything is written.

  Returns:
    split name -> number of examples.
  """
  builder = _builder(args, workdir)
  if not records.is_complete(builder) and hasattr(_READERS[args.name], 'validate'):
    _READERS[args.name].validate(builder)
  return records.prepare_builder(builder)


def _source(args: DataArgs, workdir: str, split: str):
  """Random-access source of `split` (prepares the dataset if needed)."""
  builder = _builder(args, workdir)
  if not records.is_complete(builder):
    prepare(args, workdir)
    builder = _builder(args, workdir)
  splits = tuple(builder.info.splits.keys())
  if split not in splits:
    raise ConfigError(f'split {split!r} does not exist; this dataset has {splits}'
                      + (_validation_hint(args) if split == 'validation' else ''))
  return builder.as_data_source(split)


def _validation_hint(args: DataArgs) -> str:
  if args.name == 'lidc_hdf5':
    return " (the HDF5 file has no 'val' group)"
  if args.split_file:
    return f" (data.split_file {args.split_file} lists no 'validation' case)"
  return ' (set data.validation_fraction > 0 for a validation split)'


def num_examples(args: DataArgs, workdir: str, split: str) -> int:
  """Examples in `split` (all processes together)."""
  return len(_source(args, workdir, split))


def _case_id(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _image(record: dict[str, Any]) -> np.ndarray:
  return np.asarray(record['image'], np.float32) / 127.5 - 1.0


class _DrawExpert(grain.transforms.RandomMap):
  """A record -> a training example with one expert mask drawn at random."""

  def random_map(self, element: dict[str, Any], rng: np.random.Generator
                 ) -> dict[str, Any]:
    masks = element['masks']
    expert = int(rng.integers(masks.shape[0]))
    return {
        'image': _image(element),
        'mask': (masks[expert].astype(np.float32) * 2.0 - 1.0)[..., None],
        'expert': np.int32(expert),
        'case_id': np.str_(_case_id(element['case_id'])),
    }


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """The per-process batch; raises unless global_batch_size divides evenly."""
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ConfigError(f'training.batch_size={global_batch_size} is not a positive multiple '
                     f'of the number of processes ({process_count})')
  return global_batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')


def train_dataset(args: DataArgs, workdir: str, global_batch_size: int,
                  process_index: int = 0, process_count: int = 1,
                  split: str = TRAIN,
                  in_memory_max_bytes: int = in_memory.DEFAULT_MAX_BYTES
                  ) -> grain.IterDataset:
  """The training pipeline as a grain IterDataset (see the module docstring); a split
  whose decoded records fit in `in_memory_max_bytes` is decoded once (data.in_memory)."""
  _check_process(process_index, process_count)
  batch = local_batch_size(global_batch_size, process_count)
  source = in_memory.maybe_in_memory(_source(args, workdir, split), in_memory_max_bytes)
  ds = grain.MapDataset.source(source)
  if len(ds) < process_count:
    raise records.DataError(f'split {split!r} has {len(ds)} examples, fewer than the '
                     f'{process_count} processes')
  # One global stream for all processes (same shuffle, same expert draws), cut into
  # chunks of the local batch size; process p takes chunks p, p + P, p + 2P, ...
  # so its k-th batch is exactly rows [p*B, (p+1)*B) of global batch k, whatever the
  # number of processes. Only this process's records are read (all of them, once,
  # where the split is small enough to be held in memory).
  ds = ds.shuffle(seed=args.seed).repeat(None)
  ds = ds.random_map(_DrawExpert(), seed=args.seed + 1)
  ds = ds.batch(batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  read = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
  it = ds.to_iter_dataset(read)
  if args.worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags (tests, notebooks)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=args.worker_count))
  return it


def train_iterator(args: DataArgs, workdir: str, global_batch_size: int,
                   process_index: int = 0, process_count: int = 1,
                   split: str = TRAIN,
                   in_memory_max_bytes: int = in_memory.DEFAULT_MAX_BYTES
                   ) -> grain.DatasetIterator:
  """An endless iterator of this process's training batches (module docstring).

  Returns:
    grain DatasetIterator; `get_state()` -> JSON-serialisable dict, `set_state(d)`.
  """
  return iter(train_dataset(args, workdir, global_batch_size, process_index,
                            process_count, split, in_memory_max_bytes))


def _eval_example(record: dict[str, Any]) -> dict[str, Any]:
  out = {
      'image': _image(record),
      'masks': record['masks'].astype(np.float32) * 2.0 - 1.0,
      'case_id': np.str_(_case_id(record['case_id'])),
  }
  if 'structures' in record:
    out['structures'] = np.asarray(record['structures'], np.uint8)
    out['structure_probs'] = np.asarray(record['structure_probs'], np.float32)
  return out


def _stack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def eval_batches(args: DataArgs, workdir: str, split: str, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 max_examples: int = -1, pad: bool = False
                 ) -> Iterator[dict[str, np.ndarray]]:
  """This process's evaluation batches of `split`, in record order.

  Args:
    max_examples: use only the first `max_examples` records of the split (-1: all);
      the processes share them.
    pad: repeat the last example to fill the last batch and give every process
      the same number of batches (as multi-process jit steps need); a `valid` bool
      [B] field marks the real examples. Without it the last batch is smaller.

  Yields:
    numpy dicts (module docstring).
  """
  _check_process(process_index, process_count)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  ds = grain.MapDataset.source(_source(args, workdir, split))
  total = len(ds) if max_examples < 0 else min(max_examples, len(ds))
  ds = ds[:total][process_index::process_count].map(_eval_example)
  mine = len(ds)
  read = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=2 * batch_size)
  pending: list[dict[str, Any]] = []
  for example in ds.to_iter_dataset(read):
    pending.append(example)
    if len(pending) == batch_size:
      batch = _stack(pending)
      if pad:
        batch['valid'] = np.ones([batch_size], bool)
      yield batch
      pending = []
  num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
  if pad:
    done = mine // batch_size
    template = pending[-1] if pending else (ds[mine - 1] if mine else None)   # mapped
    if template is None and num_batches > done:
      raise ValueError(f'process {process_index} has no examples of split {split!r} to '
                       'pad with')
    for _ in range(done, num_batches):
      valid = np.zeros([batch_size], bool)
      valid[:len(pending)] = True
      batch = _stack(pending + [template] * (batch_size - len(pending)))
      batch['valid'] = valid
      yield batch
      pending = []
  elif pending:
    yield _stack(pending)


def make_global_batch(local_batch: dict[str, np.ndarray],
                      sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Global jax.Arrays from every process's local batch (numeric fields only).

  Args:
    local_batch: this process's arrays, leading dimension B_local.
    sharding: the global batch sharding (e.g. NamedSharding(mesh, P('data'))).

  Returns:
    field -> jax.Array of leading dimension B_local * process_count; string fields
    (case_id) are left out.
  """
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.dtype.kind in 'biuf':
      out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
