"""The training loop: data -> sharded jit step -> logs, validation and checkpoints.

`train_and_evaluate(workdir, ...)` resumes automatically from the latest complete
checkpoint in WORKDIR/checkpoints (params, optimizer, EMA, PRNG key and data order)
and stores the run's configuration with every checkpoint. Only process 0 writes
TensorBoard and console lines; every process takes part in saving.

TensorBoard tags: loss, mse, vlb, kl (window means; mse is the loss's squared-error
term: the x0 or eps error as diffusion.prediction says, weighted over t by
objective.mse_weighting, so not comparable across those), mse_by_t/q0..q3 (that term
for the examples whose t falls in each quarter of [0, T)), grad_norm, param_norm,
learning_rate, steps_per_s, images_per_s (training steps only: the compiling first
step, validation and saving are left out); with the AMN/ACN, ambiguity/amn_mean_spread,
amn_sigma, spread_over_sigma, acn_sigma (train/ambiguity.py: a collapse shows as a
spread near 0); with validation (train/validation.py)
val/ci, val/ged, val/hm_iou, val/sc, val/dmax, val/da, val/calibration_mae
(synthetic), val/score, histograms val/per_image_ci and val/per_image_ged, and the
images val/cases and val/calibration.
"""

import os
import time
from typing import Any, Callable

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax

from cimd_jax import checkpoint
from cimd_jax.data import pipeline
from cimd_jax.data.args import DataArgs
from cimd_jax.diffusion.args import DiffusionArgs
from cimd_jax.inference.args import SamplingArgs
from cimd_jax.models import build
from cimd_jax.models.build import ModelArgs
from cimd_jax.train import monitor
from cimd_jax.train import objective as objective_lib
from cimd_jax.train import state as state_lib
from cimd_jax.train import step as step_lib
from cimd_jax.train.args import TrainingArgs
from cimd_jax.utils import config_args
from cimd_jax.utils import runtime


def init_state_fn(networks: build.Networks, tx, image_size: int, image_channels: int
                  ) -> Callable[[jax.Array], state_lib.TrainState]:
  """rng -> a fresh TrainState (params of the networks, optimizer, EMA)."""

  def init(rng):
    params = build.init_params(networks, jax.random.fold_in(rng, 0), image_size,
                               image_channels)
    return state_lib.create_train_state(params, tx, jax.random.fold_in(rng, 1))
  return init


