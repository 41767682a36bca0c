"""Real-data sanity run on the LIDC sample (../shared/data/lidc_sample): the paper's
model shape made small enough for a 2-core CPU, trained on the sample's 19 training
cases until it fits them (README, "Real-data sanity check").

Kept from configs/lidc.py (the paper's shape): 128 x 128 crops, 1 image channel, 4
annotators, channel_mult (1, 1, 2, 3, 4), attention at 16 px, learned-range variance,
linear schedule, T = 1000, AMN/ACN with latent 6. Made small: 16 base channels (the
paper: 128), 1 res block per level (the paper: 2), AMN/ACN filters (16, 32, 64).
Trained like the demo (configs/synthetic.py): x0 prediction (with eps the demo drew
27-31% all-foreground masks; issue 14), lr 3e-4 with warm-up, EMA 0.995, DDIM-25;
6000 steps with cosine decay (README: fitted better than 3000 constant-lr steps, GED
0.071 vs 0.097 on the training images, about 84 minutes on a 2-core CPU). From
configs/lidc.py it takes model.detach_variance=True: with it this config's run gave
GED 0.050 on the training images, and with --config.training.num_steps=12000 0.035
(README; the experts' own spread: 0.018); add --config.model.detach_variance=False to
repeat the README's earlier runs.

This is a check that the model reproduces real expert disagreement on images it has
seen, not a benchmark: 19 cases are far too few to generalise.
"""

import os

from cimd_jax import settings


def get_config():
  config = settings.load_config_file(os.path.join(os.path.dirname(__file__), 'lidc.py'))
  config.model.num_channels = 16
  config.model.num_res_blocks = 1
  config.model.latent_filters = (16, 32, 64)
  config.model.latent_convs_per_block = 2
  config.diffusion.prediction = 'x0'
  config.training.batch_size = 8
  config.training.num_steps = 6000
  config.training.learning_rate = 3e-4
  config.training.lr_schedule = 'cosine'
  config.training.warmup_steps = 100
  config.training.ema_rate = 0.995
  config.training.checkpoint_every = 1000
  config.training.log_every = 50
  config.training.eval_every = 0
  config.sampling.num_samples = 16
  return config
