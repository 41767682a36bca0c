"""The README's main job: synthetic data -> train -> evaluate (N samples per image) ->
calibration and baselines -> a short report in WORKDIR/report/.

The report compares the trained model with two baselines on the same test images:
  * deterministic: the per-pixel majority of the model's own ensemble, repeated N
    times (what a plain segmenter would give: one mask, no spread);
  * expert oracle: N fresh expert draws from the synthetic generator (the best any
    model could do).
"""

import os
import shutil
import time
from typing import Any, Callable

from absl import logging
import numpy as np
from PIL import Image

from cimd_jax.apps import sampling
from cimd_jax.evaluation import calibration
from cimd_jax.evaluation import metrics
from cimd_jax.evaluation import reports

REPORT_KEYS = ('ci', 'sc', 'dmax', 'da', 'ged', 'hm_iou')
NUM_OVERVIEWS = 4


def deterministic_baseline(masks: np.ndarray) -> np.ndarray:
  """The ensemble's per-pixel majority repeated N times: bool [N, H, W] -> [N, H, W]."""
  majority = np.asarray(masks, bool).mean(0) >= 0.5
  return np.repeat(majority[None], len(masks), 0)


def _score(gts: list[np.ndarray], preds: list[np.ndarray]) -> dict[str, dict[str, float]]:
  per_image = metrics.evaluate(np.stack(gts), np.stack(preds))
  return reports.summarize({k: np.asarray(per_image[k]) for k in sampling.SCORE_KEYS})


def calibration_summary(cases_masks: list[tuple[Any, np.ndarray]]
                        ) -> tuple[dict, np.ndarray, np.ndarray]:
  """(calibration.summarize dict, truth [S], sampled [S]) over every structure of every
  (case, masks) pair; empty when the cases carry no structure truth (real data)."""
  if not cases_masks or any('structures' not in (c.extras or {}) for c, _ in cases_masks):
    return {}, np.array([]), np.array([])
  return calibration.over_cases([(c.extras['structures'], c.extras['structure_probs'], m)
                                 for c, m in cases_masks])


def oracle_draws(data_args: Any, split: str, num_cases: int, num_samples: int,
                 seed: int) -> list[np.ndarray] | None:
  """Fresh expert masks from the synthetic generator, bool [N, H, W] per case (None
  for datasets without a generator)."""
  if data_args.name != 'synthetic':
    return None
  from cimd_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return [np.asarray(synthetic.oracle_masks(data_args, split, i, num_samples, seed)) > 0
          for i in range(num_cases)]


