"""Tiny configuration for CPU tests: 16 px, 8 channels, a few hundred parameters' worth."""

from cimd_jax import settings


def get_config():
  config = settings.default_config()
  config.data.name = 'synthetic'
  config.data.image_size = 16
  config.data.image_channels = 1
  config.data.num_annotators = 3
  config.data.synthetic_num_train = 32
  config.data.synthetic_num_test = 4
  config.model.num_channels = 8
  config.model.channel_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = (8,)
  config.model.latent_dim = 3
  config.model.latent_filters = (4, 8)
  config.model.latent_convs_per_block = 1
  config.diffusion.num_timesteps = 50
  config.training.batch_size = 4
  config.training.num_steps = 4
  config.training.learning_rate = 1e-3
  config.training.ema_rate = 0.9
  config.training.checkpoint_every = 2
  config.training.keep_checkpoints = 2
  config.training.log_every = 1
  config.training.eval_images = 2
  config.training.eval_samples = 2
  config.sampling.sampler = 'ddpm'
  config.sampling.steps = '10'
  config.sampling.num_samples = 4
  config.sampling.max_batch = 16
  config.sampling.images_per_call = 2
  return config