def train_and_evaluate(workdir: str, *, data: DataArgs, model: ModelArgs,
                       diffusion: DiffusionArgs, objective: objective_lib.ObjectiveArgs,
                       training: TrainingArgs, sampling: SamplingArgs,
                       config: dict[str, Any],
                       on_log: Callable[[int, dict[str, float]], None] | None = None,
                       should_stop: Callable[[int], bool] | None = None
                       ) -> state_lib.TrainState:
  """Trains to `training.num_steps` steps in total (resuming if possible).

  Args:
    config: the run's configuration (settings.to_dict), stored with every checkpoint
      and written to TensorBoard's hparams.
    on_log: receives (step, scalars) at each log step.
    should_stop: `should_stop(step)` is asked after every step (the same answer on
      every process); when True (e.g. after SIGTERM) the loop saves a checkpoint of
      the current state (if finite) and returns early.

  Returns the final TrainState. Raises DivergenceError on a non-finite loss or
  parameters (no checkpoint is written from such a state).
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = step_lib.make_mesh()
  micro_batch = training.micro_batch_size
  if micro_batch % jax.device_count():
    config_args.fail('training.batch_size', training.batch_size,
                     f'a multiple of microbatches x devices = {training.microbatches} x '
                     f'{jax.device_count()}')
  if (warning := objective_lib.ambiguity_warning(objective, model.ambiguity)):
    logging.warning(warning)
  networks = build.build_networks(model, data.image_size, data.image_channels)
  tx = state_lib.make_optimizer(training, model.ambiguity)
  lr_fn = state_lib.learning_rate_schedule(training)
  tables = diffusion.tables()
  validate = training.eval_every > 0
  # best=True even without validation: a best step scored earlier in this workdir is
  # kept when a resumed run no longer validates (LatestN alone would delete it).
  manager = checkpoint.make_manager(workdir, training.keep_checkpoints,
                                    save_every=training.checkpoint_every, best=True)
  divergence = monitor.Divergence(workdir, training)
  is_chief = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
  try:
    # Process 0 prepares the dataset cache; the others wait for it, then read it.
    if is_chief:
      pipeline.prepare(data, workdir)
    runtime.barrier('data_prepared')
    data_iter = pipeline.train_iterator(data, workdir, training.batch_size,
                                        jax.process_index(), jax.process_count())

    init = init_state_fn(networks, tx, data.image_size, data.image_channels)
    rng = jax.random.PRNGKey(training.seed)
    abstract = jax.eval_shape(init, rng)
    state_sharding = jax.tree.map(lambda _: step_lib.replicated(mesh), abstract)
    latest = manager.latest_step()
    if latest is None:
      state = jax.jit(init, out_shardings=state_sharding)(rng)
    else:
      logging.info('Resuming from checkpoint step %d in %s', latest,
                   checkpoint.checkpoint_dir(workdir))
      target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, state_sharding)
      state, data_restored = checkpoint.restore_train_state(manager, latest, target,
                                                            data_iter)
      if not data_restored:
        logging.warning('Checkpoint %d has no data-iterator state for %d process(es); the '
                        'data order starts afresh', latest, jax.process_count())
      divergence.last_good = latest
    start_step = int(jax.device_get(state.step))

    train_step = step_lib.jit_train_step(
        mesh, state_sharding, networks=networks, tables=tables,
        objective_args=objective, diffusion=diffusion, tx=tx, lr_fn=lr_fn,
        ema_rate=training.ema_rate, microbatches=training.microbatches)
    sharding = step_lib.batch_sharding(mesh)
    probe = None
    if is_chief and networks.amn is not None:
      from cimd_jax.train import ambiguity  # pylint: disable=g-import-not-at-top
      probe = ambiguity.AmbiguityProbe(networks, data, workdir)
    validator = None
    if validate and is_chief:
      from cimd_jax.train import validation  # pylint: disable=g-import-not-at-top
      validator = validation.Validator(workdir, data, model, diffusion, sampling, training)
    if start_step == 0:
      writer.write_hparams(config_args.flat(config))
    hooks = [periodic_actions.ReportProgress(num_train_steps=training.num_steps,
                                             writer=writer, every_secs=30.0)] if is_chief else []

    logging.info('Training steps %d -> %d, global batch %d on %d device(s), %d process(es)',
                 start_step, training.num_steps, training.batch_size, jax.device_count(),
                 jax.process_count())
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    metrics = None
    for step in range(start_step, training.num_steps):
      local = next(data_iter)
      batch = pipeline.make_global_batch({k: local[k] for k in ('image', 'mask')}, sharding)
      if step == start_step and jax.process_count() > 1:
        # Every process compiles first, then all start the first step together.
        train_step = step_lib.compile_ahead(train_step, state, batch)
        runtime.barrier(f'first_step_{start_step}')
      state, metrics = train_step(state, batch)
      if step == start_step:
        # The first step compiles: it is not timed (steps_per_s of this window counts
        # the steps after it).
        jax.block_until_ready(metrics)
        window_start, timed, paused = time.perf_counter(), 0, 0.0
      else:
        timed += 1
      pending.append((step + 1, metrics))
      # The previous step's metrics are read while this one runs: one step of lag
      # keeps the host from stalling the device, and a NaN is still named exactly.
      if len(pending) > 1:
        monitor.check_finite(jax.device_get(pending[-2][1]), pending[-2][0], divergence)
      for hook in hooks:
        hook(step + 1)

      done = step + 1
      last = done == training.num_steps
      stop = should_stop is not None and should_stop(done)
      if done % training.log_every == 0 or last or stop:
        host = [(s, jax.device_get(m)) for s, m in pending]
        for s, m in host:
          monitor.check_finite(m, s, divergence)
        scalars = monitor.window_scalars(
            host, training.batch_size, time.perf_counter() - window_start - paused, timed)
        if probe is not None:
          scalars.update(probe(monitor.local_copy(state.params)))
        writer.write_scalars(done, scalars)
        if on_log is not None:
          on_log(done, scalars)
        pending.clear()
        window_start, timed, paused = time.perf_counter(), 0, 0.0
      scores = None
      evaluate = validate and (done % training.eval_every == 0 or last)
      if evaluate or last or stop or manager.should_save(done):
        # Validation and saving are not training time: kept out of steps_per_s.
        jax.block_until_ready(metrics)
        pause_start = time.perf_counter()
        if evaluate:
          scores = monitor.validate(validator, state, done, writer)
        monitor.check_finite(jax.device_get(metrics), done, divergence)
        checkpoint.save(manager, done, state, data_iter, config, metrics=scores)
        divergence.last_good = done
        logging.info('Saving checkpoint at step %d', done)
        paused += time.perf_counter() - pause_start
      if stop:
        logging.warning('Stop requested: saved a checkpoint at step %d and stopped', done)
        break
    manager.wait_until_finished()
    return state
  finally:
    writer.flush()
    writer.close()
    manager.close()
