"""Published LIDC-IDRI figures printed beside this project's own in --mode=reproduce.

Each row is one method at one N as a paper reports it, with its source (paper, arXiv
id, table). The rows to transcribe are the LIDC tables of
  * CIMD: Rahman et al., CVPR 2023, arXiv:2304.04745 (GED, CI, S_c, D_max, D_a);
  * CCDM: Zbinden et al., ICCV 2023, arXiv:2303.08888 (GED and HM-IoU at N = 16, 32,
    100, with the Probabilistic U-Net and PHiSeg rows it lists);
  * Probabilistic U-Net: Kohl et al., NeurIPS 2018, arXiv:1806.05034.

`LIDC` is empty: no copy of these tables could be read where this code was written
(no network; the stored copies of the papers gave only their opening pages), and a
number that was not read from its table must not stand here. Add rows as
Row('CCDM', 16, {'ged': ..., 'hm_iou': ...}, 'Zbinden et al. 2023, Table N, LIDC v1')
with the metric keys of cimd_jax.apps.reproduce.COLUMNS; a metric a paper does not
report is left out and shown as '—'. 'ged' is the squared form D²_GED with
d = 1 − IoU, d = 0 for two empty masks (docs/metrics.md), the form the Probabilistic
U-Net paper names D²_GED; check which form each table uses: a plain D_GED (its
square root) or another empty-mask convention must be converted or left out.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Row:
  """One published result: method, N samples per image (0: not stated), metric ->
  value, source (paper, table, data version)."""
  method: str
  num_samples: int
  values: dict[str, float]
  source: str


LIDC: tuple[Row, ...] = ()
