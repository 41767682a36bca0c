"""What the training loop reports: the scalars of a logging window, divergence
(non-finite loss or parameters) as a one-line error naming the last good
checkpoint, and validation results written to TensorBoard."""

import time
from typing import Any

from absl import logging
import jax
import numpy as np

from cimd_jax import checkpoint
from cimd_jax.train import state as state_lib
from cimd_jax.train import step as step_lib
from cimd_jax.train.args import TrainingArgs
from cimd_jax.utils import runtime
from cimd_jax.utils.errors import DivergenceError

WINDOW_KEYS = ('loss', 'mse', 'vlb', 'kl', 'grad_norm', 'param_norm')


def window_scalars(pending: list[tuple[int, dict[str, np.ndarray]]],
                    batch_size: int, seconds: float, timed_steps: int) -> dict[str, float]:
  """Scalars of a logging window from the host metrics of its steps; steps_per_s and
  images_per_s = `timed_steps` (the window's steps but a compiling first one) over
  `seconds` (their wall time, validation and saving excluded), left out when no step
  was timed."""
  steps = [m for _, m in pending]
  scalars = {k: float(np.mean([m[k] for m in steps])) for k in WINDOW_KEYS}
  for q in range(step_lib.NUM_QUARTILES):
    count = sum(float(m[f'q{q}_count']) for m in steps)
    if count:
      scalars[f'mse_by_t/q{q}'] = sum(float(m[f'mse_q{q}_sum']) for m in steps) / count
  scalars['learning_rate'] = float(steps[-1]['learning_rate'])
  if timed_steps:
    scalars['steps_per_s'] = timed_steps / max(seconds, 1e-9)
    scalars['images_per_s'] = scalars['steps_per_s'] * batch_size
  return scalars


class Divergence:
  """What the run knows to say when it diverges: the last good checkpoint."""

  def __init__(self, workdir: str, training: TrainingArgs):
    self.workdir, self.training = workdir, training
    self.last_good: int | None = None

  def error(self, step: int, loss: float) -> DivergenceError:
    where = (f'step {self.last_good} in {checkpoint.checkpoint_dir(self.workdir)}'
             if self.last_good is not None else 'none was written')
    return DivergenceError(
        f'training diverged at step {step} (loss {loss}, or non-finite parameters); no '
        f'checkpoint was written from that state; last good checkpoint: {where}. Try a '
        f'lower training.learning_rate (now {self.training.learning_rate:g}), '
        f'training.grad_clip_norm > 0 (now {self.training.grad_clip_norm:g}) or more '
        'training.warmup_steps, and check the data')


def validate(validator, state: state_lib.TrainState, step: int, writer
              ) -> dict[str, float] | None:
  """Runs validation on process 0 and writes it; returns the scores saved with the
  checkpoint (BEST_KEY included), the same on every process."""
  scores = None
  if validator is not None:
    started = time.perf_counter()
    result = validator(local_copy(state.ema_params['unet']), step)
    writer.write_scalars(step, result.scalars)
    writer.write_histograms(step, result.histograms)
    writer.write_images(step, result.images)
    logging.info('Validation at step %d (%.1f s): %s', step, time.perf_counter() - started,
                 ', '.join(f'{k[4:]}={v:.4f}' for k, v in result.scalars.items()))
    scores = {k.removeprefix('val/'): v for k, v in result.scalars.items()}
  if jax.process_count() > 1:   # every process saves the checkpoint with the same score
    shared = runtime.share_from_chief(f'validation/{step}',
                                      repr(scores['score']) if scores else None)
    scores = scores or {}
    scores['score'] = float(shared)
  if scores is not None:
    scores[checkpoint.BEST_KEY] = scores.pop('score')
  return scores


def check_finite(metrics: dict[str, Any], step: int, divergence: Divergence) -> None:
  loss = float(metrics['loss'])
  if not np.isfinite(loss) or float(metrics['finite']) < 1.0:
    raise divergence.error(step, loss)


def local_copy(tree: Any) -> Any:
  """This process's copy of a replicated tree (first addressable shard)."""
  return jax.tree.map(lambda x: x.addressable_data(0), tree)
