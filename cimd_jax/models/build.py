"""The one place that builds CIMD's three networks (UNet, AMN, ACN) and inits their
parameters, from the `model` config group (`ModelArgs`) and the image shape."""

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cimd_jax.models import conv
from cimd_jax.models.latent import AxisAlignedConvGaussian
from cimd_jax.models.unet import UNet
from cimd_jax.utils import config_args as ca

# How the AMN/ACN pair takes part in training (docs/ablations.md measures them):
#   trained: AMN and ACN optimised jointly with the UNet (the paper's text);
#   frozen:  both stay at their random initialisation (the official code's actual
#            behaviour): the KL is a random-feature matching loss on x_hat_0;
#   target:  the AMN stays at its random initialisation (a fixed target that differs
#            between expert masks), the ACN is trained: cannot collapse to a constant;
#   off:     no AMN/ACN and no KL term (a plain conditional diffusion model).
AMBIGUITY_MODES = ('trained', 'frozen', 'target', 'off')
COMPUTE_DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class ModelArgs:
  """The `model` config group: the denoiser's and the AMN/ACN's architecture.

  UNet (guided diffusion, see `unet.UNet`): num_channels, channel_mult,
  num_res_blocks, attention_resolutions (feature-map sizes in pixels), num_heads /
  num_head_channels (>0 overrides num_heads), dropout, use_scale_shift_norm,
  resblock_updown, learn_sigma (a second output channel v for the learned-range
  variance), detach_variance (v's gradient stops at the output conv: the VLB, which
  trains only v, then cannot move the layers the x_0 / eps channel is computed from;
  the output is the same either way, and compiled forward passes hold the output
  conv once. Without it the VLB's gradient at t <= 5, larger than the mean-squared
  term's, spoilt x_0 predictions at the smallest t and made the 1000-step ancestral
  chain erode masks: docs/samplers.md). AMN/ACN (`latent.AxisAlignedConvGaussian`):
  latent_dim, latent_filters, latent_convs_per_block; `ambiguity` (one of AMBIGUITY_MODES). Compute:
  compute_dtype ('float32' | 'bfloat16'; parameters stay float32), remat
  (rematerialise UNet blocks in the backward pass), conv_impl (how convolutions
  are computed, same parameters and function either way, models/conv.py: 'auto' =
  the measured choice per backend, 'eigen' on CPU and 'xla' elsewhere | 'xla' |
  'eigen' | 'im2col' | 'shifted').
  """
  num_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4)
  num_res_blocks: int = 2
  attention_resolutions: tuple[int, ...] = (16,)
  num_heads: int = 1
  num_head_channels: int = -1
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  learn_sigma: bool = True
  detach_variance: bool = False
  latent_dim: int = 6
  latent_filters: tuple[int, ...] = (32, 64, 128, 192)
  latent_convs_per_block: int = 3
  ambiguity: str = 'trained'
  compute_dtype: str = 'float32'
  remat: bool = False
  conv_impl: str = 'auto'

  def __post_init__(self):
    ca.check_int('model.num_channels', self.num_channels, 1, 4096)
    ca.check_int_tuple('model.channel_mult', self.channel_mult)
    ca.check_int('model.num_res_blocks', self.num_res_blocks, 1, 16)
    ca.check_int_tuple('model.attention_resolutions', self.attention_resolutions,
                       nonempty=False)
    ca.check_int('model.num_heads', self.num_heads, 1, 64)
    ca.check_int('model.num_head_channels', self.num_head_channels, 1, 4096, allow=(-1,))
    ca.check_float('model.dropout', self.dropout, 0.0, 1.0, high_open=True)
    ca.check_bool('model.use_scale_shift_norm', self.use_scale_shift_norm)
    ca.check_bool('model.resblock_updown', self.resblock_updown)
    ca.check_bool('model.learn_sigma', self.learn_sigma)
    ca.check_bool('model.detach_variance', self.detach_variance)
    ca.check_int('model.latent_dim', self.latent_dim, 1, 1024)
    ca.check_int_tuple('model.latent_filters', self.latent_filters)
    ca.check_int('model.latent_convs_per_block', self.latent_convs_per_block, 1, 16)
    ca.check_choice('model.ambiguity', self.ambiguity, AMBIGUITY_MODES)
    ca.check_choice('model.compute_dtype', self.compute_dtype, COMPUTE_DTYPES)
    ca.check_bool('model.remat', self.remat)
    ca.check_choice('model.conv_impl', self.conv_impl, ('auto',) + conv.IMPLS)
    for width in (self.num_channels * m for m in self.channel_mult):
      if self.num_head_channels > 0 and width % self.num_head_channels:
        ca.fail('model.num_head_channels', self.num_head_channels,
                f'a divisor of every level width ({width} is not a multiple)')

  def check_image_size(self, image_size: int) -> None:
    """Raises ConfigError unless the UNet's levels divide `image_size` and every
    attention resolution is one of their feature-map sizes (one that is not would
    silently give a UNet without that attention)."""
    levels = len(self.channel_mult)
    if image_size % 2 ** (levels - 1):
      ca.fail('data.image_size', image_size,
              f'a multiple of 2**{levels - 1} for the {levels} levels of '
              f'model.channel_mult={self.channel_mult}')
    sizes = tuple(image_size // 2 ** k for k in range(levels))
    for res in self.attention_resolutions:
      if res not in sizes:
        ca.fail('model.attention_resolutions', tuple(self.attention_resolutions),
                f'feature-map sizes of the UNet at data.image_size={image_size}: some of '
                f'{sizes} ({res} is none of them)')

  @property
  def has_latent_nets(self) -> bool:
    """Whether the AMN/ACN exist (every mode but 'off')."""
    return self.ambiguity != 'off'


class Networks(NamedTuple):
  """The Flax modules; params live apart as {'unet', 'amn', 'acn'} ('unet' only when
  `ambiguity` is 'off'). `ambiguity` is ModelArgs.ambiguity."""
  unet: nn.Module
  amn: nn.Module | None
  acn: nn.Module | None
  ambiguity: str


def build_unet(model: ModelArgs, image_size: int) -> UNet:
  """The UNet: apply(x [B, H, W, C+1], t int32 [B], train) -> [B, H, W, 1|2]."""
  model.check_image_size(image_size)
  return UNet(
      image_size=image_size,
      num_channels=model.num_channels,
      channel_mult=tuple(model.channel_mult),
      num_res_blocks=model.num_res_blocks,
      attention_resolutions=tuple(model.attention_resolutions),
      num_heads=model.num_heads,
      num_head_channels=model.num_head_channels,
      dropout=model.dropout,
      use_scale_shift_norm=model.use_scale_shift_norm,
      resblock_updown=model.resblock_updown,
      learn_sigma=model.learn_sigma,
      detach_variance=model.detach_variance,
      remat=model.remat,
      dtype=model.compute_dtype,
      conv_impl=conv.resolve_impl(model.conv_impl),
  )


def build_latent_net(model: ModelArgs, image_channels: int) -> AxisAlignedConvGaussian:
  """An AMN/ACN over the image plus one mask channel:
  apply(x [B, H, W, image_channels + 1]) -> (mean [B, L], log_sigma [B, L])."""
  return AxisAlignedConvGaussian(filters=tuple(model.latent_filters),
                                 convs_per_block=model.latent_convs_per_block,
                                 latent_dim=model.latent_dim,
                                 input_channels=image_channels + 1,
                                 conv_impl=conv.resolve_impl(model.conv_impl))


def build_networks(model: ModelArgs, image_size: int, image_channels: int) -> Networks:
  """UNet, AMN and ACN (AMN and ACN share the architecture, not the parameters;
  neither exists when model.ambiguity is 'off')."""
  unet = build_unet(model, image_size)
  if not model.has_latent_nets:
    return Networks(unet=unet, amn=None, acn=None, ambiguity=model.ambiguity)
  return Networks(unet=unet, amn=build_latent_net(model, image_channels),
                  acn=build_latent_net(model, image_channels), ambiguity=model.ambiguity)


def init_params(networks: Networks, rng: jax.Array, image_size: int,
                image_channels: int) -> dict[str, Any]:
  """Fresh float32 parameters {'unet': ..., 'amn': ..., 'acn': ...} (AMN/ACN only
  when the networks have them).

  The three networks get `fold_in(rng, 0/1/2)`. Traceable (usable under jit and
  `jax.eval_shape`). Random numbers are drawn with the non-partitionable threefry
  (deterministic, just other values than the default): XLA compiles the many
  initialisers 2-3x faster with it (tiny UNet 1.4 s instead of 4.7 s, paper's UNet
  4.3 s instead of 7.6 s, on 2 CPU cores).
  """
  x = jnp.zeros((1, image_size, image_size, image_channels + 1), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  with jax.threefry_partitionable(False):
    params = {'unet': networks.unet.init(jax.random.fold_in(rng, 0), x, t,
                                         train=False)['params']}
    if networks.amn is not None:
      params['amn'] = networks.amn.init(jax.random.fold_in(rng, 1), x)['params']
      params['acn'] = networks.acn.init(jax.random.fold_in(rng, 2), x)['params']
  return params


def unet_param_shapes(model: ModelArgs, image_size: int, image_channels: int) -> Any:
  """The UNet's parameter tree as ShapeDtypeStructs (nothing is initialised)."""
  unet = build_unet(model, image_size)
  x = jnp.zeros((1, image_size, image_size, image_channels + 1), jnp.float32)
  return jax.eval_shape(
      lambda: unet.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32),
                        train=False))['params']


def count_params(tree: Any) -> int:
  """Total number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)))
