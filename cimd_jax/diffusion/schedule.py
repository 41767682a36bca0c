"""Beta schedules, the precomputed diffusion tables, and timestep respacing.

Everything here is computed once in float64 numpy and then cast to float32 `jnp`
arrays held by `DiffusionTables`, a `flax.struct.dataclass` (a pytree: it can be
passed straight into `jax.jit` as a traced argument).

Notation (Ho et al. 2020; Nichol & Dhariwal 2021): `alpha_t = 1 - beta_t`,
`alpha_bar_t = prod_{s <= t} alpha_s`, and the forward posterior
`q(x_{t-1} | x_t, x_0) = N(coef1_t x_0 + coef2_t x_t, beta_tilde_t)` with
`beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)`.

Respacing (improved DDPM, section 4): keep a subset S of the original steps and
define new betas `1 - alpha_bar_{s_k} / alpha_bar_{s_{k-1}}` so that `alpha_bar` at
every kept step is unchanged. The respaced tables index steps 0..K-1;
`timestep_map[k] = s_k` is the original step the network must be told.
"""

import math
from typing import Sequence

import flax
import jax.numpy as jnp
import numpy as np

_COSINE_S = 0.008
_MAX_BETA = 0.999


def get_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """Betas of a named schedule, float64 [T].

  Args:
    name: 'linear' (Ho et al., rescaled to T as in improved DDPM: with
      `scale = 1000 / T`, betas go linearly from `scale * 1e-4` to `scale * 0.02`,
      so T = 1000 gives the original 1e-4..0.02) or 'cosine' (Nichol & Dhariwal:
      `alpha_bar(s) = cos^2(((s + 0.008) / 1.008) * pi / 2)`, `beta_i = min(1 -
      alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)`).
    num_timesteps: T >= 1.

  Returns:
    betas float64 [T], each in (0, 1).
  """
  t = int(num_timesteps)
  if t < 1:
    raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}')
  if name == 'linear':
    scale = 1000.0 / t
    betas = np.linspace(scale * 1e-4, scale * 0.02, t, dtype=np.float64)
  elif name == 'cosine':
    def alpha_bar(s):
      return math.cos((s + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2
    betas = np.array([min(1.0 - alpha_bar((i + 1) / t) / alpha_bar(i / t), _MAX_BETA)
                      for i in range(t)], dtype=np.float64)
  else:
    raise ValueError(f"beta schedule must be 'linear' or 'cosine', got {name!r}")
  assert betas.shape == (t,), betas.shape
  if not (np.all(betas > 0) and np.all(betas < 1)):
    raise ValueError(f'{name} schedule with T={t} gives betas outside (0, 1): '
                     f'[{betas.min()}, {betas.max()}]; use more timesteps')
  return betas


@flax.struct.dataclass
class DiffusionTables:
  """Per-step constants of a (possibly respaced) diffusion, all float32 [T] except
  `timestep_map` (int32 [T]). Index them with the step index 0..T-1 of *these* tables;
  `timestep_map[i]` is the original timestep to feed the network."""
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  log_one_minus_alphas_cumprod: jnp.ndarray
  sqrt_recip_alphas_cumprod: jnp.ndarray
  sqrt_recipm1_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray
  posterior_mean_coef2: jnp.ndarray
  timestep_map: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    """T, the number of steps of these tables (static under jit)."""
    return self.betas.shape[0]


def make_tables(betas: np.ndarray | Sequence[float],
                timestep_map: np.ndarray | Sequence[int] | None = None) -> DiffusionTables:
  """All per-step constants for `betas`, computed in float64 then cast to float32.

  Args:
    betas: [T] in (0, 1).
    timestep_map: int [T], the original timestep of each step; identity when None.

  Returns:
    DiffusionTables with [T] arrays. `posterior_log_variance_clipped[0]` is
    `log(posterior_variance[1])` (the posterior variance is 0 at t = 0); with T = 1
    it falls back to `log(betas[0])`.
  """
  betas = np.asarray(betas, dtype=np.float64)
  assert betas.ndim == 1 and betas.shape[0] >= 1, betas.shape
  if not (np.all(betas > 0) and np.all(betas < 1)):
    raise ValueError(f'betas must lie in (0, 1), got [{betas.min()}, {betas.max()}]')
  t = betas.shape[0]
  if timestep_map is None:
    timestep_map = np.arange(t)
  timestep_map = np.asarray(timestep_map)
  assert timestep_map.shape == (t,), (timestep_map.shape, t)

  alphas = 1.0 - betas
  ac = np.cumprod(alphas)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  first = post_var[1] if t > 1 else betas[0]
  post_log_var_clipped = np.log(np.concatenate([[first], post_var[1:]]))
  f64 = dict(
      betas=betas,
      alphas_cumprod=ac,
      alphas_cumprod_prev=ac_prev,
      sqrt_alphas_cumprod=np.sqrt(ac),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
      log_one_minus_alphas_cumprod=np.log(1.0 - ac),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
      posterior_variance=post_var,
      posterior_log_variance_clipped=post_log_var_clipped,
      posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
      posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
  )
  for k, v in f64.items():
    assert v.shape == (t,) and np.all(np.isfinite(v)), (k, v.shape)
  return DiffusionTables(
      **{k: jnp.asarray(v, jnp.float32) for k, v in f64.items()},
      timestep_map=jnp.asarray(timestep_map, jnp.int32))


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
  """Which original steps to keep, as a sorted list.

  Args:
    num_timesteps: T of the original process.
    section_counts: one of
      * an int or '100': that many steps, evenly spaced (rounded) over 0..T-1,
        first and last step included;
      * '10,10,5': T is cut into as many equal sections (the first `T % n` one step
        longer) and each section keeps its count of evenly spaced steps, both ends of
        the section included (improved DDPM);
      * 'ddimK': every `stride`-th step from 0, with the integer stride that gives
        exactly K steps (so 'ddim50' of 1000 is 0, 20, ..., 980); ValueError when no
        integer stride gives exactly K.

  Returns:
    Sorted distinct ints in [0, T).
  """
  t = int(num_timesteps)
  assert t >= 1, t
  if isinstance(section_counts, str) and section_counts.startswith('ddim'):
    k = int(section_counts[len('ddim'):])
    if not 1 <= k <= t:
      raise ValueError(f'{section_counts!r}: need 1 <= K <= T={t}')
    for stride in range(1, t + 1):
      if len(range(0, t, stride)) == k:
        return list(range(0, t, stride))
    raise ValueError(f'{section_counts!r}: no integer stride gives exactly {k} of {t} steps')
  if isinstance(section_counts, str):
    counts = [int(c) for c in section_counts.split(',')]
  else:
    counts = [int(section_counts)]
  if not counts or any(c < 0 for c in counts):
    raise ValueError(f'bad section counts {section_counts!r}')
  base, extra = divmod(t, len(counts))
  kept = []
  start = 0
  for i, count in enumerate(counts):
    size = base + (1 if i < extra else 0)
    if count > size:
      raise ValueError(f'{section_counts!r}: cannot keep {count} steps of a section of '
                       f'{size} (T={t})')
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    kept.extend(start + int(round(j * stride)) for j in range(count))
    start += size
  kept = sorted(set(kept))
  if not kept:
    raise ValueError(f'{section_counts!r} keeps no steps')
  return kept


def respace(betas: np.ndarray, use_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Betas over the kept steps so that alpha_bar at every kept step is unchanged.

  Args:
    betas: float [T], the original schedule.
    use_timesteps: the original steps to keep (any order, no duplicates).

  Returns:
    (new_betas float64 [K], timestep_map int32 [K]) with `timestep_map` the sorted
    kept steps and `cumprod(1 - new_betas) == cumprod(1 - betas)[timestep_map]`.
  """
  betas = np.asarray(betas, dtype=np.float64)
  assert betas.ndim == 1, betas.shape
  kept = sorted(int(s) for s in use_timesteps)
  if not kept or len(set(kept)) != len(kept) or kept[0] < 0 or kept[-1] >= betas.shape[0]:
    raise ValueError(f'use_timesteps must be distinct steps in [0, {betas.shape[0]}), '
                     f'got {kept[:5]}...')
  ac = np.cumprod(1.0 - betas)
  prev = np.concatenate([[1.0], ac[kept][:-1]])
  new_betas = 1.0 - ac[kept] / prev
  timestep_map = np.asarray(kept, np.int32)
  assert new_betas.shape == timestep_map.shape == (len(kept),)
  return new_betas, timestep_map


def respaced_tables(betas: np.ndarray, section_counts: str | int) -> DiffusionTables:
  """`make_tables` over `space_timesteps(len(betas), section_counts)` ('100', 'ddim50')."""
  betas = np.asarray(betas, dtype=np.float64)
  new_betas, timestep_map = respace(betas, space_timesteps(betas.shape[0], section_counts))
  return make_tables(new_betas, timestep_map)
