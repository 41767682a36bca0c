"""The one place that reads an ml_collections ConfigDict.

Each function takes the config groups it needs and returns the explicit, typed
arguments of one module, so no other module ever sees a ConfigDict.
"""

from typing import Any

import ml_collections

from cimd_jax.data import DataArgs
from cimd_jax.diffusion import schedule
from cimd_jax.models import build
from cimd_jax.train import objective
from cimd_jax.train import state as state_lib
from cimd_jax.train.loop import LoopArgs, TrainSetup


def data_args(data: ml_collections.ConfigDict) -> DataArgs:
  """The `data` group as DataArgs."""
  return DataArgs(
      name=data.name,
      source_dir=data.source_dir,
      tfds_dir=data.tfds_dir,
      image_size=int(data.image_size),
      image_channels=int(data.image_channels),
      num_annotators=int(data.num_annotators),
      mask_threshold=int(data.mask_threshold),
      resize=bool(data.resize),
      validation_fraction=float(data.validation_fraction),
      seed=int(data.seed),
      worker_count=int(data.worker_count),
      synthetic_num_train=int(data.synthetic_num_train),
      synthetic_num_test=int(data.synthetic_num_test),
      synthetic_seed=int(data.synthetic_seed),
  )


def unet_args(model: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
              training: ml_collections.ConfigDict | None = None) -> build.UNetArgs:
  """The UNet's architecture from the `model` and `data` groups (+ remat/dtype)."""
  return build.UNetArgs(
      image_size=int(data.image_size),
      image_channels=int(data.image_channels),
      num_channels=int(model.num_channels),
      channel_mult=tuple(int(m) for m in model.channel_mult),
      num_res_blocks=int(model.num_res_blocks),
      attention_resolutions=tuple(int(r) for r in model.attention_resolutions),
      num_heads=int(model.num_heads),
      num_head_channels=int(model.num_head_channels),
      dropout=float(model.dropout),
      use_scale_shift_norm=bool(model.use_scale_shift_norm),
      resblock_updown=bool(model.resblock_updown),
      learn_sigma=bool(model.learn_sigma),
      remat=bool(training.remat) if training is not None else False,
      dtype=str(training.compute_dtype) if training is not None else 'float32',
      conv_impl=str(model.conv_impl),
  )


def latent_args(model: ml_collections.ConfigDict,
                data: ml_collections.ConfigDict) -> build.LatentArgs:
  """The AMN/ACN architecture (both take the image plus one mask channel)."""
  return build.LatentArgs(
      input_channels=int(data.image_channels) + 1,
      filters=tuple(int(f) for f in model.latent_filters),
      convs_per_block=int(model.latent_convs_per_block),
      latent_dim=int(model.latent_dim),
      conv_impl=str(model.conv_impl),
  )


def training_betas(diffusion: ml_collections.ConfigDict):
  """The T betas of the training process, float64 numpy [T]."""
  if diffusion.variance not in ('learned_range', 'fixed_small', 'fixed_large'):
    raise ValueError("diffusion.variance must be 'learned_range', 'fixed_small' or "
                     f"'fixed_large', got {diffusion.variance!r}")
  return schedule.get_beta_schedule(diffusion.beta_schedule, int(diffusion.num_timesteps))


def diffusion_tables(diffusion: ml_collections.ConfigDict) -> schedule.DiffusionTables:
  """The full T-step tables of the training process."""
  return schedule.make_tables(training_betas(diffusion))


def objective_args(model: ml_collections.ConfigDict,
                   diffusion: ml_collections.ConfigDict) -> objective.ObjectiveArgs:
  """Weights and inputs of the CIMD objective."""
  if diffusion.variance == 'learned_range' and not model.learn_sigma:
    raise ValueError("diffusion.variance='learned_range' needs model.learn_sigma=True")
  return objective.ObjectiveArgs(
      variance=diffusion.variance,
      vlb_weight=float(diffusion.vlb_weight),
      kl_weight=float(model.kl_weight),
      amn_input=model.amn_input,
      acn_input=model.acn_input,
      prediction=diffusion.prediction,
  )


