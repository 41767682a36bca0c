r"""Metrics for ambiguous segmentation: CI score, GED, HM-IoU, Dice/IoU, uncertainty maps
(over 250 lines because the exactness argument below covers the packing, the kernel
and the host matching together).

Per image there are M expert masks `Y_1..Y_M` (`gts`, bool `[M, H, W]`) and N predicted
masks `P_1..P_N` (`preds`, bool `[N, H, W]`); M and N may differ. With P = H·W pixels:

* `Dice(A, B) = 2|A∩B| / (|A| + |B|)`, 1 when both are empty.
* `IoU(A, B) = |A∩B| / |A∪B|`, 1 when both are empty.
* Combined sensitivity `S_c = TP / (TP + FN)` of `∪_j P_j` against `∪_i Y_i`;
  1 when `∪_i Y_i` is empty.
* Maximum Dice matching `D_max = (1/M) Σ_i max_j Dice(P_j, Y_i)`.
* Diversity agreement `D_a = 1 − (|V_max^Y − V_max^P| + |V_min^Y − V_min^P|) / 2`, where
  for a set of masks `V_min`, `V_max` are the minimum and maximum over *distinct* pairs
  (i ≠ j) of the pixel variance of the difference map `m_i − m_j` (values in {-1, 0, 1}),
  and both are 0 for a set of one mask. The variance is the population variance
  (ddof = 0, NumPy's `np.var` default). It follows exactly from counts: with
  `a = |A\B|`, `b = |B\A|`, the mean is `(a − b)/P`, the mean square `(a + b)/P`, so
  `var = (a + b)/P − ((a − b)/P)²`.
* `CI = 3·S_c·D_max·D_a / (S_c + D_max + D_a)`, 0 when the denominator is 0. This is
  the combination all public reimplementations use; it is NOT the textbook harmonic
  mean of the three, which would be `3 / (1/S_c + 1/D_max + 1/D_a)`.
* GED with `d = 1 − IoU`: `D²_GED = 2·mean_{i,j} d(P_j, Y_i) − mean_{j,j'} d(P_j, P_j')
  − mean_{i,i'} d(Y_i, Y_i')`, each mean over all ordered pairs including j = j'.
* HM-IoU: both sets repeated up to L = lcm(M, N) masks (expert i at rows i, i+M, ...,
  prediction j at columns j, j+N, ...), Hungarian-matched on cost `1 − IoU`
  (`scipy.optimize.linear_sum_assignment`, on the host), the mean matched IoU. When L
  exceeds `_MAX_ASSIGNMENT` the same optimum is found as the equivalent transportation
  problem (expert i supplies L/M, prediction j takes L/N; `scipy.optimize.linprog`),
  whose optimal vertex is integral, so the value is that of the repeated assignment.
* `dice_mean`: mean Dice of every prediction against every expert.

How it is computed: masks are bit-packed on the host (`np.packbits`, 32 pixels per
uint32 word, 8x less to transfer), and one jitted, vmapped kernel counts, per image,
`|m_k ∩ m_l|` for every pair of the M + N masks (the upper triangle of the pairwise
intersection-count matrix, its diagonal being the mask sizes) by AND + popcount,
plus the union counts for `S_c`. All counts are exact int32 (P ≤ 2^31); ratios are
formed from them in float32 (numerators and denominators are integers ≤ 2^24 for
masks up to 4096×4096, hence exact, each division correctly rounded), the variance as
`(q − r·(r/P))/P` with `q = a + b`, `r = a − b`, and means over pairs are pairwise
(tree) sums — GED's three means are taken on the host in float64 from the float32 IoU
matrices, since they nearly cancel (identical sets give exactly 0) — so every metric
agrees with a float64 computation to ~1e-7 for M, N ≤ 128 and masks up to 1024×1024. The
popcount is a SWAR bit count with per-byte partial sums (XLA on CPU vectorises it;
`lax.population_count` plus a reduce runs ~6x slower there).

Inputs may be bool, or integer/float arrays holding only 0 and 1 (NumPy or JAX);
anything else raises ValueError naming the argument and the shape given.
"""

import functools
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from scipy import optimize
from scipy import sparse

