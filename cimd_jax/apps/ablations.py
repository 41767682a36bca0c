"""--mode=ablations: ambiguity mode x prediction x sampler on one config's data, as a
measured table (docs/ablations.md is this table for configs/synthetic.py).

Per ambiguity mode (models.build.AMBIGUITY_MODES) and prediction ('eps', 'x0') a model
is trained in WORKDIR/<mode>-<prediction>/ (resumed when present), the config otherwise
unchanged, and evaluated with every sampler of SAMPLERS on `sampling.split` (its first
`sampling.max_images` images, N = `sampling.num_samples`, `sampling.seed` fixed) into
WORKDIR/<mode>-<prediction>/eval/<sampler>/. A finished evaluation is reused when made
with the requested sampling (REUSE_KEYS) of the checkpoint now there by the current
scorer (reports.METRICS_FORMAT), so an interrupted run continues where it stopped; a
finished training asked for other training settings is refused. The full-T DDPM row
is named by the model's T. The table (WORKDIR/ablations.md, written whole at the end,
an earlier one removed at the start; printed too): calibration MAE on the ambiguous
structures, the largest sampled frequency of a structure no expert draws, the
all-foreground fraction, GED, CI, D_a, HM-IoU (mean +- standard error) and the
commands of each row. `runs` and `samplers` (--ablation_runs / --ablation_samplers)
restrict it to some models ('off-x0') and samplers ('ddim25'), in the table's order.
"""

import dataclasses
import json
import os
from typing import Any, Callable

from absl import logging
import numpy as np

from cimd_jax import checkpoint
from cimd_jax import settings as settings_lib
from cimd_jax.apps import sampling
from cimd_jax.evaluation import reports
from cimd_jax.models.build import AMBIGUITY_MODES
from cimd_jax.utils import atomic
from cimd_jax.utils.errors import ConfigError

PREDICTIONS = ('eps', 'x0')
# (name, sampler, steps)
SAMPLERS = (('ddpm1000', 'ddpm', ''), ('ddpm50', 'ddpm', '50'), ('ddim25', 'ddim', 'ddim25'))
COLUMNS = ('calibration', 'never_drawn', 'all_foreground', 'ged', 'ci', 'da', 'hm_iou')
PAIRED = ('ged', 'ci')    # per-image metrics compared image by image against 'off'


def run_name(ambiguity: str, prediction: str) -> str:
  return f'{ambiguity}-{prediction}'


RUN_NAMES = tuple(run_name(a, p) for a in AMBIGUITY_MODES for p in PREDICTIONS)
SAMPLER_NAMES = tuple(name for name, _, _ in SAMPLERS)


def check_selection(runs: tuple[str, ...], samplers: tuple[str, ...]) -> None:
  """Raises ConfigError naming the first unknown run or sampler name."""
  for flag, given, known in (('--ablation_runs', runs, RUN_NAMES),
                             ('--ablation_samplers', samplers, SAMPLER_NAMES)):
    for name in given:
      if name not in known:
        raise ConfigError(f'{flag}: unknown name {name!r}; expected some of '
                          f'{",".join(known)}')


def variant(settings: settings_lib.Settings, ambiguity: str, prediction: str
            ) -> settings_lib.Settings:
  """The settings of one trained model of the table."""
  return dataclasses.replace(
      settings,
      model=dataclasses.replace(settings.model, ambiguity=ambiguity),
      diffusion=dataclasses.replace(settings.diffusion, prediction=prediction))


def with_sampler(settings: settings_lib.Settings, sampler: str, steps: str, out_dir: str
                 ) -> settings_lib.Settings:
  return dataclasses.replace(settings, sampling=dataclasses.replace(
      settings.sampling, sampler=sampler, steps=steps, output_dir=out_dir))


# Sampling keys an earlier evaluation must share with the requested one to be reused.
REUSE_KEYS = ('sampler', 'steps', 'ddim_eta', 'clip_variance', 'variance_transfer',
              'num_samples', 'seed', 'split', 'max_images', 'use_ema')


