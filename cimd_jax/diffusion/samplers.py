"""Reverse-process samplers: ancestral DDPM (all T or respaced K steps) and DDIM
(over 250 lines because the scanned sampler, its loop reference and the chunked
ensemble share one step function and one key scheme).

Each sampler is one `jax.lax.scan` over the steps of a `DiffusionTables` (full or
respaced) inside one jit. At every step the conditioning image is concatenated to
the current noisy mask and the network is called as
`apply_fn(params, concat([image, x_t], -1), t_orig)` with
`t_orig = tables.timestep_map[i]` broadcast to int32 [R].

Random numbers are per row, so a row's result never depends on which other rows
share its batch or chunk:
  * x_T for row r is `normal(fold_in(row_keys[r], X_T_FOLD))`, `X_T_FOLD = 2**31 - 1`
    (a constant, so different samplers/step counts start from the same x_T);
  * the noise added at step i (the index into `tables`, K-1 down to 0) is
    `normal(fold_in(row_keys[r], i))`.
Ensembles (`sample_ensemble`) use `row_key = fold_in(fold_in(key, image_index), n)`
for sample n of image `image_index = first_image_index + b`.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cimd_jax.diffusion import gaussian
from cimd_jax.diffusion import schedule
from cimd_jax.diffusion.schedule import DiffusionTables

ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
SAMPLERS = ('ddpm', 'ddim')
X_T_FOLD = 2**31 - 1


def sampler_from_name(betas: np.ndarray, steps: str | int = '',
                      sampler: str = 'ddpm') -> tuple[DiffusionTables, str]:
  """Maps config strings to (tables, sampler kind).

  Args:
    betas: float [T], the training schedule.
    steps: '' (or T) = all T steps; '100' or '10,10,5' = improved-DDPM respacing;
      'ddim50' = every stride-th step (exactly 50 steps; needs sampler='ddim').
    sampler: 'ddpm' (ancestral) or 'ddim'.

  Returns:
    (tables over the kept steps, sampler kind).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'sampler must be one of {SAMPLERS}, got {sampler!r}')
  steps = str(steps).strip()
  if steps.startswith('ddim') and sampler != 'ddim':
    raise ValueError(f"steps={steps!r} is a DDIM spacing; use sampler='ddim'")
  if not steps or steps == str(len(betas)):
    return schedule.make_tables(betas), sampler
  return schedule.respaced_tables(betas, steps), sampler


def _num_keys(keys: jax.Array) -> int:
  """Number of keys in a typed key array [R] or a raw uint32 key array [R, 2]."""
  if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    assert keys.ndim == 1, keys.shape
  else:
    assert keys.ndim == 2 and keys.dtype == jnp.uint32, (keys.shape, keys.dtype)
  return keys.shape[0]