METRIC_KEYS = ('sc', 'dmax', 'da', 'ci', 'ged', 'hm_iou', 'dice_mean')

# Above this repeated-set size lcm(M, N), HM-IoU is solved as the equivalent
# transportation LP instead of an L x L assignment (same optimum, O(MN) variables).
_MAX_ASSIGNMENT = 512
# Words (of 32 pixels) whose per-byte bit counts are summed before widening:
# 16 words x 8 bits = 128 < 256, so no byte lane overflows.
_GROUP = 16
_WORD_BITS = 32
# Upper bound on the bytes of the pair-AND intermediate per jitted chunk of images.
_CHUNK_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------- input


def as_masks(x: Any, name: str, layout: str) -> np.ndarray:
  """Checks a mask array and returns it as NumPy bool with the layout's rank.

  Args:
    x: bool, integer or float array (NumPy or JAX) holding only 0 and 1.
    name: the argument's name for messages (`gts`, `preds`, `a`, ...).
    layout: the expected layout, e.g. '[M, H, W]' or '[B, N, H, W]'; its rank
      is the required number of dimensions and its third-from-last letter names
      the set size that must be > 0.

  Returns:
    bool array of the same shape.
  """
  letters = layout.strip('[]').split(', ')
  arr = np.asarray(x)
  if arr.ndim != len(letters):
    raise ValueError(f'{name}: expected a {len(letters)}-D mask array {layout}, '
                     f'got shape {arr.shape}')
  for letter, size in zip(letters, arr.shape):
    if size == 0:
      what = 'set of masks' if letter in ('M', 'N', 'K') else 'dimension'
      raise ValueError(f'{name}: empty {what} ({letter} = 0) in {layout}, '
                       f'got shape {arr.shape}')
  if arr.dtype == bool:
    return arr
  if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
    raise ValueError(f'{name}: masks must be bool, integer or float, got dtype '
                     f'{arr.dtype} with shape {arr.shape}')
  bad = (arr != 0) & (arr != 1)
  if bad.any():
    raise ValueError(f'{name}: values must be 0 or 1 (or bool), found {arr[bad][0].item()!r} '
                     f'(dtype {arr.dtype}) in shape {arr.shape}')
  return arr == 1


def _check_pair(gts: np.ndarray, preds: np.ndarray, batched: bool,
                names: tuple[str, str] = ('gts', 'preds')) -> None:
  """Same H x W (and same batch size B when `batched`) for the two mask arrays."""
  if gts.shape[-2:] != preds.shape[-2:]:
    raise ValueError(f'{names[0]} and {names[1]} must have the same H x W: '
                     f'{names[0]} shape {gts.shape}, {names[1]} shape {preds.shape}')
  if batched and gts.shape[0] != preds.shape[0]:
    raise ValueError(f'{names[0]} and {names[1]} must have the same batch size B: '
                     f'{names[0]} shape {gts.shape}, {names[1]} shape {preds.shape}')


def _pack(masks: np.ndarray) -> np.ndarray:
  """Bit-packs masks: bool [..., K, H, W] -> uint8 [..., K, 4·Wd], Wd a multiple of 16.

  The pixels of each mask are packed 8 per byte and zero padded to a multiple of
  `_GROUP` 32-bit words; padding bits are 0, so they change no count.
  """
  flat = masks.reshape(masks.shape[:-2] + (-1,))
  packed = np.packbits(flat, axis=-1)
  step = _GROUP * _WORD_BITS // 8
  pad = -packed.shape[-1] % step
  if pad:
    packed = np.pad(packed, [(0, 0)] * (packed.ndim - 1) + [(0, pad)])
  return packed


# ----------------------------------------------------------------------- jnp kernels


def _words(packed: jax.Array) -> jax.Array:
  """uint8 [..., 4·Wd] -> uint32 [..., Wd] (byte order is irrelevant to bit counts)."""
  return lax.bitcast_convert_type(packed.reshape(packed.shape[:-1] + (-1, 4)), jnp.uint32)


