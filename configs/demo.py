"""The README's main job (`bash launch/local.sh demo`): configs/synthetic.py with a
narrower UNet and AMN/ACN, so that the demo finishes in about 8 minutes on a 2-core
AMD Zen4 CPU (7.5-11.4 min on a 2-core Intel Xeon as its speed varies, README
"Demo wall time").

Kept from configs/synthetic.py: the data (32 px, 4 experts, 2,000 training cases),
1500 steps at batch 32, learning rate, warm-up, EMA, x_0 prediction, learned-range
variance with the VLB's gradient stopped at the output conv (model.detach_variance),
DDIM-25, the AMN/ACN trained with the KL.
Made narrower: 16 base channels (synthetic.py: 32) and AMN/ACN filters (8, 16, 32)
(synthetic.py: (16, 32, 64)): the train step at batch 32 is 12.7 GFLOP instead of
49.0, 0.23 s instead of 0.58 s on a 2-core Zen4, with the same calibration within
0.02 (README, "Demo wall time", measured on one machine). The ablation and sampler
tables (docs/ablations.md, docs/samplers.md) were measured with synthetic.py.
"""

import os

from cimd_jax import settings


def get_config():
  config = settings.load_config_file(
      os.path.join(os.path.dirname(__file__), 'synthetic.py'))
  config.model.num_channels = 16
  config.model.latent_filters = (8, 16, 32)
  return config
