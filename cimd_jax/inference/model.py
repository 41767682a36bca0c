"""The Python API for inference: `model = cimd_jax.load(workdir)`, then
`model.sample(images, num_samples=16)`.

    import cimd_jax
    model = cimd_jax.load('runs/lidc')                  # latest checkpoint, EMA weights
    out = model.sample(images, num_samples=16, seed=0)  # images uint8 [B, H, W(, C)]
    out.masks       # bool [B, N, H, W]
    out.frequency   # float32 [B, H, W]: fraction of the N masks covering each pixel
    out.variance    # float32 [B, H, W]: frequency * (1 - frequency)

The model's architecture and diffusion come from the configuration stored with the
checkpoint; the sampler defaults to the one the run was configured with.
"""

import dataclasses
from typing import Any

from absl import logging
import jax
import numpy as np

from cimd_jax.diffusion.args import DiffusionArgs
from cimd_jax.inference import ensemble
from cimd_jax.inference import restore
from cimd_jax.inference.args import SamplingArgs
from cimd_jax.models.build import ModelArgs, unet_param_shapes
from cimd_jax.utils import config_args
from cimd_jax.utils.errors import CheckpointMismatchError, InputError


@dataclasses.dataclass(frozen=True)
class Samples:
  """An ensemble per image: masks bool [B, N, H, W]; frequency and variance float32
  [B, H, W] (per-pixel foreground frequency over the N masks and its binomial
  variance frequency * (1 - frequency))."""
  masks: np.ndarray
  frequency: np.ndarray
  variance: np.ndarray


def prepare_images(images: Any, image_size: int, image_channels: int,
                   raw_range: tuple[float, float] | None = None) -> np.ndarray:
  """Images as the model takes them: float32 [B, H, W, C] in [-1, 1].

  Accepts uint8 [B, H, W] or [B, H, W, C] (0..255, read as training reads records:
  x / 127.5 - 1), or float arrays already in [-1, 1] (a batch with no negative value,
  likely [0, 1] images, is warned about, and so is one inside `raw_range`, the range
  float source images were stored in, e.g. a PHiSeg HDF5 file's, which training
  mapped to [-1, 1]). A single-channel image is repeated to C channels. Raises
  InputError naming the shape or range at fault.
  """
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise InputError(f'images must be [B, H, W] or [B, H, W, C], got shape {x.shape}')
  if x.shape[1:3] != (image_size, image_size):
    raise InputError(f'images are {x.shape[1]}x{x.shape[2]} pixels, the model takes '
                     f'{image_size}x{image_size}')
  if x.shape[-1] == 1 and image_channels > 1:
    x = np.repeat(x, image_channels, -1)
  if x.shape[-1] != image_channels:
    raise InputError(f'images have {x.shape[-1]} channels, the model takes {image_channels}')
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 127.5 - 1.0
  if not np.issubdtype(x.dtype, np.floating):
    raise InputError(f'images must be uint8 (0..255) or float in [-1, 1], got {x.dtype}')
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)) or x.min() < -1.0 - 1e-6 or x.max() > 1.0 + 1e-6:
    raise InputError(f'float images must be finite and in [-1, 1], got range '
                     f'[{np.nanmin(x):.4g}, {np.nanmax(x):.4g}]')
  if x.min() >= 0.0:     # training's images span [-1, 1]: these look like [0, 1] ones
    logging.warning('float images all lie in [%.4g, %.4g]: the model takes [-1, 1] '
                    '(uint8 / 127.5 - 1); rescale [0, 1] images (2x - 1) or pass uint8',
                    x.min(), x.max())
  elif (raw_range is not None and tuple(raw_range) != (-1.0, 1.0)
        and raw_range[0] <= x.min() and x.max() <= raw_range[1]):
    logging.warning('float images all lie in [%.4g, %.4g], inside the range [%g, %g] the '
                    'training images were stored in: the model takes them mapped to [-1, 1] '
                    '(as the records were made); pass them mapped so, or as uint8',
                    x.min(), x.max(), *raw_range)
  return x


