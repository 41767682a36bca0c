"""What sample and evaluate write, as files people can open.

Per case (folder named by `case_folder_names`):
  sample_00.png ... sample_{N-1}.png  uint8 0/255 masks at the image's size
  mean.png   per-pixel foreground frequency over the N samples, 0..1 -> 0..255
  std.png    per-pixel standard deviation of the N binary samples, 0..0.5 -> 0..255
  overview.png  image | experts (when known) | samples | frequency and std maps
Per run: manifest.json (checkpoint step, sampler, N, seed, config, case id -> folder,
`complete: true` once everything is written); evaluate adds per_image.csv (one row
per case: case_id, folder, metrics) and metrics.json (mean, std, standard error and
count per metric, plus the run's description).
"""

import csv
import hashlib
import json
import os
from typing import Any

import numpy as np
from PIL import Image

from cimd_jax.evaluation import calibration
from cimd_jax.evaluation import metrics
from cimd_jax.utils import atomic
from cimd_jax.utils import figures

_SAFE = set('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.')


def case_folder_names(case_ids: list[str]) -> list[str]:
  """A distinct, file-system-safe folder name for every case id, in order.

  A case id made only of letters, digits, '-', '_' and '.' (and not starting with
  '.') is its own folder name. Any other id (spaces, '?', '/', ...) is made safe by
  replacing those characters with '_' and appending '-' and 8 hex digits of its
  SHA-1, so 'a b', 'a?b' and 'a_b' get three folders. Repeated ids get '-2', '-3',
  and so do ids that differ only in case ('Case1', 'case1'): on a case-insensitive
  file system (macOS, Windows) they would share one folder.
  """
  names, seen = [], set()
  for cid in case_ids:
    cid = str(cid)
    safe = bool(cid) and not cid.startswith('.') and all(c in _SAFE for c in cid)
    if safe:
      name = cid
    else:
      base = ''.join(c if c in _SAFE else '_' for c in cid).lstrip('.') or 'case'
      name = f'{base[:80]}-{hashlib.sha1(cid.encode()).hexdigest()[:8]}'
    candidate, k = name, 1
    while candidate.lower() in seen:
      k += 1
      candidate = f'{name}-{k}'
    seen.add(candidate.lower())
    names.append(candidate)
  return names


def write_case(case_dir: str, image: np.ndarray, masks: np.ndarray,
               experts: np.ndarray | None = None, title: str = '') -> None:
  """Writes one case's files into `case_dir` (created).

  Args:
    image: float [H, W, C] in [-1, 1].
    masks: bool [N, H, W] sampled masks.
    experts: bool [A, H, W] expert masks, or None.
  """
  os.makedirs(case_dir, exist_ok=True)
  masks = np.asarray(masks, bool)
  for i, m in enumerate(masks):
    Image.fromarray(figures.mask_to_uint8(m)).save(os.path.join(case_dir, f'sample_{i:02d}.png'))
  freq = masks.mean(0)
  Image.fromarray(np.round(freq * 255).astype(np.uint8)).save(os.path.join(case_dir, 'mean.png'))
  Image.fromarray(np.round(np.clip(masks.std(0) * 510, 0, 255)).astype(np.uint8)).save(
      os.path.join(case_dir, 'std.png'))
  Image.fromarray(figures.overview(image, masks, experts, title=title)).save(
      os.path.join(case_dir, 'overview.png'))


def read_case_masks(case_dir: str) -> np.ndarray:
  """Every sample PNG of a case folder as bool [N, H, W], in the order written
  (sample_00 ... sample_99, sample_100, ...: by number, not by name)."""
  names = sorted((n for n in os.listdir(case_dir)
                  if n.startswith('sample_') and n.endswith('.png') and n[7:-4].isdigit()),
                 key=lambda n: int(n[7:-4]))
  return np.stack([np.asarray(Image.open(os.path.join(case_dir, n))) > 127 for n in names])