def _popcount_sum(words: jax.Array) -> jax.Array:
  """Number of set bits along the last axis: uint32 [..., Wd] (Wd % 16 == 0) -> int32 [...]."""
  u = lambda c: jnp.uint32(c)
  v = words - ((words >> u(1)) & u(0x55555555))
  v = (v & u(0x33333333)) + ((v >> u(2)) & u(0x33333333))
  v = (v + (v >> u(4))) & u(0x0F0F0F0F)  # four byte lanes, each <= 8
  v = v.reshape(v.shape[:-1] + (-1, _GROUP)).sum(-1, dtype=jnp.uint32)  # lanes <= 128
  v = (v & u(0x00FF00FF)) + ((v >> u(8)) & u(0x00FF00FF))  # two 16-bit lanes <= 256
  v = (v & u(0xFFFF)) + (v >> u(16))  # <= 512
  return v.astype(jnp.int32).sum(-1)


def _tree_sum(x: jax.Array) -> jax.Array:
  """Sum of all elements of x by pairwise (tree) addition: error O(log n · eps)."""
  flat = x.reshape(-1)
  size = 1 << max(0, (flat.shape[0] - 1).bit_length())
  flat = jnp.pad(flat, (0, size - flat.shape[0]))
  while flat.shape[0] > 1:
    half = flat.shape[0] // 2
    flat = flat[:half] + flat[half:]
  return flat[0]


def _tree_mean(x: jax.Array) -> jax.Array:
  return _tree_sum(x) / jnp.float32(x.size)


