"""Shared test helpers: typed settings from configs/test.py, training shortcuts."""

from typing import Any

from cimd_jax import settings as settings_lib
from cimd_jax.apps import modes
from cimd_jax.train import loop
from configs import test as test_config


def config(tfds_dir=None, **overrides: Any):
  """configs/test.py with overrides given as {'group__key': value} keyword arguments
  (double underscore for the dot), and data.tfds_dir set when given."""
  cfg = test_config.get_config()
  if tfds_dir is not None:
    cfg.data.tfds_dir = str(tfds_dir)
  for name, value in overrides.items():
    group, key = name.split('__', 1)
    cfg[group][key] = value
  return cfg


def settings(tfds_dir=None, **overrides: Any) -> settings_lib.Settings:
  """Typed settings of `config(...)`."""
  return settings_lib.from_config(config(tfds_dir, **overrides))


def train_loop(s: settings_lib.Settings, workdir: str, **kwargs):
  """loop.train_and_evaluate with every group of `s` (no lock, no reconciliation)."""
  return loop.train_and_evaluate(
      str(workdir), data=s.data, model=s.model, diffusion=s.diffusion, objective=s.objective,
      training=s.training, sampling=s.sampling, config=settings_lib.to_dict(s), **kwargs)


def train_mode(s: settings_lib.Settings, workdir: str, overrides: set[str] = frozenset()):
  """What --mode=train runs (lock, reconciliation with the checkpoint, loop)."""
  return modes.train(s, str(workdir), set(overrides))


def save_stand_in_checkpoint(workdir, step: int, stored: settings_lib.Settings | None = None,
                             metrics: dict[str, float] | None = None) -> None:
  """A checkpoint at `step` with a stand-in state, the configuration of `stored` (if
  given) and `metrics`: what a training leaves in WORKDIR, without training."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cimd_jax import checkpoint  # pylint: disable=g-import-not-at-top
  manager = checkpoint.make_manager(str(workdir), keep=5, best=True)
  config = settings_lib.to_dict(stored) if stored is not None else {}
  checkpoint.save(manager, step, {'w': jnp.zeros((2,))}, None, config, metrics)
  manager.wait_until_finished()
  manager.close()
