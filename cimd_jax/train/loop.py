"""The training loop: data -> sharded jit step -> logs, image summaries and checkpoints.

`train_and_evaluate(setup, workdir)` resumes automatically from the latest complete
checkpoint in WORKDIR/checkpoints (params, optimizer, EMA, PRNG key and data order).
"""

import dataclasses
import json
import os
import time
from typing import Any, Callable

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import numpy as np

from cimd_jax import checkpoint
from cimd_jax.data import pipeline
from cimd_jax.diffusion.schedule import DiffusionTables
from cimd_jax.models import build
from cimd_jax.train import objective
from cimd_jax.train import state as state_lib
from cimd_jax.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; no checkpoint is written from such a state."""


@dataclasses.dataclass(frozen=True)
class LoopArgs:
  """Schedule of the training loop (the `training` config group, minus the optimizer)."""
  batch_size: int = 8
  num_steps: int = 1000
  seed: int = 0
  ema_rate: float = 0.9999
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  log_every: int = 50
  image_every: int = 0
  image_samples: int = 4
  image_sampler_steps: int = 50
  microbatches: int = 1         # gradient accumulation chunks per step (memory bound)

  def __post_init__(self):
    if self.microbatches < 1 or self.batch_size % self.microbatches:
      raise ValueError(f'training.microbatches={self.microbatches} must be >= 1 and divide '
                       f'training.batch_size={self.batch_size}')


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything training needs, as explicit typed arguments (built by from_config)."""
  data: Any                     # cimd_jax.data.DataArgs
  unet: build.UNetArgs
  latent: build.LatentArgs
  tables: DiffusionTables
  objective: objective.ObjectiveArgs
  optimizer: state_lib.OptimizerArgs
  loop: LoopArgs
  hparams: dict[str, Any]       # flat config, written to TensorBoard and config.json


def init_state_fn(setup: TrainSetup, networks: build.Networks,
                  tx) -> Callable[[jax.Array], state_lib.TrainState]:
  """rng -> a fresh TrainState (params of all three networks, optimizer, EMA)."""
  def init(rng):
    params = build.init_params(networks, jax.random.fold_in(rng, 0),
                               setup.unet.image_size, setup.unet.image_channels)
    return state_lib.create_train_state(params, tx, jax.random.fold_in(rng, 1))
  return init


def initial_or_restored_state(setup: TrainSetup, networks: build.Networks, tx,
                              mesh: jax.sharding.Mesh, manager
                              ) -> tuple[state_lib.TrainState, dict | None, Any]:
  """The state to start from: the latest checkpoint if any, else a fresh init.

  Returns (state, data_state or None, state_sharding).
  """
  init = init_state_fn(setup, networks, tx)
  rng = jax.random.PRNGKey(setup.loop.seed)
  abstract = jax.eval_shape(init, rng)
  state_sharding = jax.tree.map(lambda _: step_lib.replicated(mesh), abstract)
  latest = manager.latest_step()
  if latest is None:
    state = jax.jit(init, out_shardings=state_sharding)(rng)
    return state, None, state_sharding
  logging.info('Resuming from checkpoint step %d in %s', latest,
               checkpoint.checkpoint_dir(manager.directory.parent))
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, state_sharding)
  state, data_state = checkpoint.restore(manager, latest, target)
  return state, data_state, state_sharding