def _row_normal(row_keys: jax.Array, fold: jax.Array | int, shape: tuple[int, ...]
                ) -> jax.Array:
  """Standard normal [R, *shape], row r from `fold_in(row_keys[r], fold)`."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, fold), shape,
                                              jnp.float32))(row_keys)


def initial_noise(row_keys: jax.Array, mask_shape: tuple[int, int, int]) -> jax.Array:
  """x_T [R, H, W, 1]: row r is `normal(fold_in(row_keys[r], X_T_FOLD))`."""
  return _row_normal(row_keys, X_T_FOLD, mask_shape)


def _step(apply_fn: ApplyFn, params: Any, tables: DiffusionTables, image: jax.Array,
          row_keys: jax.Array, x_t: jax.Array, i: jax.Array, *, sampler: str,
          variance: str, eta: jax.Array | float, clip_denoised: bool) -> jax.Array:
  """One reverse step from table index i: x_t [R, H, W, 1] -> x_{i-1} [R, H, W, 1]."""
  r = x_t.shape[0]
  assert image.ndim == 4 and image.shape[:3] == x_t.shape[:3], (image.shape, x_t.shape)
  assert x_t.shape[-1] == 1, x_t.shape
  i = jnp.asarray(i, jnp.int32)
  t_idx = jnp.full((r,), i, jnp.int32)
  t_orig = jnp.full((r,), tables.timestep_map[i], jnp.int32)
  model_out = apply_fn(params, jnp.concatenate([image, x_t], axis=-1), t_orig)
  assert model_out.shape[:3] == x_t.shape[:3], (model_out.shape, x_t.shape)
  model_out = model_out.astype(jnp.float32)
  out = gaussian.p_mean_variance(tables, model_out, x_t, t_idx, variance, clip_denoised)
  noise = _row_normal(row_keys, i, x_t.shape[1:])
  nonzero = (i > 0).astype(jnp.float32)
  if sampler == 'ddpm':
    x_prev = out['mean'] + nonzero * jnp.exp(0.5 * out['log_variance']) * noise
  elif sampler == 'ddim':
    # Song et al. eq. 12, with eps re-derived from the (clipped) x_0 prediction.
    eps = gaussian.predict_eps_from_xstart(tables, x_t, t_idx, out['pred_xstart'])
    ab = tables.alphas_cumprod[i]
    ab_prev = tables.alphas_cumprod_prev[i]
    sigma = (eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab))
             * jnp.sqrt(jnp.maximum(1.0 - ab / ab_prev, 0.0)))
    x_prev = (out['pred_xstart'] * jnp.sqrt(ab_prev)
              + jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0)) * eps
              + nonzero * sigma * noise)
  else:
    raise ValueError(f'sampler must be one of {SAMPLERS}, got {sampler!r}')
  assert x_prev.shape == x_t.shape, (x_prev.shape, x_t.shape)
  return x_prev.astype(jnp.float32)


def _check_inputs(tables: DiffusionTables, image: jax.Array, row_keys: jax.Array,
                  sampler: str, variance: str) -> None:
  if sampler not in SAMPLERS:
    raise ValueError(f'sampler must be one of {SAMPLERS}, got {sampler!r}')
  if variance not in gaussian.VARIANCES:
    raise ValueError(f'variance must be one of {gaussian.VARIANCES}, got {variance!r}')
  assert image.ndim == 4, image.shape
  assert _num_keys(row_keys) == image.shape[0], (row_keys.shape, image.shape)
  assert tables.timestep_map.shape == (tables.num_timesteps,), tables.timestep_map.shape


def sample(apply_fn: ApplyFn, params: Any, tables: DiffusionTables, image: jax.Array,
           row_keys: jax.Array, *, sampler: str = 'ddpm', variance: str = 'learned_range',
           eta: jax.Array | float = 0.0, clip_denoised: bool = True) -> jax.Array:
  """Runs the reverse process for R rows: one `lax.scan` over the steps of `tables`.

  Jit-able with `apply_fn`, `sampler`, `variance`, `clip_denoised` static (`sample_jit`
  is that jit); params, tables, image, row_keys and eta are traced.

  Args:
    apply_fn: `(params, x [R, H, W, C+1], t_orig int32 [R]) -> [R, H, W, 1 or 2]`.
    params: the network's parameters (any pytree).
    tables: full or respaced tables; steps run from K-1 down to 0.
    image: [R, H, W, C] conditioning images in [-1, 1], one per row.
    row_keys: [R] typed PRNG keys (or [R, 2] raw uint32 keys), one per row.
    sampler: 'ddpm' (ancestral) or 'ddim'.
    variance: 'learned_range' | 'fixed_small' | 'fixed_large' (DDPM's step variance;
      DDIM uses only the eps / x_0 prediction).
    eta: DDIM noise scale (0 = deterministic); ignored by 'ddpm'.
    clip_denoised: clip each x_0 prediction to [-1, 1].

  Returns:
    x_0 float32 [R, H, W, 1].
  """
  _check_inputs(tables, image, row_keys, sampler, variance)
  r, h, w, _ = image.shape
  image = image.astype(jnp.float32)
  x_t = initial_noise(row_keys, (h, w, 1))

  def body(x, i):
    return _step(apply_fn, params, tables, image, row_keys, x, i, sampler=sampler,
                 variance=variance, eta=eta, clip_denoised=clip_denoised), None

  steps = jnp.arange(tables.num_timesteps - 1, -1, -1, dtype=jnp.int32)
  x0, _ = jax.lax.scan(body, x_t, steps)
  assert x0.shape == (r, h, w, 1), x0.shape
  return x0


_SAMPLE_STATIC = ('apply_fn', 'sampler', 'variance', 'clip_denoised')
sample_jit = jax.jit(sample, static_argnames=_SAMPLE_STATIC)


@functools.cache
def _sample_jit_with(options: tuple[tuple[str, str], ...]) -> Callable[..., jax.Array]:
  """`sample_jit` compiled with XLA compiler options `options` ((key, value) pairs)."""
  return jax.jit(sample, static_argnames=_SAMPLE_STATIC, compiler_options=dict(options))


def sample_reference_loop(apply_fn: ApplyFn, params: Any, tables: DiffusionTables,
                          image: jax.Array, row_keys: jax.Array, *, sampler: str = 'ddpm',
                          variance: str = 'learned_range', eta: float = 0.0,
                          clip_denoised: bool = True) -> jax.Array:
  """Same as `sample` (same steps, same keys) with a plain Python loop; for tests."""
  _check_inputs(tables, image, row_keys, sampler, variance)
  _, h, w, _ = image.shape
  image = jnp.asarray(image, jnp.float32)
  x = initial_noise(row_keys, (h, w, 1))
  for i in reversed(range(tables.num_timesteps)):
    x = _step(apply_fn, params, tables, image, row_keys, x, i, sampler=sampler,
              variance=variance, eta=eta, clip_denoised=clip_denoised)
  return x


def _ensemble_keys(key: jax.Array, first_image_index: jax.Array, num_images: int,
                   num_samples: int) -> jax.Array:
  """Row keys [B * N] (or [B * N, 2] raw), row b * N + n = fold_in(fold_in(key, first + b), n)."""
  image_ids = first_image_index + jnp.arange(num_images, dtype=jnp.int32)
  keys = jax.vmap(lambda b: jax.vmap(
      lambda n: jax.random.fold_in(jax.random.fold_in(key, b), n))(
          jnp.arange(num_samples, dtype=jnp.int32)))(image_ids)
  return keys.reshape((num_images * num_samples,) + keys.shape[2:])


_ensemble_keys_jit = jax.jit(_ensemble_keys, static_argnums=(2, 3))


def ensemble_chunk_rows(num_rows: int, max_batch: int) -> int:
  """Rows per compiled call: `min(max_batch, num_rows)` (at least 1)."""
  return max(1, min(int(max_batch), int(num_rows)))


def sample_ensemble(apply_fn: ApplyFn, params: Any, tables: DiffusionTables,
                    images: jax.Array, key: jax.Array, num_samples: int, max_batch: int,
                    *, first_image_index: int | jax.Array = 0, sampler: str = 'ddpm',
                    variance: str = 'learned_range', eta: float = 0.0,
                    clip_denoised: bool = True,
                    compiler_options: dict[str, str] | None = None) -> jax.Array:
  """N samples for each of B images, in chunks of at most `max_batch` rows.

  Rows are the (b, n) pairs, b-major, with row key
  `fold_in(fold_in(key, first_image_index + b), n)`, so image b's samples depend only
  on (key, first_image_index + b, n): not on the batch it arrives in nor on
  `max_batch`. The B * N rows run through `sample_jit` in chunks of
  `ensemble_chunk_rows(B * N, max_batch)` rows; the last chunk is padded to that size
  (and the padding dropped), so all chunks share one compiled function, and calls with
  the same chunk size, image shape and static arguments never recompile.

  Args:
    apply_fn: `(params, x [R, H, W, C+1], t_orig int32 [R]) -> [R, H, W, 1 or 2]`;
      keep the same function object across calls to reuse the compilation.
    images: [B, H, W, C] in [-1, 1].
    key: PRNG key (typed or raw).
    num_samples: N >= 1.
    max_batch: most rows per compiled call.
    first_image_index: global index of images[0] (int or traced int32 scalar).
    sampler, variance, eta, clip_denoised: as in `sample`.
    compiler_options: XLA compiler options of the compiled sampler (e.g. the UNet's
      `models.conv.compiler_options`), or None.

  Returns:
    x_0 float32 [B, N, H, W, 1]; masks are `masks_from_x0(x0)`.
  """
  images = jnp.asarray(images, jnp.float32)
  assert images.ndim == 4, images.shape
  b, h, w, c = images.shape
  n = int(num_samples)
  assert n >= 1 and b >= 1, (n, b)
  if isinstance(first_image_index, (int, np.integer)):
    assert first_image_index >= 0, first_image_index
  rows = b * n
  row_keys = _ensemble_keys_jit(key, jnp.asarray(first_image_index, jnp.int32), b, n)
  row_images = jnp.repeat(images, n, axis=0)
  chunk = ensemble_chunk_rows(rows, max_batch)
  pad = (-rows) % chunk
  if pad:
    row_images = jnp.concatenate([row_images, jnp.zeros((pad, h, w, c), jnp.float32)])
    row_keys = jnp.concatenate([row_keys, jnp.repeat(row_keys[:1], pad, axis=0)])
  eta = jnp.asarray(eta, jnp.float32)
  run = (_sample_jit_with(tuple(sorted(compiler_options.items()))) if compiler_options
         else sample_jit)
  outs = [run(apply_fn, params, tables, row_images[s:s + chunk],
                     row_keys[s:s + chunk], sampler=sampler, variance=variance, eta=eta,
                     clip_denoised=clip_denoised)
          for s in range(0, rows + pad, chunk)]
  x0 = jnp.concatenate(outs, axis=0)[:rows].reshape(b, n, h, w, 1)
  return x0


def masks_from_x0(x0: jax.Array) -> jax.Array:
  """Binary masks from samples in [-1, 1]: bool, same shape (e.g. [B, N, H, W, 1]), x0 > 0."""
  return x0 > 0


def reverse_step(apply_fn: ApplyFn, params: Any, tables: DiffusionTables, image: jax.Array,
                 row_keys: jax.Array, x_t: jax.Array, i: jax.Array, *, sampler: str = 'ddpm',
                 variance: str = 'learned_range', eta: float = 0.0,
                 clip_denoised: bool = True) -> jax.Array:
  """One reverse step (the body of the scan) from table index i, for benchmarks:
  x_t [R, H, W, 1] -> x_{i-1} [R, H, W, 1]."""
  return _step(apply_fn, params, tables, image, row_keys, x_t, i, sampler=sampler,
               variance=variance, eta=eta, clip_denoised=clip_denoised)
