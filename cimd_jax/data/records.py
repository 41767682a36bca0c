"""What the TFDS builders write: the record features, the config naming, preparing.

Both builders (`folder.CimdFolder`, `synthetic.CimdSynthetic`) write ArrayRecord files
with these fields per case:

  image            uint8 [H, W, C]
  masks            uint8 [A, H, W] in {0, 1}   (A = num_annotators, expert order)
  case_id          string (bytes when read back)
  structures       uint8 [S, H, W] in {0, 1}   (synthetic only)
  structure_probs  float32 [S]                 (synthetic only; -1 = padding)

The builder config name carries a hash of every parameter that changes the records,
so a cache prepared with other settings is never silently reused, and TFDS writes
into a temporary `incomplete.*` folder that is renamed only when the whole dataset
is written: a failed preparation leaves nothing that reads as complete.
"""

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cimd_jax.utils.errors import UserError

VERSION = '1.0.0'


class DataError(UserError, ValueError):
  """Bad input data; the one-line message names the file (and key) and what was
  expected. Also reachable as `folder.DataError`."""


class SourceNotFoundError(DataError, FileNotFoundError):
  """The source (folder, file or one of its split folders) does not exist."""


class _DropCustomConfigWarning(logging.Filter):
  """TFDS warns 'Using custom data configuration' for every builder we make: all of
  ours are custom by design."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Using custom data configuration')


logging.getLogger('absl').addFilter(_DropCustomConfigWarning())
NUM_STRUCTURES = 3   # S: structure slots of the synthetic dataset


def features(image_size: int, image_channels: int, num_annotators: int,
             with_structures: bool) -> tfds.features.FeaturesDict:
  """The record features; uint8 tensors are zlib-compressed raw bytes."""
  zlib = tfds.features.Encoding.ZLIB
  size = image_size
  spec = {
      'image': tfds.features.Tensor(shape=(size, size, image_channels), dtype=np.uint8,
                                    encoding=zlib),
      'masks': tfds.features.Tensor(shape=(num_annotators, size, size), dtype=np.uint8,
                                    encoding=zlib),
      'case_id': tfds.features.Text(),
  }
  if with_structures:
    spec['structures'] = tfds.features.Tensor(
        shape=(NUM_STRUCTURES, size, size), dtype=np.uint8, encoding=zlib)
    spec['structure_probs'] = tfds.features.Tensor(shape=(NUM_STRUCTURES,),
                                                   dtype=np.float32)
  return tfds.features.FeaturesDict(spec)


def short_hash(params: dict[str, Any], length: int = 10) -> str:
  """A stable hex digest of a JSON-serialisable dict."""
  blob = json.dumps(params, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:length]


class CimdConfig(tfds.core.BuilderConfig):
  """A builder config whose name encodes its parameters (see `config_name`).

  Attributes:
    params: everything that changes the records (JSON-serialisable); hashed into
      the name.
    payload: data the builder needs that is not part of the identity (e.g. the
      already validated list of case files).
  """

  def __init__(self, *, name: str, params: dict[str, Any], payload: Any = None,
               description: str = ''):
    super().__init__(name=name, version=VERSION, description=description)
    self.params = params
    self.payload = payload


def config_name(prefix: str, params: dict[str, Any]) -> str:
  """'<prefix>_<hash of params>', a valid TFDS config name."""
  return f'{prefix}_{short_hash(params)}'


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo that never looks for pre-computed metadata on GCS (TFDS would make
  an empty temporary folder for that on every construction of an unprepared
  builder)."""

  def initialize_from_bucket(self) -> None:
    return None


def dataset_info(builder: tfds.core.DatasetBuilder, description: str,
                 features_dict: tfds.features.FeaturesDict) -> tfds.core.DatasetInfo:
  """The DatasetInfo of our builders: records in writing order (no TFDS shuffle)."""
  return _LocalDatasetInfo(builder=builder, description=description,
                           features=features_dict, disable_shuffling=True)


class CimdBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders: built from a CimdConfig, never looked up by name (so not
  registered with TFDS), no download step."""

  VERSION = tfds.core.Version(VERSION)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # TFDS looks for a checksums file beside the builder's code; its lookup needs
    # `importlib_resources` on Python >= 3.9. We download nothing: no checksums.
    return None


def is_complete(builder: tfds.core.GeneratorBasedBuilder) -> bool:
  """Whether the builder's final folder holds a finished dataset.

  TFDS renames its temporary folder to the final one only after writing every
  split, dataset_info.json and features.json, so both files mark completion.
  """
  path = builder.data_path
  return all((path / name).exists() for name in ('dataset_info.json', 'features.json'))


def prepare_builder(builder: tfds.core.GeneratorBasedBuilder) -> dict[str, int]:
  """Writes the dataset once (atomically) and returns split -> number of examples.

  A folder at the final path that TFDS does not recognise as complete (e.g. copied
  half-way by hand) is removed and rebuilt; it is under our own cache directory and
  named by the parameter hash, so it can only hold this dataset.
  """
  if not is_complete(builder):
    path = builder.data_path
    if path.exists():
      logging.warning('Removing incomplete prepared dataset at %s', path)
      path.rmtree()
    tfds.disable_progress_bar()
    try:
      builder.download_and_prepare(
          file_format='array_record',
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except OSError:
      # Another process finished the same dataset first (its rename won the race).
      if not is_complete(builder):
        raise
      logging.info('Dataset %s was prepared by another process', path)
      builder.info.read_from_directory(path)
  return {name: int(split.num_examples) for name, split in builder.info.splits.items()}


def write_params(data_dir: Any, params: dict[str, Any]) -> None:
  """Stores the config parameters beside the records (for people; code uses the hash).

  Called from `_split_generators`, while `data_dir` is still TFDS's temporary folder.
  """
  with open(os.path.join(os.fspath(data_dir), 'cimd_params.json'), 'w') as f:
    json.dump(params, f, indent=2, sort_keys=True, default=str)
