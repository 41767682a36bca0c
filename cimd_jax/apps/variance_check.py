"""Is a trained learned-range variance what the VLB asks for?

For one step t the VLB term KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) is
minimised over the step variance by sigma^2 = beta_tilde_t + coef1_t^2 E[(x_0 -
x_hat_0)^2 | x_t] (the mean is fixed: the hybrid objective detaches it). So a model
whose v is right says, through Var_v = (sigma_v^2 - beta_tilde_t) / coef1_t^2, how
far its own x_hat_0 is from the experts' masks; v > 1 (sigma^2 > beta_t) is asked for
exactly where that error exceeds 1 - alpha_bar_t.

This measures both sides on a split: every expert mask of every image is noised to
x_t (fixed seed) at each t, and the table compares the mean Var_v with the mean
squared error of the (unclipped) x_hat_0 at the same pixels.

It also splits that error (issue 14, why eps prediction draws all-foreground masks):
mse_eps_hat is the network's own error when it predicts eps; mse_x0_hat_offset is the
part of mse_x0_hat in each mask's spatial mean (the squared mean of x_hat_0 - x_0 over
its pixels, averaged over masks), the error that shifts a whole mask at once; and
frac_all_foreground is the fraction of masks whose x_hat_0 clipped to [-1, 1] is above
0 at every pixel although the expert's mask is not all foreground.

    python -m cimd_jax.apps.variance_check --workdir=runs/demo \
        [--split=test] [--max_images=64] [--timesteps=1,2,5,10,20,50,100,200,500]
"""

import sys
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from cimd_jax import settings as settings_lib
from cimd_jax.apps import sample_inputs
from cimd_jax.diffusion import gaussian
from cimd_jax.inference import model as model_lib
from cimd_jax.models.build import build_unet
from cimd_jax.utils import errors
from cimd_jax.utils.errors import ConfigError

_WORKDIR = flags.DEFINE_string('workdir', None, 'run folder with a checkpoint')
_SPLIT = flags.DEFINE_string('split', 'test', 'dataset split to read')
_MAX_IMAGES = flags.DEFINE_integer('max_images', 64, 'first images of the split')
_TIMESTEPS = flags.DEFINE_list('timesteps', ['1', '2', '5', '10', '20', '50', '100', '200',
                                             '500'], 'steps t >= 1 of the training chain')
_SEED = flags.DEFINE_integer('seed', 0, 'noise seed')

COLUMNS = ('t', 'mean_v', 'frac_v_above_1', 'one_minus_alpha_bar', 'mean_var_from_v',
           'mean_var_from_clipped_v', 'mse_x0_hat', 'mse_eps_hat', 'mse_x0_hat_offset',
           'frac_all_foreground')


def variance_table(model: model_lib.Model, images: np.ndarray, experts: np.ndarray,
                   timesteps: Sequence[int], seed: int = 0) -> list[dict[str, float]]:
  """One row per t (COLUMNS). images float [B, H, W, C] in [-1, 1]; experts bool
  [B, A, H, W]; every (image, expert) pair is one x_0."""
  if model.diffusion.variance != 'learned_range' or not model.model.learn_sigma:
    raise ConfigError('variance_check needs a model trained with '
                      "diffusion.variance='learned_range'")
  tables = model.diffusion.tables()
  unet = build_unet(model.model, model.image_size)
  b, a = experts.shape[:2]
  x0 = np.where(experts, 1.0, -1.0).astype(np.float32).reshape(b * a, *experts.shape[2:], 1)
  cond = np.repeat(images, a, axis=0)

  @jax.jit
  def at_t(params, t, key):
    ts = jnp.full((x0.shape[0],), t, jnp.int32)
    noise = jax.random.normal(key, x0.shape)
    x_t = gaussian.q_sample(tables, x0, ts, noise)
    out = unet.apply({'params': params}, jnp.concatenate([cond, x_t], -1), ts, train=False)
    out = gaussian.as_eps_output(tables, out, x_t, ts, model.diffusion.prediction)
    x0_hat = gaussian.predict_xstart_from_eps(tables, x_t, ts, out[..., :1])
    v = out[..., 1:]
    offset = jnp.mean(x0_hat - x0, axis=(1, 2, 3))                      # [B * A]
    all_fg = jnp.all(jnp.clip(x0_hat, -1.0, 1.0) > 0, axis=(1, 2, 3))
    truly_all_fg = jnp.all(x0 > 0, axis=(1, 2, 3))
    return {'mean_v': jnp.mean(v), 'frac_v_above_1': jnp.mean(v > 1.0),
            'mean_var_from_v': jnp.mean(gaussian.x0_variance_from_v(tables, v, ts)),
            'mean_var_from_clipped_v': jnp.mean(
                gaussian.x0_variance_from_v(tables, jnp.clip(v, -1.0, 1.0), ts)),
            'mse_x0_hat': jnp.mean(jnp.square(x0 - x0_hat)),
            'mse_eps_hat': jnp.mean(jnp.square(noise - out[..., :1])),
            'mse_x0_hat_offset': jnp.mean(jnp.square(offset)),
            'frac_all_foreground': jnp.mean(all_fg & ~truly_all_fg)}

  rows = []
  key = jax.random.PRNGKey(seed)
  for t in timesteps:
    if not 1 <= t < tables.num_timesteps:
      raise ConfigError(f'--timesteps={t}: expected steps in [1, {tables.num_timesteps})')
    got = jax.device_get(at_t(model.params, t, jax.random.fold_in(key, t)))
    rows.append({'t': int(t), 'one_minus_alpha_bar': float(1.0 - tables.alphas_cumprod[t]),
                 **{k: float(v) for k, v in got.items()}})
  return rows


def markdown(rows: list[dict[str, float]]) -> str:
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  for r in rows:
    lines.append('| ' + ' | '.join(str(r[c]) if c == 't' else f'{r[c]:.4g}' for c in COLUMNS)
                 + ' |')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required')
  try:
    _run()
  except errors.UserError as e:   # bad folder, checkpoint or flag: one line, status 2
    sys.stderr.write(f'cimd_jax: error: {errors.one_line(e)}\n')
    sys.exit(errors.EXIT_USER_ERROR)


def _run() -> None:
  model = model_lib.load(_WORKDIR.value)
  s = settings_lib.from_config(model.config)
  s = settings_lib.from_config({**settings_lib.to_dict(s), 'sampling': {
      **settings_lib.to_dict(s)['sampling'], 'split': _SPLIT.value,
      'max_images': _MAX_IMAGES.value}})
  cases = sample_inputs.dataset_cases(s, _WORKDIR.value)
  images = np.stack([c.image for c in cases]).astype(np.float32)
  experts = np.stack([c.experts for c in cases])
  print(f'{len(cases)} images x {experts.shape[1]} experts of split {_SPLIT.value!r}, '
        f'checkpoint step {model.step}', file=sys.stderr)
  print(markdown(variance_table(model, images, experts, [int(t) for t in _TIMESTEPS.value],
                                _SEED.value)))


if __name__ == '__main__':
  app.run(main)
