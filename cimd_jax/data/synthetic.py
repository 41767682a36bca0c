"""Built-in synthetic ambiguous segmentation dataset: generated from a seed, nothing
downloaded, designed so a small diffusion model can learn the ambiguity from the image
(over 250 lines because geometry, rendering, expert draws and the builder share the
case generator and must stay in step).

Each case (image_size H = W, 32/64/128 recommended, >= 16 accepted) holds, on a flat
background (intensity 0.30 of 1) with Gaussian noise (std 0.03):

- a **main lesion**: a bright ellipse (+0.55). Every expert draws it; each expert's
  boundary is drawn tighter or looser by up to 1 px (uniform in [-1, 1] px).
- 1 or 2 **ambiguous structures**: small faint discs. Each expert includes each one
  independently with probability p in {0.25, 0.5, 0.75}; p is readable from the
  image: the disc's contrast above background is 0.14, 0.26 or 0.38 for p = 0.25,
  0.5, 0.75. An included disc is drawn 0 to 0.5 px looser than its region (never
  tighter, so an included structure always covers its whole region).
- with probability 1/2 a **decoy**: a dark square (-0.18), clearly visible, that no
  expert ever draws (p = 0).

Objects never touch (>= 2 px gap), so boundary jitter never reaches another object.
Per case `structures` uint8 [S, H, W] (S = 3) holds the nominal region of each
ambiguous structure, then the decoy's, then empty padding; `structure_probs` float32
[S] their inclusion probability: p for ambiguous structures, 0 for the decoy, -1 for
padding (empty region).

Everything is deterministic per (synthetic_seed, split, index): `case_rng` seeds the
case; the case parameters are the first draws of that generator, so `oracle_masks`
can recreate a case and draw fresh expert masks for it from another seed.
"""

import dataclasses
import functools
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from cimd_jax.data import records
from cimd_jax.data.args import DataArgs, TEST, TRAIN, VALIDATION
from cimd_jax.utils.errors import ConfigError

GENERATOR_VERSION = 1
SPLIT_CODES = {TRAIN: 0, TEST: 1, VALIDATION: 2}
MIN_IMAGE_SIZE = 16
NUM_STRUCTURES = records.NUM_STRUCTURES
PROB_LEVELS = (0.25, 0.5, 0.75)
BACKGROUND = 0.30
NOISE_STD = 0.03
LESION_CONTRAST = 0.55
STRUCTURE_CONTRAST = {0.25: 0.14, 0.5: 0.26, 0.75: 0.38}
DECOY_CONTRAST = -0.18
DECOY_PROBABILITY = 0.5
LESION_JITTER_PX = 1.0
STRUCTURE_JITTER_PX = 0.5


@dataclasses.dataclass(frozen=True)
class Shape:
  """An ellipse (or, with square=True, an axis-aligned square of half-side ry).

  Attributes:
    cy, cx: centre, pixels (pixel centres are at integer coordinates).
    ry, rx: semi-axes, pixels.
    angle: rotation, radians.
    square: draw a square instead of an ellipse.
  """
  cy: float
  cx: float
  ry: float
  rx: float
  angle: float = 0.0
  square: bool = False

  @property
  def extent(self) -> float:
    """Radius of a circle that contains the shape."""
    return max(self.ry, self.rx) * (np.sqrt(2.0) if self.square else 1.0)


@dataclasses.dataclass(frozen=True)
class CaseParams:
  """The geometry of one case (everything but the noise and the expert draws)."""
  image_size: int
  lesion: Shape
  structures: tuple[Shape, ...]   # ambiguous structures
  probs: tuple[float, ...]        # their inclusion probabilities
  decoy: Shape | None


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[:size, :size].astype(np.float32)
  return yy, xx


def _norm_radius(shape: Shape, size: int, grow: float = 0.0) -> np.ndarray:
  """float32 [H, W]: 1 on the boundary of `shape` grown by `grow` px, < 1 inside."""
  yy, xx = _grid(size)
  dy, dx = yy - shape.cy, xx - shape.cx
  c, s = np.cos(shape.angle), np.sin(shape.angle)
  u, v = c * dy + s * dx, -s * dy + c * dx
  ry, rx = max(shape.ry + grow, 0.5), max(shape.rx + grow, 0.5)
  if shape.square:
    return np.maximum(np.abs(u) / ry, np.abs(v) / rx)
  return np.sqrt((u / ry) ** 2 + (v / rx) ** 2)


def region(shape: Shape, size: int, grow: float = 0.0) -> np.ndarray:
  """bool [H, W]: pixels whose centre lies inside `shape` grown by `grow` px."""
  return _norm_radius(shape, size, grow) <= 1.0