class Model:
  """A trained CIMD denoiser with its diffusion, ready to draw masks.

  Attributes: step (checkpoint step), image_size, image_channels, model
  (ModelArgs), diffusion (DiffusionArgs), sampling (the run's SamplingArgs, the
  defaults of `sample`), config (the stored configuration dict).
  """

  def __init__(self, params: Any, step: int, config: dict[str, Any]):
    self.params = params
    self.step = step
    self.config = config
    self.model = config_args.build_args(ModelArgs, 'model', config['model'])
    self.diffusion = config_args.build_args(DiffusionArgs, 'diffusion', config['diffusion'])
    self.sampling = config_args.build_args(SamplingArgs, 'sampling', config.get('sampling', {}))
    self.image_size = int(config['data']['image_size'])
    self.image_channels = int(config['data']['image_channels'])
    self._draw_fns: dict[tuple, ensemble.EnsembleFn] = {}

  def sample(self, images: Any, num_samples: int = 16, sampler: str | None = None,
             steps: str | None = None, seed: int = 0, eta: float | None = None,
             max_batch: int | None = None) -> Samples:
    """Draws `num_samples` masks per image.

    Args:
      images: uint8 [B, H, W(, C)] or float in [-1, 1] (see `prepare_images`).
      sampler, steps, eta: 'ddpm' | 'ddim', the step spacing ('' all T, '50',
        'ddim25') and DDIM's eta; default: the run's sampling settings. `steps`
        omitted keeps the run's spacing when `sampler` is the run's (or omitted);
        with the other sampler it is '' (all T), since the run's spacing may not
        apply to it (a 'ddim25' spacing for 'ddpm').
      seed: image b's masks depend only on (seed, b).
      max_batch: rows (images x samples) per compiled call.
    """
    data = self.config.get('data', {})
    raw = (tuple(data['hdf5_image_range'])
           if data.get('name') == 'lidc_hdf5' and data.get('hdf5_image_range') else None)
    x = prepare_images(images, self.image_size, self.image_channels, raw)
    own_sampler = sampler is None or sampler == self.sampling.sampler
    if steps is None:
      steps = self.sampling.steps if own_sampler else ''
    sampling = dataclasses.replace(
        self.sampling, num_samples=int(num_samples),
        sampler=self.sampling.sampler if sampler is None else sampler,
        steps=str(steps),
        ddim_eta=self.sampling.ddim_eta if eta is None else float(eta),
        max_batch=self.sampling.max_batch if max_batch is None else int(max_batch))
    key = (sampling.sampler, sampling.steps, sampling.ddim_eta, sampling.num_samples,
           sampling.max_batch, sampling.clip_variance, sampling.variance_transfer)
    if key not in self._draw_fns:
      self._draw_fns[key] = ensemble.make_ensemble_fn(self.model, self.image_size,
                                                      self.diffusion, sampling)
    masks = self._draw_fns[key](self.params, x, jax.random.PRNGKey(seed), 0)
    frequency = masks.mean(1, dtype=np.float32)
    return Samples(masks=masks, frequency=frequency, variance=frequency * (1 - frequency))


def load(workdir: str, step: str | int = 'latest', use_ema: bool = True) -> Model:
  """The model of checkpoint `step` ('latest', 'best' or a step number) in WORKDIR,
  EMA weights by default, rebuilt from the configuration stored with the checkpoint."""
  step, config = restore.read_config(workdir, step)
  if config is None:
    raise CheckpointMismatchError(
        f'Checkpoint {step} in {workdir} has no stored configuration (written by an older '
        'version); use --mode=sample with the config it was trained with')
  model = config_args.build_args(ModelArgs, 'model', config['model'])
  expected = unet_param_shapes(model, int(config['data']['image_size']),
                               int(config['data']['image_channels']))
  restored = restore.restore_unet(workdir, step, use_ema, expected)
  return Model(restored.params, restored.step, config)