def _done(out_dir: str, requested: settings_lib.Settings, step: int
          ) -> dict[str, Any] | None:
  """The metrics of a finished evaluation in `out_dir` made with the requested
  sampling (REUSE_KEYS) of checkpoint `step` (the one sampling.checkpoint names now);
  None (evaluate again) otherwise, with the differences logged."""
  try:
    with open(os.path.join(out_dir, 'manifest.json')) as f:
      manifest = json.load(f)
    with open(os.path.join(out_dir, 'metrics.json')) as f:
      result = json.load(f)
  except (OSError, ValueError):
    return None
  if not manifest.get('complete'):
    return None
  done = (manifest.get('config') or {}).get('sampling') or {}
  want = settings_lib.to_dict(requested)['sampling']
  differs = [k for k in REUSE_KEYS if done.get(k) != want[k]]
  if manifest.get('checkpoint_step') != step:
    differs.append(f'checkpoint step ({manifest.get("checkpoint_step")} vs {step})')
  if result.get('format') != reports.METRICS_FORMAT:
    differs.append('the scorer (an older metrics.json format)')
  if differs:
    logging.info('Ablations: %s is evaluated again (%s differ from the request)', out_dir,
                 ', '.join(differs))
    return None
  return result


def row(result: dict[str, Any]) -> dict[str, tuple[float, float]]:
  """(mean, standard error) of each column from an evaluation's metrics.json (a null
  there, e.g. the standard error of one image, as NaN)."""
  m, cal = result['metrics'], result.get('calibration', {})
  out = {k: (m[k]['mean'], m[k]['sem']) for k in ('ged', 'ci', 'da', 'hm_iou')}
  out['calibration'] = (cal.get('mae_ambiguous', float('nan')),
                        cal.get('mae_ambiguous_sem', float('nan')))
  out['never_drawn'] = (cal.get('max_freq_never_drawn', float('nan')), float('nan'))
  fg = m.get('all_foreground', {})     # absent from evaluations written before it existed
  out['all_foreground'] = (fg.get('mean', float('nan')), fg.get('sem', float('nan')))
  return {k: tuple(float('nan') if v is None else v for v in pair) for k, pair in out.items()}


def commands(config_file: str, workdir: str, ambiguity: str, prediction: str, sampler: str,
             steps: str, extra: str) -> str:
  run_dir = os.path.join(workdir, run_name(ambiguity, prediction))
  keys = (f'--config.model.ambiguity={ambiguity} '
          f'--config.diffusion.prediction={prediction}{extra}')
  base = f'python -m cimd_jax.main --config={config_file} --workdir={run_dir} {keys}'
  return (f'`{base} --mode=train` then `{base} --mode=evaluate '
          f"--config.sampling.sampler={sampler} --config.sampling.steps='{steps}'`")


def run(settings: settings_lib.Settings, workdir: str,
        train_fn: Callable[[settings_lib.Settings, str], Any],
        config_file: str = 'configs/synthetic.py', extra_flags: str = '',
        runs: tuple[str, ...] = (), samplers: tuple[str, ...] = ()) -> str | None:
  """Trains and evaluates every row (reusing finished work), or those of the `runs`
  and `samplers` named (all when empty); writes and returns the markdown table
  WORKDIR/ablations.md. `train_fn(settings, run_dir)` trains; when it returns False
  (a stop request ended the training early) nothing more is trained or evaluated,
  no table is written, and None is returned: the same command resumes."""
  check_selection(runs, samplers)
  if os.path.exists(table_path := os.path.join(workdir, 'ablations.md')):
    os.remove(table_path)   # an earlier run's table must not pass for this one's
  rows = []
  for ambiguity in AMBIGUITY_MODES:
    for prediction in PREDICTIONS:
      if runs and run_name(ambiguity, prediction) not in runs:
        continue
      s = variant(settings, ambiguity, prediction)
      run_dir = os.path.join(workdir, run_name(ambiguity, prediction))
      logging.info('Ablations: training %s', run_dir)
      if train_fn(s, run_dir) is False:
        logging.warning('Ablations: stopped while training %s; nothing evaluated, no table '
                        'written (run the same command to resume)', run_dir)
        return None
      step = checkpoint.resolve_step(run_dir, s.sampling.checkpoint)
      for name, kind, steps in SAMPLERS:
        if samplers and name not in samplers:
          continue
        out_dir = os.path.join(run_dir, 'eval', name)
        requested = with_sampler(s, kind, steps, out_dir)
        result = _done(out_dir, requested, step)
        if result is None:
          logging.info('Ablations: evaluating %s with %s', run_dir, name)
          result = sampling.evaluate_cases(requested, run_dir, set())[1]
        shown = f'ddpm{result["steps"]}' if kind == 'ddpm' and not steps else name  # T
        rows.append({'ambiguity': ambiguity, 'prediction': prediction, 'sampler': shown,
                     'values': row(result), 'num_images': result['num_images'],
                     'num_samples': result['num_samples'], 'out_dir': out_dir,
                     'command': commands(config_file, workdir, ambiguity, prediction, kind,
                                         steps, extra_flags)})
  table = markdown(rows)
  atomic.write_text(table_path, table + '\n')
  print(table, flush=True)
  return table