def _write_config(workdir: str, hparams: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(hparams, f, indent=2, sort_keys=True, default=str)


def _check_finite(metrics: dict[str, Any], step: int) -> None:
  if not np.isfinite(float(metrics['loss'])):
    raise NonFiniteLossError(
        f'Non-finite loss ({float(metrics["loss"])}) at training step {step}; '
        'stopping without writing a checkpoint from this state. Lower '
        'training.learning_rate or check the data.')


def train_and_evaluate(setup: TrainSetup, workdir: str,
                       image_summary_fn: Callable[..., dict[str, np.ndarray]] | None = None,
                       on_log: Callable[[int, dict[str, float]], None] | None = None,
                       ) -> state_lib.TrainState:
  """Trains for `setup.loop.num_steps` steps in total (resuming if possible).

  `image_summary_fn(ema_unet_params, step)` returns named image arrays [N, H, W, C]
  for TensorBoard; called every `loop.image_every` steps when given.
  `on_log(step, scalars)` receives the scalars written at each log step.
  Returns the final TrainState.
  """
  os.makedirs(workdir, exist_ok=True)
  loop = setup.loop
  mesh = step_lib.make_mesh()
  networks = build.build_networks(setup.unet, setup.latent)
  tx = state_lib.make_optimizer(setup.optimizer)
  lr_fn = state_lib.learning_rate_schedule(setup.optimizer)
  manager = checkpoint.make_manager(workdir, loop.keep_checkpoints)
  state, data_state, state_sharding = initial_or_restored_state(
      setup, networks, tx, mesh, manager)
  start_step = int(jax.device_get(state.step))

  # Process 0 prepares the dataset cache; the others wait for it, then read it.
  if jax.process_index() == 0:
    pipeline.prepare(setup.data, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('cimd_jax:data_prepared')
  data_iter = pipeline.train_iterator(
      setup.data, workdir, loop.batch_size, jax.process_index(), jax.process_count())
  if data_state:
    data_iter.set_state(data_state)

  micro_batch = loop.batch_size // loop.microbatches
  if micro_batch % jax.device_count():
    raise ValueError(f'training.batch_size / training.microbatches = {micro_batch} must be a '
                     f'multiple of the device count {jax.device_count()}')
  train_step = step_lib.jit_train_step(
      mesh, state_sharding, networks=networks, tables=setup.tables,
      objective_args=setup.objective, tx=tx, lr_fn=lr_fn, ema_rate=loop.ema_rate,
      microbatches=loop.microbatches)
  sharding = step_lib.batch_sharding(mesh)

  is_chief = jax.process_index() == 0
  # Only process 0 writes TensorBoard and console lines.
  writer = (metric_writers.create_default_writer(workdir) if is_chief
            else metric_writers.MultiWriter([]))
  if start_step == 0:
    _write_config(workdir, setup.hparams)
    writer.write_hparams(setup.hparams)
  hooks = []
  if is_chief:
    hooks.append(periodic_actions.ReportProgress(
        num_train_steps=loop.num_steps, writer=writer, every_secs=30.0))

  logging.info('Training steps %d -> %d, global batch %d on %d device(s), %d process(es)',
               start_step, loop.num_steps, loop.batch_size, jax.device_count(),
               jax.process_count())
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  window_start = time.perf_counter()
  window_steps = 0
  for step in range(start_step, loop.num_steps):
    local = next(data_iter)
    batch = pipeline.make_global_batch(
        {k: local[k] for k in ('image', 'mask')}, sharding)
    state, metrics = train_step(state, batch)
    pending.append((step + 1, metrics))
    window_steps += 1
    # The loss of the previous step is read while this one runs: one step of lag
    # keeps the host from stalling the device, and a NaN is still named exactly.
    if len(pending) > 1:
      prev_step, prev_metrics = pending[-2]
      _check_finite(jax.device_get(prev_metrics), prev_step)
    for hook in hooks:
      hook(step + 1)

    done = step + 1
    last = done == loop.num_steps
    if done % loop.log_every == 0 or last:
      host = [(s, jax.device_get(m)) for s, m in pending]
      for s, m in host:
        _check_finite(m, s)
      elapsed = time.perf_counter() - window_start
      scalars = {k: float(np.mean([m[k] for _, m in host]))
                 for k in host[-1][1] if k != 'finite'}
      scalars['learning_rate'] = float(host[-1][1]['learning_rate'])
      scalars['steps_per_s'] = window_steps / max(elapsed, 1e-9)
      scalars['images_per_s'] = scalars['steps_per_s'] * loop.batch_size
      writer.write_scalars(done, scalars)
      if on_log is not None:
        on_log(done, scalars)
      pending.clear()
      window_start, window_steps = time.perf_counter(), 0
    if image_summary_fn is not None and loop.image_every > 0 and (
        done % loop.image_every == 0 or last):
      images = image_summary_fn(state.ema_params['unet'], done)
      if images:
        writer.write_images(done, images)
    if done % loop.checkpoint_every == 0 or last:
      _check_finite(jax.device_get(metrics), done)
      checkpoint.save(manager, done, state, data_iter.get_state())
      logging.info('Saved checkpoint at step %d', done)
  writer.flush()
  manager.wait_until_finished()
  manager.close()
  return state
