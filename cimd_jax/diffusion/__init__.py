"""The pure-functional Gaussian diffusion core.

  args       DiffusionArgs (the `diffusion` config group)
  schedule   beta schedules, `DiffusionTables`, timestep respacing
  gaussian   q_sample, posteriors, p_mean_variance, KL / likelihood terms, vlb_terms
  samplers   lax.scan DDPM / respaced DDPM / DDIM and chunked ensembles
"""

from cimd_jax.diffusion.args import DiffusionArgs

__all__ = ['DiffusionArgs']
