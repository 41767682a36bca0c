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


# What both official scripts fix besides A/B: one attention head, no dropout, no
# up/down-sampling ResBlocks, float32 without rematerialisation; the train script also
# trains AMN and ACN (filters (32, 64, 128, 192), 3 convs per block, latent 6).
_COMMON = dict(num_heads=1, num_head_channels=-1, dropout=0.0, resblock_updown=False,
               use_scale_shift_norm=False, learn_sigma=True, compute_dtype='float32',
               remat=False)
_TRAIN = dict(ambiguity='trained', latent_filters=(32, 64, 128, 192),
              latent_convs_per_block=3, latent_dim=6)
THREADS = 2   # th.set_num_threads(2) in both scripts, CPU only


def official_config(model: ModelArgs, image_size: int, image_channels: int,
                    what: str = 'train') -> str | None:
  """'A' or 'B' when the configured model does the official script's work for `what`
  ('train': UNet + AMN + ACN; 'sample': the UNet), else None."""
  fixed = dict(_COMMON, **(_TRAIN if what == 'train' else {}))
  if image_channels != 4 or any(getattr(model, k) != v for k, v in fixed.items()):
    return None
  for name, want in _CONFIGS.items():
    got = dict(image_size=image_size, num_channels=model.num_channels,
               channel_mult=tuple(model.channel_mult), num_res_blocks=model.num_res_blocks,
               attention_resolutions=tuple(model.attention_resolutions))
    if got == want:
      return name
  return None


def not_comparable(backend: str, cores: int) -> str | None:
  """Why a ratio against the official scripts (THREADS CPU threads) would compare other
  hardware, or None when this run is on a CPU with that many cores."""
  if backend == 'cpu' and cores == THREADS:
    return None
  return (f'not comparable here: the official scripts run on {THREADS} CPU threads, '
          f'this run on {backend} with {cores} CPU cores')


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
