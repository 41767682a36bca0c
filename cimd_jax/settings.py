"""The one place that builds the configuration: config groups -> typed arguments.

Each config group maps 1:1 onto a frozen dataclass whose fields are the group's keys
and whose `__post_init__` checks every value (a one-line ConfigError naming
`group.key`):

  data       cimd_jax.data.DataArgs
  model      cimd_jax.models.ModelArgs
  diffusion  cimd_jax.diffusion.DiffusionArgs
  objective  cimd_jax.train.objective.ObjectiveArgs
  training   cimd_jax.train.args.TrainingArgs
  sampling   cimd_jax.inference.SamplingArgs

Defaults: the dataclass defaults (`default_config()`), which the config files in
configs/ change; a new setting is one dataclass field (default and check). A
checkpoint stores `to_dict(settings)`; sample, evaluate and resume rebuild the model
from it (`reconcile`).
"""

import dataclasses
import importlib.util
import os
from typing import Any, Mapping

from absl import logging
import ml_collections

from cimd_jax.data.args import DataArgs
from cimd_jax.diffusion.args import DiffusionArgs
from cimd_jax.inference.args import SamplingArgs
from cimd_jax.models.build import ModelArgs
from cimd_jax.train.args import TrainingArgs
from cimd_jax.train.objective import ObjectiveArgs
from cimd_jax.utils import config_args
from cimd_jax.utils.errors import ConfigError

GROUPS: dict[str, type] = {
    'data': DataArgs,
    'model': ModelArgs,
    'diffusion': DiffusionArgs,
    'objective': ObjectiveArgs,
    'training': TrainingArgs,
    'sampling': SamplingArgs,
}
# Keys a checkpoint fixes (the network's shape, its diffusion); all others may change.
FROZEN_GROUPS = ('model', 'diffusion')
FROZEN_KEYS = ('data.image_size', 'data.image_channels')
# Data keys that decide the held-out splits and what the network is shown: on the data
# source the checkpoint was trained on (same name and source_dir) they follow it, so that
# 'test' stays the split training never saw (an explicit other value is kept, warned).
SAME_SOURCE_KEYS = ('seed', 'validation_fraction', 'test_fraction', 'split_file',
                    'mask_threshold', 'resize', 'percentile_low', 'percentile_high',
                    'hdf5_image_range', 'nifti_image_patterns', 'nifti_axis')
# Data keys that turn an image file into the network's input (folder.read_image): an
# unlabelled input folder (sampling.input_dir) is read with the checkpoint's values on
# any data source, as the network saw them; NIfTI scans of a NIfTI-trained model also
# with its slice axis and channel order (NIFTI_INPUT_KEYS).
INPUT_IMAGE_KEYS = ('resize', 'percentile_low', 'percentile_high')
NIFTI_INPUT_KEYS = ('nifti_axis', 'nifti_image_patterns')
# Keys that decide what a training run learns beyond the network (FROZEN_*): a finished
# run trains nothing with others (`changed_training_keys`). NOT_TRAINING_DATA_KEYS:
# where or how fast records are read, or only the test split.
NOT_TRAINING_DATA_KEYS = ('tfds_dir', 'worker_count', 'synthetic_num_test')
TRAINING_KEYS = (('objective', None),    # None: every key of the group
                 ('training', ('batch_size', 'ema_rate', 'grad_clip_norm', 'learning_rate',
                               'lr_schedule', 'seed', 'warmup_steps', 'weight_decay')),
                 ('data', tuple(k for k in GROUPS['data'].__dataclass_fields__
                                if k not in NOT_TRAINING_DATA_KEYS)))
