"""Datasets: TFDS builders (CIMD folder layout, LIDC pickles, PHiSeg HDF5, NIfTI volumes,
built-in synthetic) and grain pipelines.

Importing this package is cheap: TFDS and grain load with `cimd_jax.data.pipeline`.
"""

from cimd_jax.data.args import DataArgs

__all__ = ['DataArgs']