def _soft(shape: Shape, size: int) -> np.ndarray:
  """float32 [H, W] in [0, 1]: the shape with a ~1 px linear edge (anti-aliased)."""
  r = min(shape.ry, shape.rx)
  return np.clip((1.0 - _norm_radius(shape, size)) * r + 0.5, 0.0, 1.0)


def _place(rng: np.random.Generator, size: int, radius: float, taken: list[Shape],
           gap: float, tries: int = 60) -> tuple[float, float] | None:
  """A centre at least `gap` px from every shape in `taken` (None if none fits)."""
  lo, hi = radius + 1.0, size - 1.0 - radius - 1.0
  if hi <= lo:
    return None
  for _ in range(tries):
    cy, cx = rng.uniform(lo, hi, 2)
    if all(np.hypot(cy - t.cy, cx - t.cx) >= radius + t.extent + gap for t in taken):
      return float(cy), float(cx)
  return None


def sample_params(rng: np.random.Generator, image_size: int) -> CaseParams:
  """Draws the geometry of a case (always the first draws of a case's generator)."""
  if image_size < MIN_IMAGE_SIZE:
    raise ValueError(f'synthetic data needs image_size >= {MIN_IMAGE_SIZE}, got '
                     f'{image_size}')
  size = image_size
  gap = max(2.0 + LESION_JITTER_PX, 0.06 * size)
  ry, rx = rng.uniform(0.12, 0.19, 2) * size
  cy, cx = rng.uniform(0.3, 0.7, 2) * size
  lesion = Shape(float(cy), float(cx), float(ry), float(rx), float(rng.uniform(0, np.pi)))
  n_amb = int(rng.integers(1, 3))
  with_decoy = bool(rng.random() < DECOY_PROBABILITY)
  levels = rng.integers(0, len(PROB_LEVELS), n_amb)
  radii = np.maximum(rng.uniform(0.06, 0.09, n_amb + 1) * size, 1.5)
  taken = [lesion]
  structures, probs = [], []
  for k in range(n_amb):
    centre = _place(rng, size, float(radii[k]), taken, gap)
    if centre is None:
      continue
    shape = Shape(*centre, float(radii[k]), float(radii[k]))
    taken.append(shape)
    structures.append(shape)
    probs.append(PROB_LEVELS[int(levels[k])])
  decoy = None
  if with_decoy:
    half = float(radii[-1])
    centre = _place(rng, size, half * np.sqrt(2.0), taken, gap)
    if centre is not None:
      decoy = Shape(*centre, half, half, square=True)
  return CaseParams(size, lesion, tuple(structures), tuple(probs), decoy)


def render_image(params: CaseParams, rng: np.random.Generator,
                 image_channels: int = 1) -> np.ndarray:
  """The image, uint8 [H, W, C] (grayscale replicated to C channels)."""
  size = params.image_size
  img = np.full((size, size), BACKGROUND, np.float32)
  img += LESION_CONTRAST * _soft(params.lesion, size)
  for shape, p in zip(params.structures, params.probs):
    img += STRUCTURE_CONTRAST[p] * _soft(shape, size)
  if params.decoy is not None:
    img += DECOY_CONTRAST * _soft(params.decoy, size)
  img += NOISE_STD * rng.standard_normal((size, size)).astype(np.float32)
  img = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
  return np.repeat(img[..., None], image_channels, -1)


def draw_expert_masks(params: CaseParams, num: int, rng: np.random.Generator
                      ) -> np.ndarray:
  """`num` independent expert masks, uint8 [num, H, W] in {0, 1}."""
  size = params.image_size
  masks = np.zeros((num, size, size), np.uint8)
  for j in range(num):
    m = region(params.lesion, size, rng.uniform(-LESION_JITTER_PX, LESION_JITTER_PX))
    for shape, p in zip(params.structures, params.probs):
      grow = rng.uniform(0.0, STRUCTURE_JITTER_PX)  # never tighter: covers its region
      if rng.random() < p:
        m |= region(shape, size, grow)
    masks[j] = m
  return masks


def structure_fields(params: CaseParams) -> tuple[np.ndarray, np.ndarray]:
  """(structures uint8 [S, H, W], structure_probs float32 [S]): ambiguous structures,
  then the decoy (p = 0), then padding (empty, p = -1)."""
  size = params.image_size
  regions = np.zeros((NUM_STRUCTURES, size, size), np.uint8)
  probs = np.full((NUM_STRUCTURES,), -1.0, np.float32)
  shapes = list(zip(params.structures, params.probs))
  if params.decoy is not None:
    shapes.append((params.decoy, 0.0))
  for k, (shape, p) in enumerate(shapes):
    regions[k] = region(shape, size)
    probs[k] = p
  return regions, probs