# Model keys that change only how the same network is computed (may differ after training).
COMPUTE_KEYS = ('model.compute_dtype', 'model.remat')
# Frozen keys added after checkpoints were first written: the value a checkpoint without
# them was trained with (read by reconcile, not a config file's newer default).
LEGACY_VALUES = {'model': {'detach_variance': False}, 'diffusion': {'prediction': 'eps'}}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every config group as its typed arguments."""
  data: DataArgs
  model: ModelArgs
  diffusion: DiffusionArgs
  objective: ObjectiveArgs
  training: TrainingArgs
  sampling: SamplingArgs

  def __post_init__(self):
    self.model.check_image_size(self.data.image_size)
    self.diffusion.check_model(self.model.learn_sigma)
    if self.sampling.steps:
      self.sampling.tables(self.diffusion.betas())


def default_config() -> ml_collections.ConfigDict:
  """A ConfigDict with every group and key at its default value."""
  return ml_collections.ConfigDict(
      {name: {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
       for name, cls in GROUPS.items()})


def from_config(config: Mapping[str, Any] | ml_collections.ConfigDict) -> Settings:
  """Settings from a ConfigDict (or the dict of `to_dict`); ConfigError names an
  unknown group or key (with the closest known one) or a value out of range."""
  values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  for name in values:
    if name not in GROUPS:
      import difflib  # pylint: disable=g-import-not-at-top
      close = difflib.get_close_matches(name, list(GROUPS), n=1)
      raise ConfigError(f'unknown config group {name!r}' +
                        (f'; did you mean {close[0]}?' if close else
                         f'; the groups are {", ".join(GROUPS)}'))
  return Settings(**{name: config_args.build_args(cls, name, values.get(name, {}) or {})
                     for name, cls in GROUPS.items()})


def to_dict(settings: Settings) -> dict[str, dict[str, Any]]:
  """The settings as a JSON-ready dict {group: {key: value}} (stored in checkpoints)."""
  return {name: config_args.as_dict(getattr(settings, name)) for name in GROUPS}


def _frozen(key: str) -> bool:
  group = key.split('.', 1)[0]
  return (group in FROZEN_GROUPS or key in FROZEN_KEYS) and key not in COMPUTE_KEYS


def reconcile(current: Settings, stored: Mapping[str, Any] | None, overrides: set[str],
              where: str, input_images: bool = False) -> Settings:
  """The settings to run with on a trained checkpoint.

  The checkpoint's model and diffusion settings (and image size and channels) win: a
  key that differs only because the config file says otherwise is taken from the
  checkpoint (logged); one set explicitly (`overrides`, dotted names from the command
  line) to another value raises ConfigError naming the key and both values. On the
  data source it was trained on, SAME_SOURCE_KEYS follow the checkpoint too, explicit
  overrides kept with a warning; with `input_images` (an unlabelled input folder),
  INPUT_IMAGE_KEYS on any source by the same rule, and NIFTI_INPUT_KEYS when both
  name 'nifti'. Other keys (sampling, data, schedule, compute dtype) are kept as
  given; a key the checkpoint predates reads as LEGACY_VALUES says.
  """
  if stored is None:
    logging.warning('%s has no stored configuration (older checkpoint); using the given '
                    'config unchecked', where)
    return current
  values = to_dict(current)
  stored = {group: {**LEGACY_VALUES.get(group, {}), **keys} if isinstance(keys, Mapping)
            else keys for group, keys in stored.items()}
  for group, keys in stored.items():
    if group not in values:
      continue
    for key, old in keys.items():
      name = f'{group}.{key}'
      if not _frozen(name) or key not in values[group]:
        continue
      new = values[group][key]
      if _same(new, old):
        continue
      if name in overrides:
        raise ConfigError(
            f'--config.{name}={show(new)} contradicts {where}, which was trained with '
            f'{name}={show(old)}; only sampling.*, data sources, training schedule and '
            'compute keys may change after training (drop the override, or train a new '
            'workdir)')
      logging.info('Using %s=%s from %s (the config file says %s)', name, show(old), where,
                   show(new))
      values[group][key] = old
  _follow_same_source(values['data'], stored.get('data') or {}, overrides, where)
  if input_images:
    old = stored.get('data') or {}
    keys = INPUT_IMAGE_KEYS + (NIFTI_INPUT_KEYS if values['data']['name'] == old.get('name')
                               == 'nifti' else ())
    _follow(values['data'], old, keys, overrides, where,
            'its input images are not read as training\'s were')
  return from_config(values)


def changed_training_keys(current: Settings, stored: Mapping[str, Any] | None
                          ) -> list[tuple[str, Any, Any]]:
  """(dotted key, stored value, current value) of every TRAINING_KEYS entry that
  differs from a checkpoint's stored configuration (data.source_dir by real path)."""
  if not stored:
    return []
  values = to_dict(current)
  changed = []
  for group, keys in TRAINING_KEYS:
    old_group = stored.get(group) or {}
    for key in keys or tuple(values[group]):
      if key not in old_group:
        continue
      old, new = old_group[key], values[group][key]
      if key == 'source_dir':
        old, new = _source({key: old}), _source({key: new})
      if not _same(new, old):
        changed.append((f'{group}.{key}', old, new))
  return changed


def _follow_same_source(data: dict[str, Any], stored: Mapping[str, Any],
                        overrides: set[str], where: str) -> None:
  """SAME_SOURCE_KEYS of `data` (a to_dict group, changed in place) from `stored`
  when both name the same data source (module comment at SAME_SOURCE_KEYS)."""
  if stored.get('name') != data['name'] or _source(stored) != _source(data):
    return
  _follow(data, stored, SAME_SOURCE_KEYS, overrides, where,
          'its splits or preprocessing are not training\'s, so a held-out split may hold '
          'training cases')


def _follow(data: dict[str, Any], stored: Mapping[str, Any], keys: tuple[str, ...],
            overrides: set[str], where: str, risk: str) -> None:
  """`keys` of `data` (changed in place) from `stored`; an explicit override is kept
  with a warning that names `risk`."""
  for key in keys:
    name = f'data.{key}'
    if key not in stored or _same(data[key], stored[key]):
      continue
    if name in overrides:
      logging.warning('--config.%s=%s differs from %s (trained with %s=%s): %s', name,
                      show(data[key]), where, name, show(stored[key]), risk)
      continue
    logging.info('Using %s=%s from %s (the config file says %s)', name,
                 show(stored[key]), where, show(data[key]))
    data[key] = stored[key]


def _source(data: Mapping[str, Any]) -> str:
  """The real path of a data group's source_dir ('' when none)."""
  path = data.get('source_dir') or ''
  return os.path.realpath(os.path.expanduser(path)) if path else ''


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return list(a) == list(b)
  return a == b


def show(value: Any) -> str:
  """A config value as a user would type it (lists as tuples)."""
  return repr(tuple(value)) if isinstance(value, list) else repr(value)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file given by path (config files import each other
  through this, so they work from any working directory)."""
  spec = importlib.util.spec_from_file_location(
      f'cimd_config_{os.path.splitext(os.path.basename(path))[0]}', path)
  if spec is None or spec.loader is None:
    raise ConfigError(f'cannot load config file {path}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