def optimizer_args(training: ml_collections.ConfigDict) -> state_lib.OptimizerArgs:
  """AdamW, schedule and clipping from the `training` group."""
  return state_lib.OptimizerArgs(
      learning_rate=float(training.learning_rate),
      lr_schedule=training.lr_schedule,
      warmup_steps=int(training.warmup_steps),
      num_steps=int(training.num_steps),
      weight_decay=float(training.weight_decay),
      grad_clip_norm=float(training.grad_clip_norm),
  )


def loop_args(training: ml_collections.ConfigDict) -> LoopArgs:
  """The loop's schedule from the `training` group."""
  return LoopArgs(
      batch_size=int(training.batch_size),
      num_steps=int(training.num_steps),
      seed=int(training.seed),
      ema_rate=float(training.ema_rate),
      checkpoint_every=max(int(training.checkpoint_every), 1),
      keep_checkpoints=max(int(training.keep_checkpoints), 1),
      log_every=max(int(training.log_every), 1),
      image_every=int(training.image_every),
      image_samples=int(training.image_samples),
      image_sampler_steps=int(training.image_sampler_steps),
      microbatches=int(training.microbatches),
  )


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config flattened to {'group.key': scalar or str}, for TensorBoard hparams."""
  flat: dict[str, Any] = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, (ml_collections.ConfigDict, dict)):
      for key in sorted(node.keys()):
        visit(f'{prefix}.{key}' if prefix else key, node[key])
    elif isinstance(node, (tuple, list)):
      flat[prefix] = ','.join(str(v) for v in node)
    else:
      flat[prefix] = node
  visit('', config)
  return flat


def train_setup(config: ml_collections.ConfigDict) -> TrainSetup:
  """Everything `train.loop.train_and_evaluate` needs."""
  return TrainSetup(
      data=data_args(config.data),
      unet=unet_args(config.model, config.data, config.training),
      latent=latent_args(config.model, config.data),
      tables=diffusion_tables(config.diffusion),
      objective=objective_args(config.model, config.diffusion),
      optimizer=optimizer_args(config.training),
      loop=loop_args(config.training),
      hparams=flat_hparams(config),
  )


def sampler_args(sampling: ml_collections.ConfigDict,
                 diffusion: ml_collections.ConfigDict) -> 'sample.SamplerArgs':
  """Sampler kind, step spacing and memory bound from the `sampling` group."""
  from cimd_jax import sample  # pylint: disable=g-import-not-at-top
  steps = str(sampling.steps or '')
  kind = sampling.sampler
  if steps.startswith('ddim') and kind != 'ddim':
    raise ValueError(f"sampling.steps={steps!r} is a DDIM spacing; set sampling.sampler='ddim'")
  if kind not in ('ddpm', 'ddim'):
    raise ValueError(f"sampling.sampler must be 'ddpm' or 'ddim', got {kind!r}")
  return sample.SamplerArgs(sampler=kind, steps=steps, eta=float(sampling.ddim_eta),
                            variance=diffusion.variance,
                            max_batch=max(int(sampling.max_batch), 1),
                            prediction=diffusion.prediction,
                            clip_variance=bool(sampling.clip_variance))


def sample_setup(config: ml_collections.ConfigDict, mode: str) -> 'sample.SampleSetup':
  """Arguments of --mode=sample ('sample') or --mode=evaluate ('evaluate')."""
  from cimd_jax import sample  # pylint: disable=g-import-not-at-top
  sampling = config.sampling
  evaluate = mode == 'evaluate'
  return sample.SampleSetup(
      data=data_args(config.data),
      unet=unet_args(config.model, config.data),
      betas=training_betas(config.diffusion),
      sampler=sampler_args(sampling, config.diffusion),
      restore=sample.RestoreArgs(use_ema=bool(sampling.use_ema),
                                 checkpoint_step=int(sampling.checkpoint_step)),
      num_samples=int(config.eval.num_samples if evaluate else sampling.num_samples),
      seed=int(sampling.seed),
      split=config.eval.split if evaluate else sampling.split,
      input_dir='' if evaluate else sampling.input_dir,
      output_dir=sampling.output_dir,
      skip_bad_inputs=bool(sampling.skip_bad_inputs),
      images_per_call=int(config.eval.batch_images),
      max_images=int(config.eval.max_images) if evaluate else -1,
      hparams=flat_hparams(config),
  )
