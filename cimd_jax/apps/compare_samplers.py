"""Sampler choice by evidence: the same checkpoint and test images scored with several
samplers (ancestral DDPM over all T steps, respaced DDPM, DDIM), with wall time, as a
markdown table. The recommended default is the fastest sampler whose CI is within
`tolerance` of the full-T ancestral result."""

import dataclasses
import os
import time
from typing import Any

from cimd_jax import settings as settings_lib
from cimd_jax.apps import sampling
from cimd_jax.inference import restore

DEFAULT_CANDIDATES = (('ddpm', ''), ('ddpm', '100'), ('ddpm', '50'), ('ddim', 'ddim50'),
                      ('ddim', 'ddim25'))


def compare(settings: settings_lib.Settings, workdir: str, overrides: set[str],
            candidates: tuple[tuple[str, str], ...] = DEFAULT_CANDIDATES,
            tolerance: float = 0.02) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Evaluates each (sampler, steps) on sampling.split; returns (rows, recommendation).
  Each sampler's masks go to WORKDIR/samplers/<name>/. Row names and step counts
  use the checkpoint's diffusion settings (its T), not the config file's."""
  step, stored = restore.read_config(workdir, settings.sampling.checkpoint)
  settings = settings_lib.reconcile(settings, stored, overrides,
                                    f'the checkpoint of step {step} in {workdir}')
  rows = []
  for kind, steps in candidates:
    sampler = dataclasses.replace(settings.sampling, sampler=kind, steps=steps)
    name = sampler.short_name(settings.diffusion.num_timesteps)
    run = dataclasses.replace(settings, sampling=dataclasses.replace(
        sampler, output_dir=os.path.join(workdir, 'samplers', name)))
    t = time.perf_counter()
    _, result, _ = sampling.evaluate_cases(run, workdir, overrides)
    seconds = time.perf_counter() - t
    num_steps = run.sampling.tables(run.diffusion.betas()).num_timesteps
    rows.append({'name': name, 'sampler': kind, 'steps': num_steps,
                 'seconds': seconds, 'num_images': result['num_images'],
                 'num_samples': result['num_samples'],
                 **{k: result['metrics'][k]['mean'] for k in sampling.SCORE_KEYS}})
  return rows, recommend(rows, tolerance)


def recommend(rows: list[dict[str, Any]], tolerance: float = 0.02) -> dict[str, Any]:
  """The fewest-step row whose CI is within `tolerance` of rows[0] (the reference)."""
  reference = rows[0]
  good = [r for r in rows if r['ci'] >= reference['ci'] - tolerance]
  best = min(good, key=lambda r: (int(r['steps']), r['seconds']))
  return {'reference': reference['name'], 'recommended': best['name'],
          'tolerance': tolerance}


def markdown_table(rows: list[dict[str, Any]], recommendation: dict[str, Any]) -> str:
  """The comparison as a markdown table plus the recommendation line."""
  head = ('| sampler | steps | CI | S_c | D_max | D_a | GED | HM-IoU | wall s |\n'
          '|---|---|---|---|---|---|---|---|---|')
  lines = [head]
  for r in rows:
    lines.append(f'| {r["name"]} | {r["steps"]} | {r["ci"]:.4f} | {r["sc"]:.4f} | '
                 f'{r["dmax"]:.4f} | {r["da"]:.4f} | {r["ged"]:.4f} | {r["hm_iou"]:.4f} | '
                 f'{r["seconds"]:.0f} |')
  n = rows[0]['num_samples']
  lines.append('')
  lines.append(f'{rows[0]["num_images"]} test images, N = {n} samples per image. '
               f'Recommended: **{recommendation["recommended"]}** — the fewest steps whose '
               f'CI is within {recommendation["tolerance"]} of {recommendation["reference"]}.')
  return '\n'.join(lines)