def case_rng(synthetic_seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of case `index` of `split`."""
  if split not in SPLIT_CODES:
    raise ValueError(f'unknown split {split!r}; expected one of {tuple(SPLIT_CODES)}')
  return np.random.default_rng([GENERATOR_VERSION, synthetic_seed, SPLIT_CODES[split],
                                index])


def generate_case(rng: np.random.Generator, image_size: int, num_annotators: int,
                  image_channels: int = 1) -> dict[str, np.ndarray]:
  """One case from `rng` (see `case_rng`).

  Returns:
    image uint8 [H, W, C], masks uint8 [A, H, W] in {0, 1}, structures uint8
    [S, H, W] in {0, 1}, structure_probs float32 [S].
  """
  params = sample_params(rng, image_size)
  image = render_image(params, rng, image_channels)
  masks = draw_expert_masks(params, num_annotators, rng)
  structures, probs = structure_fields(params)
  return {'image': image, 'masks': masks, 'structures': structures,
          'structure_probs': probs}


def case_id(split: str, index: int) -> str:
  return f'{split}_{index:05d}'


def make_case(args: DataArgs, split: str, index: int) -> dict[str, Any]:
  """The record of case `index` of `split` (what the builder writes)."""
  case = generate_case(case_rng(args.synthetic_seed, split, index), args.image_size,
                       args.num_annotators, args.image_channels)
  case['case_id'] = case_id(split, index)
  return case


def oracle_masks(args: DataArgs, split: str, index: int, num_draws: int,
                 seed: int) -> np.ndarray:
  """Fresh expert masks for case `index` of `split`: uint8 [num_draws, H, W] in {0, 1}.

  Same image and geometry as the stored case; new expert draws from `seed` (the
  "expert oracle" baseline: what a perfect model of the experts would sample).
  """
  params = sample_params(case_rng(args.synthetic_seed, split, index), args.image_size)
  rng = np.random.default_rng([GENERATOR_VERSION, seed, args.synthetic_seed,
                               SPLIT_CODES[split], index, 0x0AC1E])
  return draw_expert_masks(params, num_draws, rng)


def split_sizes(args: DataArgs) -> dict[str, int]:
  """split -> number of cases. 'validation' (when validation_fraction > 0) is its own
  generated split of round(fraction * synthetic_num_train) cases (>= 1); 'train'
  keeps synthetic_num_train cases."""
  if args.synthetic_num_train < 1 or args.synthetic_num_test < 1:
    raise ConfigError('data.synthetic_num_train and data.synthetic_num_test must be >= 1, '
                     f'got {args.synthetic_num_train} and {args.synthetic_num_test}')
  sizes = {TRAIN: args.synthetic_num_train, TEST: args.synthetic_num_test}
  if args.validation_fraction > 0:
    sizes[VALIDATION] = max(1, int(round(args.validation_fraction *
                                         args.synthetic_num_train)))
  return sizes


def builder_params(args: DataArgs) -> dict[str, Any]:
  """Every parameter that changes the records (hashed into the config name)."""
  return {
      'kind': 'cimd_synthetic',
      'generator_version': GENERATOR_VERSION,
      'synthetic_seed': args.synthetic_seed,
      'image_size': args.image_size,
      'image_channels': args.image_channels,
      'num_annotators': args.num_annotators,
      'splits': split_sizes(args),
      'format': records.VERSION,
  }


class CimdSynthetic(records.CimdBuilder, skip_registration=True):
  """The synthetic dataset -> ArrayRecord. Build with `make_builder`."""

  def _info(self) -> tfds.core.DatasetInfo:
    p = self.builder_config.params
    return records.dataset_info(
        self,
        'cimd_jax synthetic ambiguous segmentation dataset',
        records.features(p['image_size'], p['image_channels'],
                                  p['num_annotators'], with_structures=True))

  def _split_generators(self, dl_manager):
    del dl_manager
    args = self.builder_config.payload
    records.write_params(self.data_dir, self.builder_config.params)
    return {split: self._generate_examples(args, split, n)
            for split, n in split_sizes(args).items()}

  def _generate_examples(self, args: DataArgs, split: str, num: int
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    for index in range(num):
      yield index, make_case(args, split, index)


def make_builder(args: DataArgs, tfds_dir: str) -> CimdSynthetic:
  """The builder of `args`."""
  if args.image_size < MIN_IMAGE_SIZE:
    raise ConfigError(f'synthetic data needs data.image_size >= {MIN_IMAGE_SIZE}, got '
                     f'{args.image_size}')
  params = builder_params(args)
  prefix = f's{args.image_size}_c{args.image_channels}_a{args.num_annotators}'
  config = records.CimdConfig(name=records.config_name(prefix, params), params=params,
                              payload=args)
  return CimdSynthetic(config=config, data_dir=tfds_dir)
