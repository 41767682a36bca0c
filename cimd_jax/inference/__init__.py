"""Inference: restore a trained UNet, turn it into a denoiser, draw ensembles.

  args       SamplingArgs (the `sampling` config group)
  restore    checkpoint -> UNet parameters + the stored configuration, checked
  ensemble   the denoiser and ensembles of N masks per image
  model      the Python API: `load(workdir)` -> Model; `Model.sample(images, ...)`
"""

from cimd_jax.inference.args import SamplingArgs

__all__ = ['SamplingArgs']
