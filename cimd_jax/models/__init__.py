"""CIMD's networks: the guided-diffusion UNet and the AMN/ACN latent Gaussians.

`build` is the one place that constructs them and inits their parameters.
"""

from cimd_jax.models.build import (LatentArgs, Networks, UNetArgs, build_latent_net,
                                   build_networks, build_unet, count_params, init_params)
from cimd_jax.models.latent import AxisAlignedConvGaussian, kl_diag_gaussians
from cimd_jax.models.unet import UNet

__all__ = [
    'AxisAlignedConvGaussian', 'LatentArgs', 'Networks', 'UNet', 'UNetArgs',
    'build_latent_net', 'build_networks', 'build_unet', 'count_params', 'init_params',
    'kl_diag_gaussians',
]
