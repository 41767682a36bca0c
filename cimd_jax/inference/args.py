"""SamplingArgs: the `sampling` config group, used by --mode=sample, --mode=evaluate,
validation during training and `Model.sample`."""

import dataclasses

import numpy as np

from cimd_jax.diffusion import samplers
from cimd_jax.diffusion import schedule
from cimd_jax.utils import config_args as ca

VARIANCE_TRANSFERS = ('interpolate', 'x0_uncertainty')


@dataclasses.dataclass(frozen=True)
class SamplingArgs:
  """How to draw masks, from which checkpoint, for which images, written where.

  sampler: 'ddpm' (ancestral) | 'ddim'. steps: '' = all T steps; '100' (or
    '10,10,5') respaced DDPM; 'ddim25' DDIM's stride spacing. ddim_eta: DDIM noise.
  clip_variance: keep the learned variance inside [beta_tilde_t, beta_t] (v clipped
    to [-1, 1]; docs/samplers.md).
  variance_transfer: how a learned variance, trained for one step of the T-step
    chain, is used for a respaced step: 'interpolate' (improved DDPM: the same v
    interpolates the respaced step's [beta_tilde, beta]) or 'x0_uncertainty' (the
    Var[x_0 | x_t] it implies, clipped to [0, 1], gives the respaced step's
    variance; needs clip_variance=False; inference/ensemble.variance_transfer_fn).
  num_samples: N masks per image. max_batch: rows (images x samples) per compiled
    call. images_per_call: images sampled together.
  use_ema: sample with the EMA weights. checkpoint: 'latest', 'best' (the best
    validation score while training) or a step number.
  seed: image b's masks depend only on (seed, b's index in the run).
  split: the dataset split that sample/evaluate read ('test', 'validation', ...);
    max_images: only its first max_images images (-1: all; of an input folder, its
    first max_images usable ones).
  input_dir: sample: a folder of unlabelled images instead of a split (with
    data.name='nifti': of NIfTI scans, one folder each, every slice sampled).
  output_dir: '' -> WORKDIR/samples/<split or folder> (sample) or WORKDIR/eval/<split>.
  skip_bad_inputs: sample: skip unreadable input images (listed in the manifest)
    instead of stopping at the first.
  """
  sampler: str = 'ddim'
  steps: str = 'ddim25'
  ddim_eta: float = 0.0
  clip_variance: bool = True
  variance_transfer: str = 'interpolate'
  num_samples: int = 16
  max_batch: int = 64
  images_per_call: int = 4
  use_ema: bool = True
  checkpoint: str = 'latest'
  seed: int = 0
  split: str = 'test'
  max_images: int = -1
  input_dir: str = ''
  output_dir: str = ''
  skip_bad_inputs: bool = False

  def __post_init__(self):
    ca.check_choice('sampling.sampler', self.sampler, samplers.SAMPLERS)
    if not isinstance(self.steps, str):
      object.__setattr__(self, 'steps', str(self.steps))
    if self.steps.startswith('ddim') and self.sampler != 'ddim':
      ca.fail('sampling.steps', self.steps, "a DDPM spacing ('', '50', '10,10,5'); "
              "DDIM spacings need sampling.sampler='ddim'")
    ca.check_float('sampling.ddim_eta', self.ddim_eta, 0.0, 1.0)
    ca.check_bool('sampling.clip_variance', self.clip_variance)
    ca.check_choice('sampling.variance_transfer', self.variance_transfer,
                    VARIANCE_TRANSFERS)
    if self.variance_transfer == 'x0_uncertainty' and self.clip_variance:
      ca.fail('sampling.clip_variance', self.clip_variance,
              "False with sampling.variance_transfer='x0_uncertainty' (it bounds the "
              'variance itself)')
    ca.check_int('sampling.num_samples', self.num_samples, 1, 10_000)
    ca.check_int('sampling.max_batch', self.max_batch, 1, 1 << 20)
    ca.check_int('sampling.images_per_call', self.images_per_call, 1, 1 << 16)
    ca.check_bool('sampling.use_ema', self.use_ema)
    if not isinstance(self.checkpoint, str):
      object.__setattr__(self, 'checkpoint', str(self.checkpoint))
    if self.checkpoint not in ('latest', 'best') and not self.checkpoint.isdigit():
      ca.fail('sampling.checkpoint', self.checkpoint, "'latest', 'best' or a step number")
    ca.check_int('sampling.seed', self.seed, 0, 2**31 - 1)
    ca.check_int('sampling.max_images', self.max_images, 1, allow=(-1,))
    ca.check_bool('sampling.skip_bad_inputs', self.skip_bad_inputs)

  def tables(self, betas: np.ndarray) -> schedule.DiffusionTables:
    """The sampler's (possibly respaced) tables over the training `betas` [T];
    ConfigError naming sampling.steps when the spacing does not fit T."""
    try:
      return samplers.sampler_from_name(betas, self.steps, self.sampler)[0]
    except (ValueError, AssertionError) as e:
      ca.fail('sampling.steps', self.steps, f'a spacing that fits T={len(betas)} ({e})')
      raise  # unreachable: fail raises

  def short_name(self, num_timesteps: int) -> str:
    """One word per distinct sampling run (TensorBoard group, output folder): the
    sampler and its steps, 'ddim25' (DDIM, the DDIM paper's stride spacing 'ddim25'),
    'ddpm50' (DDPM, section spacing '50'), 'ddpm1000' (all T); DDIM over section
    spacings 'ddim-sections50' (other timesteps than 'ddim50'). Settings away from
    their defaults are appended: '_eta0.5' (DDIM), '_noclip' and '_<variance
    transfer>' (DDPM, which uses the learned variance), '_raw' (not the EMA weights)."""
    if self.sampler == 'ddim' and self.steps.startswith('ddim'):
      name = self.steps
    elif self.sampler == 'ddim' and self.steps:
      name = f'ddim-sections{self.steps}'
    else:
      name = f'{self.sampler}{self.steps or num_timesteps}'
    if self.sampler == 'ddim' and self.ddim_eta:
      name += f'_eta{self.ddim_eta:g}'
    if self.sampler == 'ddpm' and not self.clip_variance:
      name += '_noclip'
    if self.sampler == 'ddpm' and self.variance_transfer != 'interpolate':
      name += f'_{self.variance_transfer}'
    if not self.use_ema:
      name += '_raw'
    return name

  def describe(self, num_timesteps: int) -> dict:
    """What a manifest records about the sampler."""
    return {'sampler': self.sampler, 'steps': self.steps or str(num_timesteps),
            'ddim_eta': self.ddim_eta if self.sampler == 'ddim' else None,
            'clip_variance': self.clip_variance,
            'variance_transfer': self.variance_transfer}

  def images_per_chunk(self) -> int:
    """Images per sampling call: images_per_call, capped so that one call's rows
    (images x num_samples) stay within max_batch (at least one image)."""
    return max(1, min(self.images_per_call, self.max_batch // self.num_samples))
