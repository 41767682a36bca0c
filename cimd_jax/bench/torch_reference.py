"""The official PyTorch model timed in the same bench invocation, for side-by-side
ratios (`--torch_reference=PYTHON`): the scripts of ../shared/reference/torch_speed/
(`torch_train_step.py`, `torch_reverse_step.py`) run in a subprocess with a Python
that has torch, right after our measurement, on the same machine.

Only configs A (the paper's, `configs/lidc.py` with 4 image channels) and B
(`configs/bench_small.py`) have a matching official script.
"""

import json
import os
import subprocess
from typing import Any

from cimd_jax.models.build import ModelArgs

DEFAULT_DIR = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'reference',
    'torch_speed'))
# What the official scripts build as configs A and B (their UNets, 4 image channels).
_CONFIGS = {
    'A': dict(image_size=128, num_channels=128, channel_mult=(1, 1, 2, 3, 4),
              num_res_blocks=2, attention_resolutions=(16,)),
    'B': dict(image_size=64, num_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=1,
              attention_resolutions=(16,)),
}


def official_config(model: ModelArgs, image_size: int, image_channels: int) -> str | None:
  """'A' or 'B' when the configured UNet is the official script's, else None."""
  if image_channels != 4 or model.use_scale_shift_norm or not model.learn_sigma:
    return None
  for name, want in _CONFIGS.items():
    got = dict(image_size=image_size, num_channels=model.num_channels,
               channel_mult=tuple(model.channel_mult), num_res_blocks=model.num_res_blocks,
               attention_resolutions=tuple(model.attention_resolutions))
    if got == want:
      return name
  return None


def run(python: str, what: str, cfg: str, size: int, repeats: int,
        folder: str = '') -> dict[str, Any]:
  """The official script's JSON line: `what` 'train' (size = batch) -> images_per_s,
  median_s; 'sample' (size = rows of one reverse step) -> median_s."""
  folder = folder or os.environ.get('CIMD_TORCH_SPEED', DEFAULT_DIR)
  script, arg = {'train': ('torch_train_step.py', '--batch'),
                 'sample': ('torch_reverse_step.py', '--rows')}[what]
  path = os.path.join(folder, script)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found (set --torch_speed_dir or $CIMD_TORCH_SPEED)')
  out = subprocess.run([python, path, '--cfg', cfg, arg, str(size), '--repeats',
                        str(repeats)], cwd=folder, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(f'{script} failed: {out.stderr.strip()[-500:]}')
  return json.loads([line for line in out.stdout.splitlines() if line.startswith('{')][-1])
