"""`--mode=sample` and `--mode=evaluate`: ensembles from an Orbax checkpoint, written
as PNGs people can open, and scored with `cimd_jax.metrics`.

Output per case (folder `<case_id>/`):
  sample_00.png ... sample_{N-1}.png  uint8 0/255 masks at the image's size
  mean.png   per-pixel foreground frequency over the N samples, 0..1 -> 0..255
  std.png    per-pixel standard deviation of the N binary samples, 0..0.5 -> 0..255
  overview.png  image | experts (when known) | samples | frequency and std maps
and per run: manifest.json (checkpoint step, sampler, steps, N, seed, config);
evaluate also writes per_image.csv and metrics.json.
"""

import csv
import dataclasses
import json
import os
from typing import Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cimd_jax import checkpoint
from cimd_jax import figures
from cimd_jax import metrics
from cimd_jax import progress
from cimd_jax.data import image_folder
from cimd_jax.diffusion import gaussian
from cimd_jax.diffusion import samplers
from cimd_jax.diffusion import schedule
from cimd_jax.models import build
from cimd_jax.models import conv

METRIC_KEYS = ('sc', 'dmax', 'da', 'ci', 'ged', 'hm_iou', 'dice_mean')


@dataclasses.dataclass(frozen=True)
class SamplerArgs:
  """How to draw masks: sampler kind, step spacing, DDIM eta, memory bound."""
  sampler: str = 'ddpm'          # 'ddpm' | 'ddim'
  steps: str = ''                # '' = all T; '100'; 'ddim50'
  eta: float = 0.0
  variance: str = 'learned_range'
  max_batch: int = 64            # rows (images x samples) per compiled call
  prediction: str = 'eps'        # what the UNet's first channel predicts: 'eps' | 'x0'
  # Keep the learned variance inside [beta_tilde_t, beta_t] (v clipped to [-1, 1]).
  clip_variance: bool = True

  def describe(self, num_timesteps: int) -> dict[str, Any]:
    return {'sampler': self.sampler, 'steps': self.steps or str(num_timesteps),
            'ddim_eta': self.eta if self.sampler == 'ddim' else None,
            'variance': self.variance, 'prediction': self.prediction,
            'clip_variance': self.clip_variance}