def _plain(value: Any) -> Any:
  """`value` with NumPy scalars and arrays as Python numbers and lists, and NaN/inf
  as None, so that the file is strict JSON (jq, JavaScript: no bare NaN tokens)."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (np.ndarray, np.generic)):
    return _plain(value.tolist())
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value


def write_json(path: str, content: dict[str, Any]) -> None:
  """`content` as indented, strict JSON at `path` (a NaN, e.g. the standard error of
  one image, as null), complete or absent (atomic.write_text)."""
  atomic.write_text(path, json.dumps(_plain(content), indent=2, sort_keys=True,
                                     default=str, allow_nan=False))


def write_report(workdir: str, name: str, table: str, content: dict[str, Any]) -> str:
  """WORKDIR/report/<name>.json (`content`) and <name>.md (`table`), each complete
  or absent (atomic.write_text). Returns the .md path."""
  report_dir = os.path.join(workdir, 'report')
  os.makedirs(report_dir, exist_ok=True)
  json_path, md_path = (os.path.join(report_dir, f'{name}.{ext}') for ext in ('json', 'md'))
  write_json(json_path, content)
  atomic.write_text(md_path, table + '\n')
  return md_path


def remove_report(workdir: str, name: str) -> None:
  """Removes WORKDIR/report/<name>.json and .md: called when a run that rewrites them
  starts, so that a run failing half-way leaves no earlier report beside its output."""
  for ext in ('json', 'md'):
    path = os.path.join(workdir, 'report', f'{name}.{ext}')
    if os.path.exists(path):
      os.remove(path)


# metrics.json's 'format': 2 = standard errors from the sample std (ddof = 1), the
# all-foreground fraction and calibration dispersion present. Files without it (or
# another) were scored by an older scorer; --mode=ablations evaluates them again.
METRICS_FORMAT = 2


def sampler_text(sampler: str, steps: str) -> str:
  """The sampler as report descriptions name it: "ddim, sampling.steps='ddim25'"."""
  return f"{sampler}, sampling.steps='{steps}'" + ('' if steps else ' (all T steps)')


def summarize(per_image: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """{metric: {'mean', 'std', 'sem', 'count'}}: metrics.summarize (std: population,
  ddof = 0) plus the standard error of the mean, the sample std (ddof = 1) over
  sqrt(count) = std / sqrt(count - 1); NaN for fewer than two images."""
  out = {}
  for key, stats in metrics.summarize(per_image).items():
    stats = dict(stats)
    n = stats['count']
    stats['sem'] = stats['std'] / np.sqrt(n - 1) if n > 1 else float('nan')
    out[key] = {k: (int(v) if k == 'count' else float(v)) for k, v in stats.items()}
  return out


def write_per_image_csv(path: str, case_ids: list[str], folders: list[str],
                        per_image: dict[str, np.ndarray], keys: tuple[str, ...]) -> None:
  """One row per case: case_id, folder, then each metric of `keys` (8 decimals)."""
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['case_id', 'folder', *keys])
    for i, (cid, folder) in enumerate(zip(case_ids, folders)):
      writer.writerow([cid, folder, *[f'{float(per_image[k][i]):.8f}' for k in keys]])


def read_per_image_csv(path: str, keys: tuple[str, ...]
                       ) -> tuple[list[str], dict[str, np.ndarray]]:
  """(case ids, metric -> float64 [B]) for `keys` from a file write_per_image_csv wrote."""
  with open(path, newline='') as f:
    table = list(csv.DictReader(f))
  return [r['case_id'] for r in table], {k: np.array([float(r[k]) for r in table])
                                         for k in keys}


def eval_tag(split: str, sampler_name: str, num_samples: int) -> str:
  """The TensorBoard group of one evaluation, 'eval_<split>/<sampler>_n<N>' (e.g.
  'eval_test/ddim25_n16'; `sampler_name` from SamplingArgs.short_name, which differs
  for other timesteps, eta, variance handling or weights): evaluations of one
  checkpoint with other sampling settings or N get curves of their own instead of
  overwriting each other's point at that step."""
  return f'eval_{split}/{sampler_name}_n{num_samples}'


def write_tensorboard(workdir: str, prefix: str, step: int, result: dict[str, Any],
                       per_image: dict[str, np.ndarray],
                       frequencies: list[np.ndarray] | None) -> None:
  """An evaluation in WORKDIR's TensorBoard: scalars <prefix>/<metric> (+
  calibration_mae and calibration_dispersion), per-image CI and GED histograms and,
  with known structure frequencies (truth [S], sampled [S]), the calibration plot."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, asynchronous=False)
  scalars = {f'{prefix}/{k}': v['mean'] for k, v in result['metrics'].items()}
  if 'calibration' in result:
    scalars[f'{prefix}/calibration_mae'] = result['calibration']['mae_ambiguous']
    if 'dispersion' in result['calibration']:
      scalars[f'{prefix}/calibration_dispersion'] = result['calibration']['dispersion']
    truth, sampled = frequencies
    plot = calibration.calibration_plot(truth, sampled, num_samples=result['num_samples'])
    writer.write_images(step, {f'{prefix}/calibration': plot[None] / 255.0})
  writer.write_scalars(step, scalars)
  writer.write_histograms(step, {f'{prefix}/per_image_ci': per_image['ci'],
                                 f'{prefix}/per_image_ged': per_image['ged']})
  writer.flush()
  writer.close()
