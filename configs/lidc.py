"""The paper's LIDC-IDRI setting (Rahman et al., CVPR 2023; official CIMD code).

128 x 128 crops, 4 annotators, guided-diffusion UNet with 128 channels,
channel_mult (1, 1, 2, 3, 4), 2 res blocks, attention at 16 px, 1 head,
learn_sigma, linear schedule, T = 1000. The official code feeds 4 copies of the
image; here `data.image_channels` is 1 (pass --config.data.image_channels=4 for the
official model's 5 input channels and exact parameter parity).
"""

from cimd_jax import settings


def get_config():
  config = settings.default_config()
  config.data.name = 'folder'
  config.data.source_dir = '../shared/data/lidc_sample'
  config.data.image_size = 128
  config.data.image_channels = 1
  config.data.num_annotators = 4
  config.training.batch_size = 20
  config.training.ema_rate = 0.9999
  return config
