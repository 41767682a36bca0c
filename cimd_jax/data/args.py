"""DataArgs: the explicit, typed arguments of the data modules.

The `data` config group maps 1:1 onto it (`DataArgs(**config.data)`, built by
`cimd_jax.settings`); nothing under `cimd_jax/data` reads a ConfigDict.
"""

import dataclasses
import os

from cimd_jax.utils.errors import ConfigError

DATASET_NAMES = ('synthetic', 'folder', 'lidc_pickle', 'lidc_hdf5', 'nifti')
TRAIN, TEST, VALIDATION = 'train', 'test', 'validation'
# Datasets read from data.source_dir (everything but the built-in synthetic set).
SOURCE_DATASETS = ('folder', 'lidc_pickle', 'lidc_hdf5', 'nifti')


def _as_tuple(value, key: str, kind: type, length: int | None = None) -> tuple:
  """`value` (tuple/list) as a tuple of `kind`; ValueError naming data.<key>."""
  if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
    raise ConfigError(f'data.{key} must be a tuple of {kind.__name__}, got {value!r}')
  try:
    out = tuple(kind(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(f'data.{key} must be a tuple of {kind.__name__}, got {value!r}'
                     ) from None
  if kind is str and not all(out):
    raise ConfigError(f'data.{key} must not hold empty strings, got {value!r}')
  if length is not None and len(out) != length:
    raise ConfigError(f'data.{key} must hold {length} values, got {value!r}')
  return out


@dataclasses.dataclass(frozen=True)
class DataArgs:
  """What to read and how.

  Attributes:
    name: 'synthetic' (built-in generator), 'folder' (CIMD folder layout),
      'lidc_pickle' (Probabilistic U-Net LIDC pickles), 'lidc_hdf5' (PHiSeg LIDC
      HDF5 file) or 'nifti' (NIfTI volumes with several raters).
    source_dir: the source: folder ROOT with training/ and testing/ ('folder',
      'nifti'), folder of *.pickle files ('lidc_pickle'), the .hdf5 file or its
      folder ('lidc_hdf5').
    tfds_dir: prepared-dataset cache; '' means WORKDIR/tfds.
    image_size: H = W of the records (and of the model input).
    image_channels: channels C of the image.
    num_annotators: expert masks A per case.
    mask_threshold: 'folder': a label pixel (of 255) is foreground when > this value.
    resize: 'folder', 'lidc_pickle', 'lidc_hdf5': resize images/masks whose size
      differs from image_size (else error). Not used by 'nifti' (centre pad/crop).
    validation_fraction: case-level (patient-level for 'lidc_pickle') fraction of
      the training cases held out as the 'validation' split (0 disables it).
      'lidc_hdf5' brings its own validation split and ignores it.
    seed: shuffling, expert draws, the held-out splits and the empty NIfTI slices.
    worker_count: grain worker processes (0: read in this process).
    synthetic_num_train: synthetic dataset: cases in 'train'.
    synthetic_num_test: synthetic dataset: cases in 'test'.
    synthetic_seed: synthetic dataset: generator seed.
    test_fraction: 'lidc_pickle' (and 'nifti' without testing/): patient- or
      case-level fraction held out as 'test' (0: no test split).
    split_file: 'lidc_pickle': JSON file {'train': [series_uid, ...],
      'validation': [...], 'test': [...]} fixing the split ('' = seeded split);
      'nifti': the same with case folder names (of training/ and testing/).
    hdf5_image_range: 'lidc_hdf5': (low, high) of float images, mapped linearly to
      0..255 (PHiSeg stores image - 0.5: (-0.5, 0.5)).
    percentile_low: 'nifti' volumes and wider-than-8-bit 'folder' images: intensity
      percentile mapped to 0 (values below are clipped).
    percentile_high: the percentile mapped to 255 (values above are clipped).
    nifti_image_patterns: 'nifti': one glob pattern per MR sequence (= channel),
      each matching exactly one file per case folder.
    nifti_rater_patterns: 'nifti': one glob pattern per rater (= annotator).
    nifti_axis: 'nifti': volume axis (0, 1, 2) the 2-D slices are taken along.
    nifti_empty_fraction: 'nifti': fraction of the slices no rater marked that are
      kept (seeded); every marked slice is kept.
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
  test_fraction: float = 0.2
  split_file: str = ''
  hdf5_image_range: tuple[float, float] = (-0.5, 0.5)
  percentile_low: float = 0.5
  percentile_high: float = 99.5
  nifti_image_patterns: tuple[str, ...] = ()
  nifti_rater_patterns: tuple[str, ...] = ()
  nifti_axis: int = 2
  nifti_empty_fraction: float = 0.0

  def __post_init__(self):
    # Lists (e.g. from JSON or a ConfigDict) become tuples: DataArgs stays hashable.
    object.__setattr__(self, 'hdf5_image_range',
                       _as_tuple(self.hdf5_image_range, 'hdf5_image_range', float, 2))
    for key in ('nifti_image_patterns', 'nifti_rater_patterns'):
      object.__setattr__(self, key, _as_tuple(getattr(self, key), key, str))
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
    if not 0.0 <= self.test_fraction < 1.0:
      raise ConfigError(f'data.test_fraction must be in [0, 1), got {self.test_fraction}')
    if self.worker_count < 0:
      raise ConfigError(f'data.worker_count must be >= 0, got {self.worker_count}')
    for key in ('seed', 'synthetic_seed'):   # numpy's seeded generators take no negatives
      if getattr(self, key) < 0:
        raise ConfigError(f'data.{key} must be >= 0, got {getattr(self, key)}')
    low, high = self.hdf5_image_range
    if not low < high:
      raise ConfigError('data.hdf5_image_range must be (low, high) with low < high, got '
                       f'{self.hdf5_image_range}')
    if not 0.0 <= self.percentile_low < self.percentile_high <= 100.0:
      raise ConfigError('data.percentile_low and data.percentile_high must satisfy '
                       f'0 <= low < high <= 100, got {self.percentile_low}, '
                       f'{self.percentile_high}')
    if self.nifti_axis not in (0, 1, 2):
      raise ConfigError(f'data.nifti_axis must be 0, 1 or 2, got {self.nifti_axis}')
    if not 0.0 <= self.nifti_empty_fraction <= 1.0:
      raise ConfigError('data.nifti_empty_fraction must be in [0, 1], got '
                       f'{self.nifti_empty_fraction}')
    if self.name in SOURCE_DATASETS and not self.source_dir:
      raise ConfigError(f'data.name={self.name!r} needs data.source_dir '
                       + {'folder': '(ROOT with training/ and testing/)',
                          'nifti': '(ROOT with training/<case>/ and optionally testing/)',
                          'lidc_pickle': '(a folder of *.pickle files)',
                          'lidc_hdf5': '(the .hdf5 file or its folder)'}[self.name])
    if self.split_file and self.name not in ('lidc_pickle', 'nifti'):
      raise ConfigError("data.split_file is only read by data.name='lidc_pickle' and "
                        f"'nifti', got data.name={self.name!r}")
    if self.name == 'nifti':
      if len(self.nifti_image_patterns) != self.image_channels:
        raise ConfigError(
            f'data.nifti_image_patterns must hold data.image_channels='
            f'{self.image_channels} pattern(s) (one per MR sequence), got '
            f'{self.nifti_image_patterns}')
      if len(self.nifti_rater_patterns) != self.num_annotators:
        raise ConfigError(
            f'data.nifti_rater_patterns must hold data.num_annotators='
            f'{self.num_annotators} pattern(s) (one per rater), got '
            f'{self.nifti_rater_patterns}')
      if self.resize:
        raise ConfigError("data.resize must be False for data.name='nifti' (slices are "
                         'centre padded/cropped to data.image_size)')

  def cache_dir(self, workdir: str) -> str:
    """Where prepared datasets live: tfds_dir, or WORKDIR/tfds when it is ''."""
    return os.path.abspath(self.tfds_dir or os.path.join(workdir, 'tfds'))
