"""--mode=sanity: does a trained model reproduce the experts' own disagreement on real
images? After training (apps/modes.py), draws N masks per image of the 'train' split
(images it has seen) and of the 'test' split, and scores each image's D_a, GED, CI and
HM-IoU against all its experts, beside two reference "models" drawn from the experts
themselves:

  one expert: the first expert's mask, N times (a model that fits one annotator and
    draws no disagreement);
  expert draws: N masks drawn uniformly from the image's own experts (what a model
    that reproduced the expert distribution exactly would draw, up to chance); draw k
    of case c in split s is expert int(sha256('expert_draws:<seed>:<s>:<c>:<k>'), 16)
    mod A (seed: sampling.seed), the same on every machine and NumPy.

Writes WORKDIR/report/sanity.md (per split: mean +- standard error over images, and
the model minus each reference paired per image; per image for 'train') and
sanity.json; the masks go to WORKDIR/eval/sanity-<split>/. A check on real masks,
not a benchmark.
"""

import dataclasses
import os
from typing import Any

from absl import logging
import numpy as np

from cimd_jax import settings as settings_lib
from cimd_jax.apps import sampling
from cimd_jax.data import splits
from cimd_jax.evaluation import reports

SPLITS = ('train', 'test')
REFERENCES = ('model', 'one_expert', 'expert_draws')
KEYS = ('da', 'ged', 'ci', 'hm_iou')


def one_expert(experts: np.ndarray, num_samples: int) -> np.ndarray:
  """The first expert's mask N times: bool [A, H, W] -> [N, H, W]."""
  return np.repeat(np.asarray(experts, bool)[:1], num_samples, 0)


def expert_draws(experts: np.ndarray, num_samples: int, seed: int, image: str
                 ) -> np.ndarray:
  """N masks drawn uniformly, with replacement, from the experts: [A, H, W] -> [N, H, W];
  draw k is expert int(splits.seeded_digest('expert_draws', seed, f'{image}:{k}'), 16)
  mod A (`image`: '<split>:<case id>')."""
  experts = np.asarray(experts, bool)
  picks = [int(splits.seeded_digest('expert_draws', seed, f'{image}:{k}'), 16) % len(experts)
           for k in range(num_samples)]
  return experts[picks]


def per_image(results: list[tuple[Any, np.ndarray]], seed: int, split: str
              ) -> dict[str, dict[str, np.ndarray]]:
  """reference -> metric -> float64 [B] (sampling.score) for the model's masks and the
  two expert references, with as many masks per image as the model drew."""
  n = len(results[0][1])
  preds = {
      'model': [m for _, m in results],
      'one_expert': [one_expert(c.experts, n) for c, _ in results],
      'expert_draws': [expert_draws(c.experts, n, seed, f'{split}:{c.case_id}')
                       for c, _ in results],
  }
  return {ref: sampling.score([(c, p) for (c, _), p in zip(results, masks)])
          for ref, masks in preds.items()}


def paired(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, dict]]:
  """reference -> metric -> model minus reference per image: reports.summarize's
  mean / sem / count, plus 'model_better', the images where the model scores better
  (lower GED, higher D_a, CI, HM-IoU)."""
  out = {}
  for ref in REFERENCES[1:]:
    out[ref] = {}
    for k in KEYS:
      diff = np.asarray(scores['model'][k], np.float64) - scores[ref][k]
      out[ref][k] = {**reports.summarize({k: diff})[k],
                     'model_better': int(np.sum(diff < 0 if k == 'ged' else diff > 0))}
  return out


def _mean_sem(x: np.ndarray) -> str:
  s = reports.summarize({'x': x})['x']
  return f'{s["mean"]:.3f} ± {s["sem"]:.3f}'


def markdown(splits: dict[str, tuple[list[str], dict[str, dict[str, np.ndarray]]]],
             num_samples: int, description: str) -> str:
  """Per split, mean +- SE of KEYS for each reference; then the 'train' images one
  by one (D_a and GED)."""
  lines = []
  for split, (case_ids, scores) in splits.items():
    lines += [f'Split {split!r}: {len(case_ids)} images, N = {num_samples} masks each '
              f'({description}); mean ± standard error over images.', '',
              '| | ' + ' | '.join(KEYS) + ' |', '|---|' + '---|' * len(KEYS)]
    for ref in REFERENCES:
      lines.append(f'| {ref} | ' + ' | '.join(_mean_sem(scores[ref][k]) for k in KEYS) + ' |')
    lines += ['', 'Model minus reference, paired per image (mean ± standard error; images '
              'where the model is better):', '',
              '| | ' + ' | '.join(KEYS) + ' |', '|---|' + '---|' * len(KEYS)]
    for ref, by_key in paired(scores).items():
      lines.append(f'| model − {ref} | ' + ' | '.join(
          f'{d["mean"]:+.3f} ± {d["sem"]:.3f} ({d["model_better"]}/{d["count"]})'
          for d in by_key.values()) + ' |')
    lines.append('')
  if 'train' in splits:
    case_ids, scores = splits['train']
    lines += ["Per training image (D_a ↑ / GED ↓):", '',
              '| case | model | one expert | expert draws |', '|---|---|---|---|']
    for i, cid in enumerate(case_ids):
      lines.append(f'| {cid} | ' + ' | '.join(
          f'{scores[r]["da"][i]:.3f} / {scores[r]["ged"][i]:.3f}' for r in REFERENCES) + ' |')
  return '\n'.join(lines)


def run(settings: settings_lib.Settings, workdir: str, overrides: set[str]
        ) -> dict[str, Any]:
  """Evaluates SPLITS with the trained model and writes the report; returns
  sanity.json's content."""
  reports.remove_report(workdir, 'sanity')
  splits, report, description = {}, {}, ''
  for split in SPLITS:
    logging.info('Sanity: N=%d masks per image of split %r',
                 settings.sampling.num_samples, split)
    s = dataclasses.replace(settings, sampling=dataclasses.replace(
        settings.sampling, split=split,
        output_dir=os.path.join(workdir, 'eval', f'sanity-{split}')))
    results, result, _ = sampling.evaluate_cases(s, workdir, overrides)
    scores = per_image(results, settings.sampling.seed, split)
    case_ids = [c.case_id for c, _ in results]
    splits[split] = (case_ids, scores)
    description = (f'step {result["checkpoint_step"]}, '
                   f'{reports.sampler_text(result["sampler"], result["steps"])}')
    report[split] = {'case_ids': case_ids,
                     **{ref: {k: v.tolist() for k, v in sc.items()} for ref, sc in scores.items()},
                     'summary': {ref: reports.summarize(sc) for ref, sc in scores.items()},
                     'paired': paired(scores)}
  table = markdown(splits, settings.sampling.num_samples, description)
  path = reports.write_report(workdir, 'sanity', table, report)
  print(table, flush=True)
  logging.info('Wrote %s', path)
  return report
