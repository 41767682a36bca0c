"""What each `--mode` of main.py does, given a ConfigDict and a workdir.

This is the only module besides `from_config` that holds the whole config; it hands
each part explicit arguments built by `from_config`.
"""

import ml_collections


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs `mode` ('train' | 'sample' | 'evaluate' | 'demo')."""
  if mode == 'train':
    train(config, workdir)
  elif mode == 'sample':
    sample_mode(config, workdir)
  elif mode == 'evaluate':
    evaluate(config, workdir)
  elif mode == 'demo':
    demo(config, workdir)
  elif mode == 'compare_samplers':
    compare_samplers(config, workdir)
  else:
    raise ValueError(f'Unknown mode {mode!r}')


def train(config: ml_collections.ConfigDict, workdir: str):
  """Trains (resuming from WORKDIR/checkpoints when present); returns the final state."""
  from cimd_jax import from_config  # pylint: disable=g-import-not-at-top
  from cimd_jax.train import loop  # pylint: disable=g-import-not-at-top
  setup = from_config.train_setup(config)
  image_fn = None
  if setup.loop.image_every > 0:
    from cimd_jax.train import images  # pylint: disable=g-import-not-at-top
    image_fn = images.make_image_summary_fn(
        setup.data, setup.unet, from_config.training_betas(config.diffusion), workdir,
        num_samples=setup.loop.image_samples, sampler_steps=setup.loop.image_sampler_steps,
        variance=setup.objective.variance, prediction=setup.objective.prediction,
        seed=setup.loop.seed)
  return loop.train_and_evaluate(setup, workdir, image_summary_fn=image_fn)


def sample_mode(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Draws masks for a split or an input folder; returns the output folder."""
  from cimd_jax import from_config  # pylint: disable=g-import-not-at-top
  from cimd_jax import sample  # pylint: disable=g-import-not-at-top
  return sample.run_sample(from_config.sample_setup(config, 'sample'), workdir)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Samples and scores the eval split; returns the metrics.json content."""
  from cimd_jax import from_config  # pylint: disable=g-import-not-at-top
  from cimd_jax import sample  # pylint: disable=g-import-not-at-top
  return sample.run_evaluate(from_config.sample_setup(config, 'evaluate'), workdir)


def demo(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train -> evaluate -> baselines and calibration -> WORKDIR/report/."""
  from cimd_jax import demo as demo_lib  # pylint: disable=g-import-not-at-top
  from cimd_jax import from_config  # pylint: disable=g-import-not-at-top
  setup = demo_lib.DemoSetup(train_fn=lambda: train(config, workdir),
                             eval_setup=from_config.sample_setup(config, 'evaluate'))
  return demo_lib.run_demo(setup, workdir)


def compare_samplers(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Scores DDPM-T, DDPM-100/50, DDIM-50/25 on the eval split; writes and returns
  WORKDIR/report/samplers.md."""
  import os  # pylint: disable=g-import-not-at-top
  from cimd_jax import compare_samplers as compare_lib  # pylint: disable=g-import-not-at-top
  from cimd_jax import from_config  # pylint: disable=g-import-not-at-top
  rows, rec = compare_lib.compare(from_config.sample_setup(config, 'evaluate'), workdir)
  table = compare_lib.markdown_table(rows, rec)
  os.makedirs(os.path.join(workdir, 'report'), exist_ok=True)
  path = os.path.join(workdir, 'report', 'samplers.md')
  with open(path, 'w') as f:
    f.write(table + '\n')
  print(table, flush=True)
  return path
