"""--mode=reproduce: the paper-style LIDC table. After training (apps/modes.py), draws
N = max(SAMPLE_COUNTS) masks per image of `sampling.split` once, scores the first 16,
32 and 100 of them (i.i.d. draws, so the first n are an n-sample ensemble), and
writes WORKDIR/report/reproduce.md and reproduce.json: GED, HM-IoU and CI (with S_c,
D_max, D_a), each mean +- standard error over the images, with N on every row, and
the published figures of cimd_jax/apps/published.py beside them.

The masks are in WORKDIR/eval/<split>-n100/ (evaluation.reports layout); its
metrics.json scores all 100.
"""

import dataclasses
import os
from typing import Any

from absl import logging
import numpy as np

from cimd_jax import settings as settings_lib
from cimd_jax.apps import published
from cimd_jax.apps import sampling
from cimd_jax.evaluation import reports

SAMPLE_COUNTS = (16, 32, 100)
COLUMNS = (('ged', 'GED ↓'), ('hm_iou', 'HM-IoU ↑'), ('ci', 'CI ↑'), ('sc', 'S_c ↑'),
           ('dmax', 'D_max ↑'), ('da', 'D_a ↑'))


def score_subsets(results: list[tuple[Any, np.ndarray]], counts: tuple[int, ...]
                  ) -> dict[int, dict[str, dict[str, float]]]:
  """n -> reports.summarize of the per-image metrics of the first n masks of every
  case. results: [(case with experts bool [A, H, W], masks bool [N, H, W])], N >= n."""
  out = {}
  for n in counts:
    if any(len(m) < n for _, m in results):
      raise ValueError(f'need {n} masks per case, got {min(len(m) for _, m in results)}')
    out[n] = reports.summarize(sampling.score([(c, m[:n]) for c, m in results]))
  return out


def _cell(stats: dict[str, float] | float | None) -> str:
  if stats is None:
    return '—'
  if isinstance(stats, dict):
    return f'{stats["mean"]:.3f} ± {stats["sem"]:.3f}'
  return f'{stats:.3f}'


def markdown(scores: dict[int, dict[str, dict[str, float]]], num_images: int, split: str,
             description: str, rows: tuple[published.Row, ...] | None = None) -> str:
  """The table: this run at each N, then the published rows (`rows`, default
  published.LIDC as it is at the call; or a line saying none are transcribed)."""
  rows = published.LIDC if rows is None else rows
  head = '| method | N | ' + ' | '.join(name for _, name in COLUMNS) + ' | source |'
  lines = [head, '|' + '---|' * (len(COLUMNS) + 3)]
  for n, stats in sorted(scores.items()):
    lines.append(f'| cimd_jax (this run) | {n} | '
                 + ' | '.join(_cell(stats[k]) for k, _ in COLUMNS)
                 + f' | {description} |')
  for r in rows:
    unknown = sorted(set(r.values) - {k for k, _ in COLUMNS})
    if unknown or r.num_samples not in SAMPLE_COUNTS + (0,):
      raise ValueError(f'published row {r.method!r} ({r.source}): metric keys {unknown} '
                       f'not among {[k for k, _ in COLUMNS]}, or N={r.num_samples} not '
                       f'one of {SAMPLE_COUNTS} (0: not stated)')
    lines.append(f'| {r.method} | {r.num_samples or "?"} | '
                 + ' | '.join(_cell(r.values.get(k)) for k, _ in COLUMNS)
                 + f' | {r.source} |')
  lines += ['', f'This run: {num_images} images of split {split!r}; mean ± standard error '
            'over images; the first N of the same 100 draws per image.']
  if not rows:
    lines.append('Published figures: none transcribed yet (cimd_jax/apps/published.py '
                 'says why and where they go).')
  return '\n'.join(lines)


def run(settings: settings_lib.Settings, workdir: str, overrides: set[str]
        ) -> dict[str, Any]:
  """Evaluates the trained model with N = max(SAMPLE_COUNTS) and writes the table;
  returns the reproduce.json content."""
  reports.remove_report(workdir, 'reproduce')
  n_max = max(SAMPLE_COUNTS)
  split = settings.sampling.split
  run_settings = dataclasses.replace(settings, sampling=dataclasses.replace(
      settings.sampling, num_samples=n_max,
      output_dir=os.path.join(workdir, 'eval', f'{split}-n{n_max}')))
  logging.info('Reproduce 1/2: %d masks per image of split %r', n_max, split)
  results, result, out_dir = sampling.evaluate_cases(run_settings, workdir, overrides)
  logging.info('Reproduce 2/2: scoring the first %s masks', SAMPLE_COUNTS)
  scores = score_subsets(results, SAMPLE_COUNTS)
  description = (f'step {result["checkpoint_step"]}, '
                 f'{reports.sampler_text(result["sampler"], result["steps"])}, '
                 f'{result["prediction"]} prediction')
  table = markdown(scores, len(results), split, description)
  report = {'split': split, 'num_images': len(results), 'masks': out_dir,
            **{k: result[k] for k in ('checkpoint_step', 'sampler', 'steps', 'prediction',
                                      'seed', 'use_ema')},
            'scores': {str(n): s for n, s in scores.items()},
            'published': [dataclasses.asdict(r) for r in published.LIDC]}
  path = reports.write_report(workdir, 'reproduce', table, report)
  print(table, flush=True)
  logging.info('Wrote %s', path)
  return report
