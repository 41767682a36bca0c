"""cimd_jax: CIMD (Rahman et al., CVPR 2023) for ambiguous medical image segmentation in JAX."""

__version__ = '0.1.0'
