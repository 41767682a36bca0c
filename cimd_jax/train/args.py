"""TrainingArgs: the `training` config group (optimizer, schedule of the loop,
checkpoints, logging and validation while training)."""

import dataclasses

from cimd_jax.utils import config_args as ca

LR_SCHEDULES = ('constant', 'cosine')
# Validation scores that can pick the best checkpoint, and whether higher is better.
BEST_METRICS = {'ci': True, 'ged': False, 'hm_iou': True, 'calibration_mae': False}


@dataclasses.dataclass(frozen=True)
class TrainingArgs:
  """How to train.

  batch_size: the global batch (split over all devices of all processes).
  num_steps: optimizer updates in total (a resumed run continues to this step).
  learning_rate, lr_schedule ('constant' | 'cosine', both after a linear warm-up of
    warmup_steps), weight_decay (AdamW), grad_clip_norm (global norm; 0 disables).
  ema_rate: EMA of the parameters (the EMA weights are what sampling uses).
  seed: parameter init and the per-step PRNG stream.
  microbatches: accumulate each step's gradient over this many equal micro-batches
    (activation memory of batch_size / microbatches images, the same update).
  checkpoint_every, keep_checkpoints: save period and how many recent ones to keep
    (the best one by validation is kept as well).
  log_every: scalar logging period.
  eval_every: validation period (0 disables; needs a 'validation' split, e.g.
    data.validation_fraction > 0): N = eval_samples masks for the first eval_images
    validation images, drawn with the `sampling` group's sampler, scored with CI,
    GED, HM-IoU (and calibration on the synthetic data), written to TensorBoard with
    an image grid; a checkpoint is saved with the scores, and best_metric picks the
    one kept as the best (sampling.checkpoint='best').
  """
  batch_size: int = 8
  num_steps: int = 100_000
  learning_rate: float = 1e-4
  lr_schedule: str = 'constant'
  warmup_steps: int = 0
  weight_decay: float = 0.0
  grad_clip_norm: float = 1.0
  ema_rate: float = 0.9999
  seed: int = 0
  microbatches: int = 1
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  log_every: int = 50
  eval_every: int = 0
  eval_images: int = 8
  eval_samples: int = 8
  best_metric: str = 'ci'

  def __post_init__(self):
    ca.check_int('training.batch_size', self.batch_size, 1, 1 << 20)
    ca.check_int('training.num_steps', self.num_steps, 1, 1 << 40)
    ca.check_float('training.learning_rate', self.learning_rate, 0.0, low_open=True)
    ca.check_choice('training.lr_schedule', self.lr_schedule, LR_SCHEDULES)
    ca.check_int('training.warmup_steps', self.warmup_steps, 0, self.num_steps)
    ca.check_float('training.weight_decay', self.weight_decay, 0.0)
    ca.check_float('training.grad_clip_norm', self.grad_clip_norm, 0.0)
    ca.check_float('training.ema_rate', self.ema_rate, 0.0, 1.0, high_open=True)
    ca.check_int('training.seed', self.seed, 0, 2**31 - 1)
    ca.check_int('training.microbatches', self.microbatches, 1, self.batch_size)
    if self.batch_size % self.microbatches:
      ca.fail('training.microbatches', self.microbatches,
              f'a divisor of training.batch_size={self.batch_size}')
    ca.check_int('training.checkpoint_every', self.checkpoint_every, 1)
    ca.check_int('training.keep_checkpoints', self.keep_checkpoints, 1, 1000)
    ca.check_int('training.log_every', self.log_every, 1)
    ca.check_int('training.eval_every', self.eval_every, 0)
    ca.check_int('training.eval_images', self.eval_images, 1, 100_000)
    ca.check_int('training.eval_samples', self.eval_samples, 1, 1000)
    ca.check_choice('training.best_metric', self.best_metric, tuple(BEST_METRICS))

  @property
  def micro_batch_size(self) -> int:
    """Examples per micro-batch (the whole global batch when microbatches == 1)."""
    return self.batch_size // self.microbatches