@dataclasses.dataclass(frozen=True)
class RestoreArgs:
  use_ema: bool = True
  checkpoint_step: int = -1      # -1: latest


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters do not fit the configured model."""


def sampling_tables(betas: np.ndarray, steps: str, sampler: str = 'ddpm'
                    ) -> schedule.DiffusionTables:
  """Tables over the kept steps: all T for '', else the respaced subset ('100', 'ddim50')."""
  return samplers.sampler_from_name(betas, steps, sampler)[0]


# ------------------------------------------------------------------ restore
def restore_unet_params(workdir: str, unet_args: build.UNetArgs,
                        restore: RestoreArgs) -> tuple[Any, int]:
  """UNet parameters (EMA or raw) from WORKDIR/checkpoints, checked against the config.

  Returns (params, checkpoint step). Raises FileNotFoundError naming the folder and
  what it holds when there is no checkpoint, and CheckpointMismatchError naming the
  first parameter whose shape differs from the configured model.
  """
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  steps = _complete_steps(ckpt_dir)
  if not steps:
    raise FileNotFoundError(
        f'No checkpoint in {ckpt_dir}: {checkpoint.describe_dir(ckpt_dir)}; '
        f'workdir: {checkpoint.describe_dir(os.path.abspath(workdir))}. '
        'Train first (--mode=train) or point --workdir at a trained run.')
  step = steps[-1] if restore.checkpoint_step < 0 else restore.checkpoint_step
  if step not in steps:
    raise FileNotFoundError(
        f'No checkpoint for step {step} in {ckpt_dir}; available steps: {steps}')
  manager = checkpoint.make_manager(workdir, keep=max(len(steps), 1), create=False)
  state = checkpoint.restore_on_one_device(manager, step)
  which = 'ema_params' if restore.use_ema else 'params'
  params = _get(state, which)['unet']
  unet = build.build_unet(unet_args)
  expected = jax.eval_shape(
      lambda: unet.init(jax.random.PRNGKey(0),
                        jnp.zeros((1, unet_args.image_size, unet_args.image_size,
                                   unet_args.image_channels + 1)),
                        jnp.zeros((1,), jnp.int32), train=False))['params']
  check_params_fit(params, expected, f'{ckpt_dir}/{step}')
  params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float32), params)
  return params, step


def _get(tree: Any, key: str) -> Any:
  return tree[key] if isinstance(tree, dict) else getattr(tree, key)


def _complete_steps(ckpt_dir: str) -> list[int]:
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def check_params_fit(params: Any, expected: Any, where: str) -> None:
  """Raises CheckpointMismatchError at the first path whose presence or shape differs."""
  got = {jax.tree_util.keystr(p): np.shape(v)
         for p, v in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): tuple(v.shape)
          for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  for path in sorted(set(got) | set(want)):
    if path not in got:
      raise CheckpointMismatchError(
          f'Checkpoint {where} has no parameter {path} (shape {want[path]} in the config); '
          'was it trained with another model config?')
    if path not in want:
      raise CheckpointMismatchError(
          f'Checkpoint {where} has parameter {path} (shape {got[path]}) that the configured '
          'model does not have; was it trained with another model config?')
    if tuple(got[path]) != tuple(want[path]):
      raise CheckpointMismatchError(
          f'Checkpoint {where} does not fit the config: parameter {path} has shape '
          f'{tuple(got[path])} in the checkpoint but {tuple(want[path])} in the config '
          '(check model.num_channels, channel_mult, data.image_channels, ...).')


# ------------------------------------------------------------------ drawing
def denoiser(unet_args: build.UNetArgs, train_tables: schedule.DiffusionTables,
             prediction: str, clip_variance: bool = True
             ) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """apply_fn(params, x [R, H, W, C+1], t_orig int [R]) -> eps-form output [R, H, W, 2|1].

  `train_tables` are the full T-step tables (t_orig indexes them); with prediction
  'x0' the UNet's x_0 output is turned into eps there (gaussian.as_eps_output).
  With `clip_variance` the learned-range channel v is clipped to [-1, 1], so that
  log sigma^2 = frac log beta + (1 - frac) log beta_tilde interpolates (frac in
  [0, 1]) and never extrapolates: the hybrid loss trains v only through the VLB, and
  at few-step respacing an out-of-range v (seen up to 13 on the synthetic demo) turns
  into a variance of order 1 in the last steps, which destroys the sample.
  """
  unet = build.build_unet(unet_args)

  def apply_fn(params, x, t):
    out = unet.apply({'params': params}, x, t, train=False)
    out = gaussian.as_eps_output(train_tables, out, x[..., -1:], t, prediction)
    if clip_variance and out.shape[-1] == 2:
      out = jnp.concatenate([out[..., :1], jnp.clip(out[..., 1:], -1.0, 1.0)], axis=-1)
    return out
  return apply_fn


def make_ensemble_fn(unet_args: build.UNetArgs, betas: np.ndarray, sampler: SamplerArgs,
                     num_samples: int
                     ) -> Callable[[Any, np.ndarray, jax.Array, int], np.ndarray]:
  """(params, images [B, H, W, C], key, first_image_index) -> masks bool [B, N, H, W].

  `betas` [T] is the training schedule; the sampler's (possibly respaced) steps come
  from `sampler.steps`. Image b's masks depend only on (key, first_image_index + b),
  not on how images are grouped into calls.
  """
  tables = sampling_tables(betas, sampler.steps, sampler.sampler)
  apply_fn = denoiser(unet_args, schedule.make_tables(betas), sampler.prediction,
                      sampler.clip_variance)
  options = conv.compiler_options(unet_args.conv_impl)

  def draw(params, images, key, first_image_index):
    x0 = samplers.sample_ensemble(
        apply_fn, params, tables, jnp.asarray(images, jnp.float32), key, num_samples,
        sampler.max_batch, first_image_index=first_image_index, sampler=sampler.sampler,
        variance=sampler.variance, eta=sampler.eta, compiler_options=options)
    return np.asarray(samplers.masks_from_x0(x0))[..., 0]
  return draw


# ------------------------------------------------------------------ writing
def write_case(out_dir: str, case_id: str, image: np.ndarray, masks: np.ndarray,
               experts: np.ndarray | None = None) -> str:
  """Writes the per-case files for one image; returns the case folder.

  Args:
    image: float [H, W, C] in [-1, 1].
    masks: bool [N, H, W] sampled masks.
    experts: bool [A, H, W] expert masks, or None.
  """
  case_dir = os.path.join(out_dir, _safe_name(case_id))
  os.makedirs(case_dir, exist_ok=True)
  masks = np.asarray(masks, bool)
  for i, m in enumerate(masks):
    Image.fromarray(figures.mask_to_uint8(m)).save(
        os.path.join(case_dir, f'sample_{i:02d}.png'))
  freq = masks.mean(0)
  Image.fromarray(np.round(freq * 255).astype(np.uint8)).save(
      os.path.join(case_dir, 'mean.png'))
  Image.fromarray(np.round(np.clip(masks.std(0) * 510, 0, 255)).astype(np.uint8)).save(
      os.path.join(case_dir, 'std.png'))
  Image.fromarray(figures.overview(image, masks, experts, title=case_id)).save(
      os.path.join(case_dir, 'overview.png'))
  return case_dir


def read_case_masks(case_dir: str, num_samples: int) -> np.ndarray:
  """The sample PNGs of a case folder as bool [N, H, W] (for re-checking metrics)."""
  return np.stack([np.asarray(Image.open(os.path.join(case_dir, f'sample_{i:02d}.png'))) > 127
                   for i in range(num_samples)])


def _safe_name(case_id: str) -> str:
  keep = ''.join(c if (c.isalnum() or c in '-_.') else '_' for c in str(case_id))
  return keep or 'case'


def write_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
  with open(os.path.join(out_dir, 'manifest.json'), 'w') as f:
    json.dump(manifest, f, indent=2, sort_keys=True, default=str)


# ------------------------------------------------------------------ runs
@dataclasses.dataclass(frozen=True)
class Case:
  case_id: str
  image: np.ndarray                 # [H, W, C] in [-1, 1]
  experts: np.ndarray | None = None  # bool [A, H, W]
  extras: dict[str, np.ndarray] | None = None


def cases_from_batches(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[Case]:
  """Flattens eval batches (image, masks in {-1, 1}, case_id, extras) into Cases."""
  for batch in batches:
    for i in range(len(batch['image'])):
      experts = batch['masks'][i] > 0 if 'masks' in batch else None
      extras = {k: np.asarray(v[i]) for k, v in batch.items()
                if k not in ('image', 'masks', 'case_id')}
      cid = batch['case_id'][i]
      cid = cid.decode() if isinstance(cid, bytes) else str(cid)
      yield Case(cid, np.asarray(batch['image'][i]), experts, extras)


def cases_from_folder(input_dir: str, image_size: int, image_channels: int, resize: bool,
                      skip_bad_inputs: bool) -> tuple[list[Case], list[str]]:
  """Cases of an unlabelled image folder, and the messages of skipped bad images.

  Without `skip_bad_inputs` the first bad image raises BadInputImage naming the file.
  """
  cases, skipped = [], []
  for case_id, path in image_folder.list_input_images(input_dir):
    try:
      img = image_folder.read_input_image(case_id, path, image_size, image_channels, resize)
    except image_folder.BadInputImage as e:
      if not skip_bad_inputs:
        raise
      skipped.append(str(e))
      continue
    cases.append(Case(case_id, img.image))
  return cases, skipped


def draw_for_cases(cases: list[Case], draw: Callable, params: Any, key: jax.Array,
                   images_per_call: int, out_dir: str, desc: str
                   ) -> Iterator[tuple[Case, np.ndarray]]:
  """Samples every case (images_per_call at a time), writes its files, yields (case, masks)."""
  bar = progress.ProgressBar(len(cases), unit='images', desc=desc,
                             enabled=jax.process_index() == 0)
  for start in range(0, len(cases), images_per_call):
    group = cases[start:start + images_per_call]
    images = np.stack([c.image for c in group])
    if len(group) < images_per_call:  # same shape every call: one compile
      pad = np.repeat(images[-1:], images_per_call - len(group), 0)
      images = np.concatenate([images, pad])
    masks = draw(params, images, key, start)[:len(group)]
    for case, m in zip(group, masks):
      write_case(out_dir, case.case_id, case.image, m, case.experts)
      yield case, m
    bar.update(len(group))
  bar.close()


def score_cases(results: list[tuple[Case, np.ndarray]]) -> dict[str, np.ndarray]:
  """Per-image metrics (METRIC_KEYS, each [B]) of sampled masks against the experts."""
  gts = np.stack([c.experts for c, _ in results])
  preds = np.stack([m for _, m in results])
  per_image = metrics.evaluate(gts, preds)
  return {k: np.asarray(per_image[k], np.float64) for k in METRIC_KEYS}


def write_metrics(out_dir: str, case_ids: list[str], per_image: dict[str, np.ndarray],
                  info: dict[str, Any]) -> dict[str, Any]:
  """per_image.csv and metrics.json (mean, std, count per metric + `info`); returns the summary."""
  with open(os.path.join(out_dir, 'per_image.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    keys = [k for k in METRIC_KEYS if k in per_image]
    writer.writerow(['case_id', *keys])
    for i, cid in enumerate(case_ids):
      writer.writerow([cid, *[f'{float(per_image[k][i]):.8f}' for k in keys]])
  summary = {k: {key: float(val) for key, val in v.items()}
             for k, v in metrics.summarize(per_image).items()}
  result = {'metrics': summary, **info}
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(result, f, indent=2, sort_keys=True, default=str)
  return result


@dataclasses.dataclass(frozen=True)
class SampleSetup:
  """Everything sample/evaluate need, as explicit arguments (built by from_config)."""
  data: Any                       # cimd_jax.data.DataArgs
  unet: build.UNetArgs
  betas: np.ndarray               # [T] training schedule
  sampler: SamplerArgs
  restore: RestoreArgs
  num_samples: int
  seed: int
  split: str
  input_dir: str = ''
  output_dir: str = ''
  skip_bad_inputs: bool = False
  images_per_call: int = 4
  max_images: int = -1
  hparams: dict[str, Any] = dataclasses.field(default_factory=dict)


def _prepare(setup: SampleSetup, workdir: str):
  params, step = restore_unet_params(workdir, setup.unet, setup.restore)
  draw = make_ensemble_fn(setup.unet, setup.betas, setup.sampler, setup.num_samples)
  key = jax.random.PRNGKey(setup.seed)
  manifest = {'checkpoint_step': step, 'use_ema': setup.restore.use_ema,
              **setup.sampler.describe(len(setup.betas)), 'num_samples': setup.num_samples,
              'seed': setup.seed, 'config': setup.hparams}
  return params, draw, key, manifest


def _images_per_call(setup: SampleSetup) -> int:
  return max(1, min(setup.images_per_call, max(setup.sampler.max_batch // setup.num_samples, 1)))


def _dataset_cases(setup: SampleSetup, workdir: str, split: str) -> list[Case]:
  from cimd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.prepare(setup.data, workdir)
  batches = pipeline.eval_batches(setup.data, workdir, split, batch_size=8,
                                  max_examples=setup.max_images)
  return list(cases_from_batches(batches))


def run_sample(setup: SampleSetup, workdir: str) -> str:
  """Draws N masks per image of a split or of `input_dir`; returns the output folder."""
  params, draw, key, manifest = _prepare(setup, workdir)
  skipped: list[str] = []
  if setup.input_dir:
    source = os.path.basename(os.path.normpath(setup.input_dir))
    cases, skipped = cases_from_folder(setup.input_dir, setup.unet.image_size,
                                       setup.unet.image_channels, setup.data.resize,
                                       setup.skip_bad_inputs)
  else:
    source = setup.split
    cases = _dataset_cases(setup, workdir, setup.split)
  out_dir = setup.output_dir or os.path.join(workdir, 'samples', source)
  os.makedirs(out_dir, exist_ok=True)
  manifest.update({'source': setup.input_dir or f'split:{setup.split}',
                   'num_images': len(cases), 'skipped': skipped})
  for _ in draw_for_cases(cases, draw, params, key, _images_per_call(setup), out_dir,
                          desc='sampling'):
    pass
  write_manifest(out_dir, manifest)
  if skipped:
    logging.warning('Skipped %d unreadable input image(s):\n  %s', len(skipped),
                    '\n  '.join(skipped))
  logging.info('Wrote %d case folder(s) to %s', len(cases), out_dir)
  return out_dir


def evaluate_cases(setup: SampleSetup, workdir: str
                   ) -> tuple[list[tuple[Case, np.ndarray]], dict[str, Any], str]:
  """Samples N per image of the eval split, writes case files, per_image.csv,
  metrics.json and TensorBoard scalars.

  Returns ([(case, masks bool [N, H, W])], metrics.json content, output folder).
  """
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  params, draw, key, manifest = _prepare(setup, workdir)
  cases = _dataset_cases(setup, workdir, setup.split)
  if not cases:
    raise ValueError(f'Split {setup.split!r} has no images to evaluate')
  if any(c.experts is None for c in cases):
    raise ValueError(f'Split {setup.split!r} has no expert masks; use --mode=sample')
  out_dir = setup.output_dir or os.path.join(workdir, 'eval', setup.split)
  os.makedirs(out_dir, exist_ok=True)
  results = list(draw_for_cases(cases, draw, params, key, _images_per_call(setup), out_dir,
                                desc='evaluating'))
  per_image = score_cases(results)
  manifest.update({'split': setup.split, 'num_images': len(cases)})
  write_manifest(out_dir, manifest)
  info = {k: manifest[k] for k in ('checkpoint_step', 'sampler', 'steps', 'num_samples',
                                   'seed', 'use_ema', 'split', 'num_images')}
  result = write_metrics(out_dir, [c.case_id for c, _ in results], per_image, info)
  if jax.process_index() == 0:
    writer = metric_writers.create_default_writer(workdir, asynchronous=False)
    writer.write_scalars(manifest['checkpoint_step'], {
        f'eval_{setup.split}/{k}': v['mean'] for k, v in result['metrics'].items()})
    writer.flush()
  logging.info('Evaluated %d images (N=%d): %s', len(cases), setup.num_samples, ', '.join(
      f'{k}={v["mean"]:.4f}' for k, v in result['metrics'].items()))
  return results, result, out_dir


def run_evaluate(setup: SampleSetup, workdir: str) -> dict[str, Any]:
  """--mode=evaluate; returns the metrics.json content."""
  return evaluate_cases(setup, workdir)[1]
