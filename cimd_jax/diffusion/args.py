"""DiffusionArgs: the `diffusion` config group (the forward process and what the
network predicts). A checkpoint is only valid with the settings it was trained with."""

import dataclasses

import numpy as np

from cimd_jax.diffusion import gaussian
from cimd_jax.diffusion import schedule
from cimd_jax.utils import config_args as ca

BETA_SCHEDULES = ('linear', 'cosine')


@dataclasses.dataclass(frozen=True)
class DiffusionArgs:
  """The diffusion process.

  num_timesteps: T of training (sampling may respace to fewer steps).
  beta_schedule: 'linear' (Ho et al., rescaled to T) | 'cosine' (Nichol & Dhariwal).
  variance: the reverse-process variance: 'learned_range' (the network's v channel
    interpolates log beta and log beta_tilde; needs model.learn_sigma),
    'fixed_small' (beta_tilde) or 'fixed_large' (beta).
  prediction: what the network's first channel predicts: 'eps' (the paper) or 'x0'.
  """
  num_timesteps: int = 1000
  beta_schedule: str = 'linear'
  variance: str = 'learned_range'
  prediction: str = 'eps'

  def __post_init__(self):
    ca.check_int('diffusion.num_timesteps', self.num_timesteps, 2, 100_000)
    ca.check_choice('diffusion.beta_schedule', self.beta_schedule, BETA_SCHEDULES)
    ca.check_choice('diffusion.variance', self.variance, gaussian.VARIANCES)
    ca.check_choice('diffusion.prediction', self.prediction, gaussian.PREDICTIONS)
    try:
      self.betas()
    except ValueError as e:
      ca.fail('diffusion.num_timesteps', self.num_timesteps, f'a valid T for the '
              f'{self.beta_schedule} schedule ({e})')

  def betas(self) -> np.ndarray:
    """The T betas of the training process, float64 [T]."""
    return schedule.get_beta_schedule(self.beta_schedule, self.num_timesteps)

  def tables(self) -> schedule.DiffusionTables:
    """The full T-step tables of the training process."""
    return schedule.make_tables(self.betas())

  def check_model(self, learn_sigma: bool) -> None:
    """Raises ConfigError when the variance needs an output the model lacks."""
    if self.variance == 'learned_range' and not learn_sigma:
      ca.fail('diffusion.variance', self.variance,
              "'fixed_small' or 'fixed_large' (model.learn_sigma=False has no v channel)")
