"""Evaluation: exact metrics, calibration against known truth, report files.

  metrics      CI score, GED, HM-IoU, Dice/IoU, uncertainty maps (vectorised, exact)
  calibration  sampled vs expert frequency of each ambiguous structure (+ plot)
  reports      what sample/evaluate write: case folders, manifest, CSV, JSON
"""
