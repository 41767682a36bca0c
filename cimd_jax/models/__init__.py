"""CIMD's networks: the guided-diffusion UNet and the AMN/ACN latent Gaussians.

`build` is the one place that constructs them (from `ModelArgs`, the `model` config
group) and inits their parameters.
"""

from cimd_jax.models.build import (AMBIGUITY_MODES, ModelArgs, Networks, build_latent_net,
                                   build_networks, build_unet, count_params, init_params)
from cimd_jax.models.latent import AxisAlignedConvGaussian, kl_diag_gaussians
from cimd_jax.models.unet import UNet

__all__ = [
    'AMBIGUITY_MODES', 'AxisAlignedConvGaussian', 'ModelArgs', 'Networks', 'UNet',
    'build_latent_net', 'build_networks', 'build_unet', 'count_params', 'init_params',
    'kl_diag_gaussians',
]