def build_report(results: list[tuple[Any, np.ndarray]], model_metrics: dict[str, Any],
                 data_args: Any, split: str, num_samples: int, seed: int
                 ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """The report dict (model, baselines, calibration) and (truth, sampled) frequencies."""
  gts = [c.experts for c, _ in results]
  report: dict[str, Any] = {'num_samples': num_samples, 'num_images': len(results),
                            'model': model_metrics['metrics']}
  report['deterministic'] = _score(gts, [deterministic_baseline(m) for _, m in results])
  oracle = oracle_draws(data_args, split, len(results), num_samples, seed + 1)
  if oracle is not None:
    report['oracle'] = _score(gts, oracle)
  cal, truth, sampled = calibration_summary(results)
  if cal:
    report['calibration'] = {'model': cal}
    _, _, det = calibration_summary([(c, deterministic_baseline(m)) for c, m in results])
    report['calibration']['deterministic'] = calibration.summarize(truth, det, num_samples)
    if oracle is not None:
      _, _, orc = calibration_summary([(c, o) for (c, _), o in zip(results, oracle)])
      report['calibration']['oracle'] = calibration.summarize(truth, orc, num_samples)
  return report, truth, sampled


def format_report(report: dict[str, Any], workdir: str, timings: dict[str, float]) -> str:
  """The console report: metrics of model and baselines with N, calibration, paths."""
  n = report['num_samples']
  cols = [c for c in ('model', 'deterministic', 'oracle') if c in report]
  lines = ['', '=' * 72,
           f'CIMD demo report — {report["num_images"]} test images, N = {n} samples each',
           '=' * 72,
           f'{"metric":<10}' + ''.join(f'{c:>18}' for c in cols)]
  for k in REPORT_KEYS:
    row = f'{k:<10}'
    for c in cols:
      m = report[c][k]
      row += f'{m["mean"]:>11.4f} ± {m["std"]:<5.3f}'
    lines.append(row)
  lines.append('(ged: lower is better; all others: higher is better)')
  cal = report.get('calibration')
  if cal:
    lines.append('')
    lines.append('Calibration on ambiguous structures (MAE: |sampled - expert freq|; '
                 'dispersion: 1 for N independent draws at the experts\' freq):')
    for c in cols:
      if c in cal:
        lines.append(f'  {c:<14} MAE {cal[c]["mae_ambiguous"]:.3f} over '
                     f'{cal[c]["num_ambiguous"]} structures (dispersion '
                     f'{cal[c]["dispersion"]:.2f}); max freq on never-drawn '
                     f'structures {cal[c]["max_freq_never_drawn"]:.3f} '
                     f'({cal[c]["num_never_drawn"]})')
  lines.append('')
  lines.append('Time: ' + ', '.join(f'{k} {v / 60:.1f} min' for k, v in timings.items()))
  report_dir = os.path.join(workdir, 'report')
  lines += ['', f'Report:      {report_dir}/ (metrics.json, calibration.png, overview_*.png)',
            f'Samples:     {os.path.join(workdir, "eval")}/',
            f'TensorBoard: tensorboard --logdir {workdir}', '']
  return '\n'.join(lines)


def run_demo(train_fn: Callable[[], Any],
             evaluate_fn: Callable[..., tuple[list, dict[str, Any], str]],
             data_args: Any, split: str, num_samples: int, seed: int, workdir: str
             ) -> dict[str, Any]:
  """Trains (`train_fn()`; False means it was stopped before the end, and then
  nothing more is done and {} is returned), evaluates (`evaluate_fn(on_results=...)`,
  see sampling.evaluate_cases) and writes WORKDIR/report/; returns the report dict."""
  timings = {}
  t0 = time.perf_counter()
  logging.info('Demo step 1/3: training (resumes if %s has checkpoints)', workdir)
  if train_fn() is False:
    return {}
  timings['train'] = time.perf_counter() - t0
  t1 = time.perf_counter()
  logging.info('Demo step 2/3: sampling N=%d masks per test image', num_samples)
  results, model_metrics, eval_dir = evaluate_fn()
  timings['evaluate'] = time.perf_counter() - t1
  logging.info('Demo step 3/3: baselines, calibration and report')
  report, truth, sampled = build_report(results, model_metrics, data_args, split,
                                        num_samples, seed)
  report.update({k: model_metrics[k] for k in ('checkpoint_step', 'sampler', 'steps')})
  timings['total'] = time.perf_counter() - t0
  report['timings_s'] = timings
  report_dir = os.path.join(workdir, 'report')
  os.makedirs(report_dir, exist_ok=True)
  reports.write_json(os.path.join(report_dir, 'metrics.json'), report)
  if len(truth):
    Image.fromarray(calibration.calibration_plot(truth, sampled, num_samples=num_samples)
                    ).save(os.path.join(report_dir, 'calibration.png'))
  folders = reports.case_folder_names([c.case_id for c, _ in results])
  for folder in folders[:NUM_OVERVIEWS]:
    src = os.path.join(eval_dir, folder, 'overview.png')
    if os.path.exists(src):
      shutil.copy(src, os.path.join(report_dir, f'overview_{folder}.png'))
  print(format_report(report, workdir, timings), flush=True)
  return report
