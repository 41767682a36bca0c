"""Helpers below every other layer: process set-up, errors, config-argument checks,
figures, workdir locks and atomic output folders."""