def _ratios(inter: jax.Array, size_a: jax.Array, size_b: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
  """(Dice, IoU) float32 from int32 counts: inter [A, B], size_a [A], size_b [B]."""
  total = size_a[:, None] + size_b[None, :]
  union = total - inter
  f = lambda c: c.astype(jnp.float32)
  dice = jnp.where(total == 0, 1.0, f(2 * inter) / f(jnp.maximum(total, 1)))
  iou = jnp.where(union == 0, 1.0, f(inter) / f(jnp.maximum(union, 1)))
  return dice, iou


def _variance_range(inter: jax.Array, sizes: jax.Array, num_pixels: int
                    ) -> tuple[jax.Array, jax.Array]:
  """(V_min, V_max) over distinct pairs of one set: inter [K, K], sizes [K] -> float32 ()."""
  k = sizes.shape[0]
  if k == 1:
    return jnp.float32(0.0), jnp.float32(0.0)
  only_a = sizes[:, None] - inter  # |A \ B|
  only_b = sizes[None, :] - inter  # |B \ A|
  q = (only_a + only_b).astype(jnp.float32)  # P · E[x²]
  r = (only_a - only_b).astype(jnp.float32)  # P · E[x]
  p = jnp.float32(num_pixels)
  var = (q - r * (r / p)) / p
  distinct = ~np.eye(k, dtype=bool)
  return (jnp.min(jnp.where(distinct, var, jnp.inf)),
          jnp.max(jnp.where(distinct, var, -jnp.inf)))


def _image_metrics(gt_packed: jax.Array, pred_packed: jax.Array, num_pixels: int
                   ) -> dict[str, jax.Array]:
  """All device-side metrics of one image from packed masks.

  Args:
    gt_packed: uint8 [M, 4·Wd] bit-packed expert masks (see `_pack`).
    pred_packed: uint8 [N, 4·Wd] bit-packed predictions.
    num_pixels: P = H·W (static).

  Returns:
    {'sc', 'dmax', 'da', 'ci', 'dice_mean'}: float32 scalars, and the IoU matrices
    'iou_gp' float32 [M, N] (expert i, prediction j: HM-IoU's cost and GED),
    'iou_gg' [M, M] and 'iou_pp' [N, N] (GED, formed on the host: `_device_metrics`).
  """
  m = gt_packed.shape[0]
  k = m + pred_packed.shape[0]
  words = _words(jnp.concatenate([gt_packed, pred_packed], 0))  # [K, Wd]
  # Intersection counts of every unordered pair (diagonal = sizes), then [K, K].
  rows, cols = np.triu_indices(k)
  pair_counts = _popcount_sum(words[rows] & words[cols])  # int32 [K(K+1)/2]
  index = np.zeros((k, k), np.int32)
  index[rows, cols] = np.arange(rows.size)
  index[cols, rows] = np.arange(rows.size)
  inter = pair_counts[index]  # [K, K]
  sizes = jnp.diagonal(inter)

  gt, pr = slice(0, m), slice(m, k)
  dice_gp, iou_gp = _ratios(inter[gt, pr], sizes[gt], sizes[pr])
  _, iou_gg = _ratios(inter[gt, gt], sizes[gt], sizes[gt])
  _, iou_pp = _ratios(inter[pr, pr], sizes[pr], sizes[pr])

  union_or = lambda w: lax.reduce(w, np.uint32(0), lax.bitwise_or, (0,))
  gt_union, pred_union = union_or(words[gt]), union_or(words[pr])
  positives = _popcount_sum(gt_union)
  true_pos = _popcount_sum(gt_union & pred_union)
  sc = jnp.where(positives == 0, 1.0,
                 true_pos.astype(jnp.float32) / jnp.maximum(positives, 1).astype(jnp.float32))

  dmax = _tree_mean(jnp.max(dice_gp, axis=1))
  vmin_gt, vmax_gt = _variance_range(inter[gt, gt], sizes[gt], num_pixels)
  vmin_pr, vmax_pr = _variance_range(inter[pr, pr], sizes[pr], num_pixels)
  da = 1.0 - (jnp.abs(vmax_gt - vmax_pr) + jnp.abs(vmin_gt - vmin_pr)) / 2.0
  denom = sc + dmax + da
  ci = jnp.where(denom == 0, 0.0, 3.0 * sc * dmax * da / jnp.where(denom == 0, 1.0, denom))

  return {'sc': sc, 'dmax': dmax, 'da': da, 'ci': ci, 'dice_mean': _tree_mean(dice_gp),
          'iou_gp': iou_gp, 'iou_gg': iou_gg, 'iou_pp': iou_pp}


@functools.partial(jax.jit, static_argnums=2)
def _batch_metrics(gt_packed: jax.Array, pred_packed: jax.Array, num_pixels: int
                   ) -> dict[str, jax.Array]:
  """`_image_metrics` over a batch: uint8 [B, M, 4·Wd], [B, N, 4·Wd] -> {key: [B, ...]}."""
  return jax.vmap(_image_metrics, in_axes=(0, 0, None))(gt_packed, pred_packed, num_pixels)


@jax.jit
def _cross_ratios(a_packed: jax.Array, b_packed: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Dice, IoU) float32 [A, B] of packed masks uint8 [A, 4·Wd] and [B, 4·Wd]."""
  wa, wb = _words(a_packed), _words(b_packed)
  inter = _popcount_sum(wa[:, None] & wb[None, :])
  return _ratios(inter, _popcount_sum(wa), _popcount_sum(wb))


# ------------------------------------------------------------------------ HM-IoU (host)


def _hm_iou_from_ious(ious: np.ndarray) -> float:
  """HM-IoU from the expert-by-prediction IoU matrix [M, N] (host, float64)."""
  ious = np.asarray(ious, np.float64)
  m, n = ious.shape
  size = math.lcm(m, n)
  if size <= _MAX_ASSIGNMENT:
    repeated = ious[np.arange(size) % m][:, np.arange(size) % n]
    rows, cols = optimize.linear_sum_assignment(1.0 - repeated)
    return float(repeated[rows, cols].mean())
  return _hm_iou_transport(ious)


def _hm_iou_transport(ious: np.ndarray) -> float:
  """HM-IoU as the transportation LP equivalent to the lcm-repeated assignment.

  Expert i is matched L/M times and prediction j L/N times; x_ij counts the matches
  of (i, j). The constraint matrix is totally unimodular, so an optimal vertex is
  integral and equals the repeated assignment's optimum.
  """
  m, n = ious.shape
  size = math.lcm(m, n)
  a_eq = sparse.vstack([sparse.kron(sparse.eye(m), np.ones((1, n))),
                        sparse.kron(np.ones((1, m)), sparse.eye(n))]).tocsr()
  b_eq = np.concatenate([np.full(m, size // m), np.full(n, size // n)]).astype(np.float64)
  res = optimize.linprog(-(ious.ravel()), A_eq=a_eq, b_eq=b_eq, bounds=(0, None),
                         method='highs')
  if not res.success:
    raise RuntimeError(f'HM-IoU transportation problem failed: {res.message}')
  plan = np.rint(res.x).reshape(m, n)
  if ((plan >= 0).all() and (plan.sum(1) == size // m).all()
      and (plan.sum(0) == size // n).all()):
    return float((plan * ious).sum() / size)
  return float(-res.fun / size)


# -------------------------------------------------------------------------- public API


def dice(a: Any, b: Any) -> jax.Array:
  """Pairwise Dice (1 when both masks are empty).

  Args:
    a: masks [A, H, W] or one mask [H, W] (bool, or 0/1 numbers).
    b: masks [B, H, W] or one mask [H, W].

  Returns:
    float32 [A, B]; the axis of a 2-D argument is dropped (two masks give a scalar).
  """
  return _pairwise(a, b)[0]


def iou(a: Any, b: Any) -> jax.Array:
  """Pairwise intersection over union (1 when both masks are empty).

  Args:
    a: masks [A, H, W] or one mask [H, W] (bool, or 0/1 numbers).
    b: masks [B, H, W] or one mask [H, W].

  Returns:
    float32 [A, B]; the axis of a 2-D argument is dropped (two masks give a scalar).
  """
  return _pairwise(a, b)[1]


def _pairwise(a: Any, b: Any) -> tuple[jax.Array, jax.Array]:
  arrays = []
  for name, x, letter in (('a', a, 'A'), ('b', b, 'B')):
    layout = '[H, W]' if np.ndim(x) == 2 else f'[{letter}, H, W]'
    arrays.append(as_masks(x, name, layout))
  ma, mb = arrays
  _check_pair(ma, mb, batched=False, names=('a', 'b'))
  dice_ab, iou_ab = _cross_ratios(_pack(ma.reshape((-1,) + ma.shape[-2:])),
                                  _pack(mb.reshape((-1,) + mb.shape[-2:])))
  index = (0 if ma.ndim == 2 else slice(None), 0 if mb.ndim == 2 else slice(None))
  return dice_ab[index], iou_ab[index]


def _device_metrics(gts: np.ndarray, preds: np.ndarray) -> dict[str, np.ndarray]:
  """Device-side metrics of checked bool masks [B, M, H, W], [B, N, H, W] (chunked)."""
  batch, m = gts.shape[:2]
  n = preds.shape[1]
  num_pixels = gts.shape[-1] * gts.shape[-2]
  gt_packed, pred_packed = _pack(gts), _pack(preds)
  words = gt_packed.shape[-1] // 4
  per_image = (m + n) * (m + n + 1) // 2 * words * 4
  cap = max(1, _CHUNK_BYTES // per_image)
  chunks = -(-batch // cap)
  chunk = -(-batch // chunks)  # equal chunks: one compile
  pad = chunks * chunk - batch
  if pad:
    gt_packed = np.concatenate([gt_packed, np.repeat(gt_packed[-1:], pad, 0)])
    pred_packed = np.concatenate([pred_packed, np.repeat(pred_packed[-1:], pad, 0)])
  outs = []
  for c in range(chunks):
    sl = slice(c * chunk, (c + 1) * chunk)
    outs.append(_batch_metrics(gt_packed[sl], pred_packed[sl], num_pixels))
  outs = jax.device_get(outs)
  out = {k: np.concatenate([o[k] for o in outs])[:batch] for k in outs[0]}
  # GED = 2(1 - mean IoU_gp) - (1 - mean IoU_pp) - (1 - mean IoU_gg), its means in
  # float64 here: they nearly cancel, and float32 means on the device left GED at
  # -2e-8 for two sets of identical (e.g. all empty) masks instead of 0.
  mean = lambda x: x.astype(np.float64).mean(axis=(1, 2))
  mean_gp = mean(out['iou_gp'])
  out['ged'] = (mean(out.pop('iou_pp')) - mean_gp) + (mean(out.pop('iou_gg')) - mean_gp)
  return out


def evaluate(gts: Any, preds: Any) -> dict[str, np.ndarray]:
  """Per-image metrics of a batch of images.

  Args:
    gts: expert masks [B, M, H, W] (bool, or integer/float holding only 0/1).
    preds: predicted masks [B, N, H, W]; N may differ from M.

  Returns:
    {'sc', 'dmax', 'da', 'ci', 'ged', 'hm_iou', 'dice_mean'}: float64 NumPy [B]
    (computed in float32 on device; hm_iou and ged from the float32 IoU matrices on
    the host, ged's means in float64).
  """
  gts = as_masks(gts, 'gts', '[B, M, H, W]')
  preds = as_masks(preds, 'preds', '[B, N, H, W]')
  _check_pair(gts, preds, batched=True)
  out = _device_metrics(gts, preds)
  ious = out.pop('iou_gp')
  out['hm_iou'] = np.array([_hm_iou_from_ious(x) for x in ious], np.float64)
  return {k: np.asarray(out[k], np.float64) for k in METRIC_KEYS}


def _single(gts: Any, preds: Any) -> dict[str, np.ndarray]:
  gts = as_masks(gts, 'gts', '[M, H, W]')
  preds = as_masks(preds, 'preds', '[N, H, W]')
  _check_pair(gts, preds, batched=False)
  return {k: v[0] for k, v in _device_metrics(gts[None], preds[None]).items()}


def ci_score(gts: Any, preds: Any) -> dict[str, float]:
  """CI score and its three parts for one image.

  Args:
    gts: expert masks [M, H, W] (bool, or integer/float holding only 0/1).
    preds: predicted masks [N, H, W].

  Returns:
    {'sc': S_c, 'dmax': D_max, 'da': D_a, 'ci': CI} as Python floats.
  """
  out = _single(gts, preds)
  return {k: float(out[k]) for k in ('sc', 'dmax', 'da', 'ci')}


def ged(gts: Any, preds: Any) -> float:
  """Squared generalised energy distance D²_GED (d = 1 − IoU) of one image.

  Args:
    gts: expert masks [M, H, W].
    preds: predicted masks [N, H, W].

  Returns:
    D²_GED as a Python float (means over all ordered pairs, j = j' included).
  """
  return float(_single(gts, preds)['ged'])


def hm_iou(gts: Any, preds: Any) -> float:
  """Hungarian-matched IoU of one image (both sets repeated to lcm(M, N)).

  Args:
    gts: expert masks [M, H, W].
    preds: predicted masks [N, H, W].

  Returns:
    The mean IoU of the optimal matching, a Python float.
  """
  return _hm_iou_from_ious(_single(gts, preds)['iou_gp'])


def summarize(per_image: dict[str, Any]) -> dict[str, dict[str, float]]:
  """Dataset figures from per-image metrics.

  Args:
    per_image: {metric: array [B]} as returned by `evaluate` (anything but 1-D is
      refused: a [B, K] array would count B * K images).

  Returns:
    {metric: {'mean', 'std', 'count'}}: mean and population std (ddof = 0) over the
    B images as floats, count = B as an int.
  """
  out = {}
  for key, values in per_image.items():
    v = np.asarray(values, np.float64)
    if v.ndim != 1:
      raise ValueError(f'summarize: {key!r} has shape {v.shape}; expected one value per '
                       'image, [B]')
    out[key] = {'mean': float(v.mean()) if v.size else float('nan'),
                'std': float(v.std()) if v.size else float('nan'),
                'count': int(v.size)}
  return out


def uncertainty_maps(preds: Any) -> tuple[jax.Array, jax.Array]:
  """Per-pixel foreground frequency and variance over an ensemble of masks.

  Args:
    preds: predicted masks [N, H, W] (bool, or integer/float holding only 0/1).

  Returns:
    (frequency, variance), float32 [H, W] each: frequency = (1/N) Σ_j P_j, and the
    population variance (ddof = 0) of the N binary values, frequency·(1 − frequency).
  """
  masks = as_masks(preds, 'preds', '[N, H, W]')
  counts = jnp.asarray(masks).astype(jnp.int32).sum(0).astype(jnp.float32)
  n = jnp.float32(masks.shape[0])
  frequency = counts / n
  return frequency, frequency * ((n - counts) / n)
