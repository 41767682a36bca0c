"""Config B of docs/PERF reference: 64 px, 32 channels, channel_mult (1, 2, 2, 4),
1 res block, attention at 16 px, 4 image channels (as the official model is fed)."""

import os

from cimd_jax import settings


def get_config():
  config = settings.load_config_file(os.path.join(os.path.dirname(__file__), 'lidc.py'))
  config.data.image_size = 64
  config.data.image_channels = 4
  config.model.num_channels = 32
  config.model.channel_mult = (1, 2, 2, 4)
  config.model.num_res_blocks = 1
  config.model.attention_resolutions = (16,)
  return config
