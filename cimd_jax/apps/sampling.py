"""`--mode=sample` and `--mode=evaluate`: ensembles from a checkpoint for the inputs
`sample_inputs` reads, written as files people can open (evaluation.reports; NIfTI
cases also as volumes, data.nifti), and scored (evaluation.metrics).

Both write into a staging folder under a lock on the output folder and move it into
place only when complete (utils.atomic), so a killed run never leaves a folder that
mixes two runs, and two runs never write the same folder. In a multi-process job
only process 0 samples and writes (`sample`; `evaluate` is refused there: modes.run).
"""

import dataclasses
import os
from typing import Any, Callable, Iterator

from absl import logging
import jax
import numpy as np
import tqdm

from cimd_jax.apps import sample_inputs
from cimd_jax.apps.sample_inputs import Case
from cimd_jax.data import nifti
from cimd_jax.data import provenance
from cimd_jax.evaluation import calibration
from cimd_jax.evaluation import metrics
from cimd_jax.evaluation import reports
from cimd_jax.inference import ensemble
from cimd_jax.inference import restore
from cimd_jax.models.build import unet_param_shapes
from cimd_jax import settings as settings_lib
from cimd_jax.utils import atomic
from cimd_jax.utils.errors import InputError

SCORE_KEYS = ('sc', 'dmax', 'da', 'ci', 'ged', 'hm_iou', 'dice_mean')


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A restored model ready to draw: the settings reconciled with the checkpoint."""
  settings: settings_lib.Settings
  params: Any
  step: int
  draw: ensemble.EnsembleFn
  trained_on: str = ''   # the checkpoint's data.name
  image_files_per_case: int | None = None   # of its training cases (provenance)


def prepare(settings: settings_lib.Settings, workdir: str, overrides: set[str]) -> Prepared:
  """Restores the checkpoint named by sampling.checkpoint and builds the ensemble
  function, with the model and diffusion settings stored in the checkpoint."""
  step, stored = restore.read_config(workdir, settings.sampling.checkpoint)
  restore.warn_if_unfinished(step, stored, f'the checkpoint in {workdir}')
  settings = settings_lib.reconcile(settings, stored, overrides, f'the checkpoint of step '
                                    f'{step} in {workdir}', bool(settings.sampling.input_dir))
  expected = unet_param_shapes(settings.model, settings.data.image_size,
                               settings.data.image_channels)
  restored = restore.restore_unet(workdir, step, settings.sampling.use_ema, expected)
  draw = ensemble.make_ensemble_fn(settings.model, settings.data.image_size,
                                   settings.diffusion, settings.sampling)
  return Prepared(settings, restored.params, restored.step, draw,
                  ((stored or {}).get('data') or {}).get('name', ''),
                  provenance.image_files_per_case(workdir))


def draw_cases(cases: list[Case], prepared: Prepared, desc: str
               ) -> Iterator[tuple[Case, np.ndarray]]:
  """(case, masks bool [N, H, W]) for every case, images_per_chunk at a time, with a
  progress bar on process 0."""
  sampling = prepared.settings.sampling
  per_call = sampling.images_per_chunk()
  key = jax.random.PRNGKey(sampling.seed)
  with tqdm.tqdm(total=len(cases), desc=desc, unit='image', dynamic_ncols=True,
                 disable=jax.process_index() != 0) as bar:
    for start in range(0, len(cases), per_call):
      group = cases[start:start + per_call]
      images = np.stack([c.image for c in group])
      if len(group) < per_call:  # same shape every call: one compile
        images = np.concatenate([images, np.repeat(images[-1:], per_call - len(group), 0)])
      masks = prepared.draw(prepared.params, images, key, start)[:len(group)]
      for case, m in zip(group, masks):
        yield case, m
      bar.update(len(group))


def _manifest(prepared: Prepared, source: str, cases: list[Case], folders: list[str]
              ) -> dict[str, Any]:
  s = prepared.settings
  return {
      'checkpoint_step': prepared.step, 'use_ema': s.sampling.use_ema,
      **s.sampling.describe(s.diffusion.num_timesteps),
      'prediction': s.diffusion.prediction, 'variance': s.diffusion.variance,
      'num_samples': s.sampling.num_samples, 'seed': s.sampling.seed, 'source': source,
      'num_images': len(cases),
      'cases': {c.case_id: f for c, f in zip(cases, folders)},
      'config': settings_lib.to_dict(s), 'complete': False,
  }


def _write_all(stage: str, prepared: Prepared, inputs: sample_inputs.Inputs,
               folders: list[str], desc: str
               ) -> tuple[list[tuple[Case, np.ndarray]], dict[str, Any] | None]:
  """Draws and writes the case folders (NIfTI cases: STAGE/nifti/ volumes too).
  Returns ([(case, masks bool [N, H, W])], the manifest's `nifti_volumes` entry or None)."""
  results, volumes = [], None
  for (case, masks), folder in zip(draw_cases(inputs.cases, prepared, desc), folders):
    reports.write_case(os.path.join(stage, folder), case.image, masks, case.experts,
                       title=case.case_id)
    results.append((case, masks))
  if inputs.volume_of is not None:
    volumes = nifti.write_sampled_cases(
        os.path.join(stage, 'nifti'), prepared.settings.data.nifti_axis,
        [(c.case_id, m) for c, m in results], inputs.volume_of)
  return results, volumes


def _note_volumes(manifest: dict[str, Any], volumes: dict[str, Any] | None) -> None:
  if volumes is not None:
    manifest['nifti_volumes'] = volumes


def _commit(staged: atomic.StagedFolder, manifest: dict[str, Any]) -> None:
  """Marks the manifest complete, writes it last and moves the folder into place."""
  manifest['complete'] = True
  reports.write_json(os.path.join(staged.path, 'manifest.json'), manifest)
  staged.commit()


def run_sample(settings: settings_lib.Settings, workdir: str, overrides: set[str]) -> str:
  """Draws N masks per image of sampling.split or sampling.input_dir; returns the
  output folder (one folder per case, manifest.json)."""
  prepared = prepare(settings, workdir, overrides)
  s = prepared.settings
  if s.sampling.input_dir:
    source = os.path.abspath(os.path.expanduser(s.sampling.input_dir))
    inputs = sample_inputs.folder_inputs(s, prepared.trained_on,
                                          prepared.image_files_per_case)
    name = os.path.basename(os.path.normpath(s.sampling.input_dir))
  else:
    source = f'split:{s.sampling.split}'
    inputs = sample_inputs.split_inputs(s, workdir)
    name = s.sampling.split
  cases, skipped = inputs.cases, inputs.skipped
  if not cases:
    raise InputError(f'nothing to sample: {source} has no usable images')
  out_dir = os.path.abspath(s.sampling.output_dir or os.path.join(workdir, 'samples', name))
  atomic.check_replaceable(out_dir, 'manifest.json', 'sampling.output_dir', (workdir,),
                           None if s.sampling.output_dir else source)   # default: same source
  folders = reports.case_folder_names([c.case_id for c in cases])
  if jax.process_index() != 0:
    return out_dir
  with atomic.staged_output(out_dir) as staged:
    manifest = _manifest(prepared, source, cases, folders)
    manifest['skipped'] = skipped
    _note_volumes(manifest, _write_all(staged.path, prepared, inputs, folders, 'sampling')[1])
    _commit(staged, manifest)
  if skipped:
    logging.warning('Skipped %d unreadable input image(s):\n  %s', len(skipped),
                    '\n  '.join(skipped))
  logging.info('Wrote %d case folder(s) to %s', len(folders), out_dir)
  return out_dir


def score(results: list[tuple[Case, np.ndarray]]) -> dict[str, np.ndarray]:
  """Per-image metrics (SCORE_KEYS, each float64 [B]) of sampled masks vs experts, and
  `all_foreground`: the fraction of an image's samples that are foreground at every
  pixel (a failure of eps prediction, docs/ablations.md)."""
  per_image = metrics.evaluate(np.stack([c.experts for c, _ in results]),
                               np.stack([m for _, m in results]))
  out = {k: np.asarray(per_image[k], np.float64) for k in SCORE_KEYS}
  out['all_foreground'] = np.array([np.mean(np.all(m, axis=(1, 2))) for _, m in results],
                                   np.float64)
  return out


def evaluate_cases(settings: settings_lib.Settings, workdir: str, overrides: set[str],
                   on_results: Callable[[list, str], None] | None = None
                   ) -> tuple[list[tuple[Case, np.ndarray]], dict[str, Any], str]:
  """Samples N per image of sampling.split, writes the case folders, per_image.csv,
  metrics.json and TensorBoard summaries.

  `on_results(results, staging_folder)` may add files before the folder is moved
  into place. Returns ([(case, masks bool [N, H, W])], metrics.json content, folder).
  """
  prepared = prepare(settings, workdir, overrides)
  s = prepared.settings
  inputs = sample_inputs.split_inputs(s, workdir)
  cases = inputs.cases
  if not cases:
    raise InputError(f'split {s.sampling.split!r} has no images to evaluate')
  out_dir = os.path.abspath(s.sampling.output_dir or
                            os.path.join(workdir, 'eval', s.sampling.split))
  atomic.check_replaceable(out_dir, 'manifest.json', 'sampling.output_dir', (workdir,))
  folders = reports.case_folder_names([c.case_id for c in cases])
  with atomic.staged_output(out_dir) as staged:
    manifest = _manifest(prepared, f'split:{s.sampling.split}', cases, folders)
    results, volumes = _write_all(staged.path, prepared, inputs, folders, 'evaluating')
    _note_volumes(manifest, volumes)
    per_image = score(results)
    reports.write_per_image_csv(os.path.join(staged.path, 'per_image.csv'),
                                [c.case_id for c in cases], folders, per_image, tuple(per_image))
    info = {k: manifest[k] for k in ('checkpoint_step', 'sampler', 'steps', 'num_samples',
                                     'seed', 'use_ema', 'num_images', 'prediction')}
    result = {'metrics': reports.summarize(per_image), 'split': s.sampling.split, **info,
              'format': reports.METRICS_FORMAT}
    frequencies = None
    if all('structures' in (c.extras or {}) for c in cases):   # known truth (synthetic)
      result['calibration'], *frequencies = calibration.over_cases(
          [(c.extras['structures'], c.extras['structure_probs'], m) for c, m in results])
    reports.write_json(os.path.join(staged.path, 'metrics.json'), result)
    if on_results is not None:
      on_results(results, staged.path)
    _commit(staged, manifest)
  if jax.process_index() == 0:
    tag = reports.eval_tag(s.sampling.split, s.sampling.short_name(s.diffusion.num_timesteps),
                           s.sampling.num_samples)
    reports.write_tensorboard(workdir, tag, prepared.step, result, per_image, frequencies)
  logging.info('Evaluated %d images (N=%d): %s', len(cases), s.sampling.num_samples,
               ', '.join(f'{k}={v["mean"]:.4f}' for k, v in result['metrics'].items()))
  return results, result, out_dir