def _per_image(out_dir: str) -> tuple[list[str], dict[str, np.ndarray]] | None:
  """(case ids, PAIRED metric -> float64 [B]) from an evaluation's per_image.csv."""
  path = os.path.join(out_dir, 'per_image.csv')
  try:
    return reports.read_per_image_csv(path, PAIRED)
  except OSError:
    return None
  except (KeyError, ValueError, TypeError) as e:   # a column missing, a value not a number
    logging.warning('Ablations: %s is malformed (%r); its row gets no paired line', path, e)
    return None


def paired_against(rows: list[dict[str, Any]], reference: str,
                   skip: tuple[str, ...] = ()) -> list[str]:
  """One line per row that has a `reference`-mode row of the same prediction and
  sampler: mean +- standard error over images of the per-image difference
  (row - reference) of each PAIRED metric (the same images and seed, so the
  image-to-image spread cancels). Rows whose mode is in `skip` get no line."""
  refs = {(r['prediction'], r['sampler']): r for r in rows if r['ambiguity'] == reference}
  lines = []
  for r in rows:
    ref = refs.get((r['prediction'], r['sampler']))
    if r['ambiguity'] in (reference,) + skip or ref is None:
      continue
    mine, base = _per_image(r.get('out_dir', '')), _per_image(ref.get('out_dir', ''))
    if mine is None or base is None:
      continue
    if mine[0] != base[0] or r.get('num_samples') != ref.get('num_samples'):
      logging.warning('Ablations: %s and %s hold other images or N; no paired line',
                      r.get('out_dir'), ref.get('out_dir'))
      continue
    stats = reports.summarize({k: mine[1][k] - base[1][k] for k in PAIRED})
    lines.append(f'- {r["ambiguity"]} − {reference} ({r["prediction"]}, {r["sampler"]}), '
                 f'{len(mine[0])} images: ' + ', '.join(
                     f'Δ{k.upper()} = {stats[k]["mean"]:+.3f} ± {stats[k]["sem"]:.3f}'
                     for k in PAIRED))
  return lines


def paired_against_off(rows: list[dict[str, Any]]) -> list[str]:
  """paired_against(rows, 'off'): what the issue's 'changes the samples' test reads."""
  return paired_against(rows, 'off')


def _cell(mean: float, sem: float) -> str:
  return '—' if mean != mean else f'{mean:.3f}' + ('' if sem != sem else f' ± {sem:.3f}')


def markdown(rows: list[dict[str, Any]]) -> str:
  """The rows as a markdown table, then the command of each row."""
  head = ('| # | ambiguity | prediction | sampler | calibration MAE ↓ | max freq. never drawn ↓ '
          '| all-foreground samples ↓ | GED ↓ | CI ↑ | D_a ↑ | HM-IoU ↑ |\n'
          '|---|---|---|---|---|---|---|---|---|---|---|')
  lines = [head]
  for i, r in enumerate(rows, 1):
    v = r['values']
    lines.append(f'| {i} | {r["ambiguity"]} | {r["prediction"]} | {r["sampler"]} | '
                 + ' | '.join(_cell(*v[c]) for c in COLUMNS) + ' |')
  n = {(r['num_images'], r['num_samples']) for r in rows}
  lines += ['', 'Images and samples per image: ' + ', '.join(f'{i} images, N = {s}'
                                                           for i, s in sorted(n)) + '.']
  paired = paired_against_off(rows)
  if paired:
    lines += ['', 'Paired differences against `off` (per image, same images and seed; '
              'mean ± standard error):', ''] + paired
  # Against `trained` (the paper's mode) too; 'off' rows are the lines above, negated.
  paired = paired_against(rows, 'trained', skip=('off',))
  if paired:
    lines += ['', 'Paired differences against `trained` (per image, same images and '
              'seed; mean ± standard error):', ''] + paired
  lines += [''] + [f'{i}. {r["command"]}' for i, r in enumerate(rows, 1)]
  return '\n'.join(lines)
