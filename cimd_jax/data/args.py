"""DataArgs: the explicit, typed arguments of the data modules.

The `data` config group maps 1:1 onto it (`DataArgs(**config.data)`, built by
`cimd_jax.settings`); nothing under `cimd_jax/data` reads a ConfigDict.
"""

import dataclasses
import os

from cimd_jax.utils.errors import ConfigError

DATASET_NAMES = ('synthetic', 'folder')
TRAIN, TEST, VALIDATION = 'train', 'test', 'validation'


@dataclasses.dataclass(frozen=True)
class DataArgs:
  """What to read and how.

  Attributes:
    name: 'synthetic' (built-in generator) or 'folder' (CIMD folder layout).
    source_dir: folder datasets: ROOT holding training/ and testing/.
    tfds_dir: prepared-dataset cache; '' means WORKDIR/tfds.
    image_size: H = W of the records (and of the model input).
    image_channels: channels C of the image.
    num_annotators: expert masks A per case.
    mask_threshold: a label pixel (of 255) is foreground when > this value.
    resize: resize images/masks whose size differs from image_size (else error).
    validation_fraction: case-level fraction of training held out as the
      'validation' split (0 disables the split).
    seed: shuffling, expert draws and the validation split.
    worker_count: grain worker processes (0: read in this process).
    synthetic_num_train: synthetic dataset: cases in 'train'.
    synthetic_num_test: synthetic dataset: cases in 'test'.
    synthetic_seed: synthetic dataset: generator seed.
  """
  name: str = 'synthetic'
  source_dir: str = ''
  tfds_dir: str = ''
  image_size: int = 128
  image_channels: int = 1
  num_annotators: int = 4
  mask_threshold: int = 127
  resize: bool = False
  validation_fraction: float = 0.0
  seed: int = 0
  worker_count: int = 0
  synthetic_num_train: int = 2000
  synthetic_num_test: int = 64
  synthetic_seed: int = 1234

  def __post_init__(self):
    if self.name not in DATASET_NAMES:
      raise ConfigError(f'data.name must be one of {DATASET_NAMES}, got {self.name!r}')
    if self.image_size < 1:
      raise ConfigError(f'data.image_size must be positive, got {self.image_size}')
    if self.image_channels < 1:
      raise ConfigError(f'data.image_channels must be >= 1, got {self.image_channels}')
    if self.num_annotators < 1:
      raise ConfigError(f'data.num_annotators must be >= 1, got {self.num_annotators}')
    if not 0 <= self.mask_threshold < 255:
      raise ConfigError(f'data.mask_threshold must be in [0, 255), got {self.mask_threshold}')
    if not 0.0 <= self.validation_fraction < 1.0:
      raise ConfigError('data.validation_fraction must be in [0, 1), got '
                       f'{self.validation_fraction}')
    if self.worker_count < 0:
      raise ConfigError(f'data.worker_count must be >= 0, got {self.worker_count}')
    if self.name == 'folder' and not self.source_dir:
      raise ConfigError("data.name='folder' needs data.source_dir (ROOT with training/ "
                       'and testing/)')

  def cache_dir(self, workdir: str) -> str:
    """Where prepared datasets live: tfds_dir, or WORKDIR/tfds when it is ''."""
    return os.path.abspath(self.tfds_dir or os.path.join(workdir, 'tfds'))
