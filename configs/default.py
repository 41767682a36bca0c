"""Every configuration key of cimd_jax, with its default value.

Other config files import `get_config()` from here and change what differs, so the
set of keys lives in one place. Groups: `data`, `model`, `diffusion`, `training`,
`sampling`, `eval`. Modules never read this ConfigDict directly:
`cimd_jax.from_config` turns each group into explicit, typed arguments.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- data
  data = config.data = ml_collections.ConfigDict()
  data.name = 'synthetic'          # 'synthetic' (built in) | 'folder' (CIMD layout)
  data.source_dir = ''             # folder datasets: ROOT with training/ and testing/
  data.tfds_dir = ''               # prepared-dataset cache; '' -> WORKDIR/tfds
  data.image_size = 128            # H = W of records and of the model input
  data.image_channels = 1          # channels of the image b (LIDC 1, MS-MRI 4)
  data.num_annotators = 4          # expert masks per case (LIDC 4, MS-MRI 2)
  data.mask_threshold = 127        # label pixel > threshold (of 255) is foreground
  data.resize = False              # resize images/masks that differ from image_size
  data.validation_fraction = 0.0   # case-level fraction of training held out
  data.seed = 0                    # shuffling, expert draws, validation split
  data.worker_count = 0            # grain worker processes (0: in-process)
  # synthetic dataset only
  data.synthetic_num_train = 2000
  data.synthetic_num_test = 64
  data.synthetic_seed = 1234

  # ---------------------------------------------------------------- model
  model = config.model = ml_collections.ConfigDict()
  model.num_channels = 128
  model.channel_mult = (1, 1, 2, 3, 4)
  model.num_res_blocks = 2
  model.attention_resolutions = (16,)  # feature-map sizes (pixels) with attention
  model.num_heads = 1
  model.num_head_channels = -1         # >0 overrides num_heads
  model.dropout = 0.0
  model.use_scale_shift_norm = False
  model.resblock_updown = False
  model.learn_sigma = True
  # How convolutions are computed (same parameters and function either way; see
  # cimd_jax/models/conv.py): 'auto' (per backend: measured choice on CPU, 'xla' on
  # GPU/TPU) | 'xla' (lax.conv_general_dilated) | 'im2col' | 'shifted' (matmuls).
  model.conv_impl = 'auto'
  # AMN / ACN (axis-aligned conv Gaussians)
  model.latent_dim = 6
  model.latent_filters = (32, 64, 128, 192)
  model.latent_convs_per_block = 3
  model.kl_weight = 1.0            # beta in L = L_simple + lambda L_vlb + beta KL
  model.amn_input = 'clean'        # 'clean' expert mask | 'noisy' x_t
  model.acn_input = 'x0'           # 'x0' (clipped x0 prediction) | 'eps' (official code)

  # ---------------------------------------------------------------- diffusion
  diffusion = config.diffusion = ml_collections.ConfigDict()
  diffusion.num_timesteps = 1000
  diffusion.beta_schedule = 'linear'   # 'linear' | 'cosine'
  diffusion.variance = 'learned_range'  # 'learned_range' | 'fixed_small' | 'fixed_large'
  diffusion.vlb_weight = 0.001     # lambda; the VLB term is T * L_t (unbiased full VLB)
  diffusion.prediction = 'eps'     # UNet's first channel: 'eps' (paper) | 'x0'

  # ---------------------------------------------------------------- training
  training = config.training = ml_collections.ConfigDict()
  training.batch_size = 8          # global batch, split over all devices
  training.num_steps = 100_000
  training.learning_rate = 1e-4
  training.lr_schedule = 'constant'  # 'constant' | 'cosine' (both after warm-up)
  training.warmup_steps = 0
  training.weight_decay = 0.0
  training.grad_clip_norm = 1.0
  training.ema_rate = 0.9999
  training.seed = 0
  training.checkpoint_every = 1000
  training.keep_checkpoints = 3
  training.log_every = 50
  training.image_every = 5000      # 0 disables image summaries
  training.image_samples = 4       # samples per image in the image summary
  training.image_sampler_steps = 50
  training.remat = False           # rematerialise UNet blocks (less memory)
  # Accumulate each step's gradient over this many equal micro-batches (a lax.scan):
  # activation memory of batch_size/microbatches images, same update. Must divide
  # batch_size, and batch_size/microbatches must be a multiple of the device count.
  training.microbatches = 1
  training.compute_dtype = 'float32'  # 'bfloat16' on GPU/TPU; params stay float32

  # ---------------------------------------------------------------- sampling
  sampling = config.sampling = ml_collections.ConfigDict()
  # Default: DDIM over 25 respaced steps, the fastest sampler whose CI is within 0.02
  # of 1000-step ancestral DDPM on the synthetic test set (docs/samplers.md; re-check
  # on your own checkpoint with --mode=compare_samplers).
  sampling.sampler = 'ddim'        # 'ddpm' (ancestral) | 'ddim'
  sampling.steps = 'ddim25'        # '' = all T; '100' respaced; 'ddim50' for DDIM
  sampling.ddim_eta = 0.0
  # Clip the learned variance channel v to [-1, 1] (sigma^2 between beta_tilde and
  # beta) when sampling; False follows improved DDPM and lets it extrapolate.
  sampling.clip_variance = True
  sampling.num_samples = 16        # N masks per image
  sampling.max_batch = 64          # rows (images x samples) per compiled call
  sampling.use_ema = True
  sampling.checkpoint_step = -1    # -1: latest
  sampling.split = 'test'
  sampling.input_dir = ''          # folder of unlabelled images (overrides split)
  sampling.output_dir = ''         # '' -> WORKDIR/samples/<split or folder name>
  sampling.seed = 0
  sampling.skip_bad_inputs = False

  # ---------------------------------------------------------------- eval
  eval_ = config.eval = ml_collections.ConfigDict()
  eval_.num_samples = 16
  eval_.split = 'test'
  eval_.max_images = -1            # -1: the whole split
  eval_.batch_images = 4           # images per sampling call

  return config
