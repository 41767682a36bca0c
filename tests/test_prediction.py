"""The x_0-prediction option: the network's x_0 output is carried through the eps-based
core unchanged, and the objective regresses x_0."""

import jax
import jax.numpy as jnp
import numpy as np

from cimd_jax.diffusion import gaussian
from cimd_jax.diffusion import schedule


def _tables():
  return schedule.make_tables(schedule.get_beta_schedule('linear', 1000))


def test_x0_output_round_trips_through_p_mean_variance():
  tables = _tables()
  rng = np.random.default_rng(0)
  x_t = jnp.asarray(rng.standard_normal((5, 4, 4, 1)), jnp.float32)
  x0 = jnp.asarray(rng.uniform(-0.9, 0.9, (5, 4, 4, 1)), jnp.float32)
  v = jnp.asarray(rng.uniform(-1, 1, (5, 4, 4, 1)), jnp.float32)
  t = jnp.array([0, 1, 500, 998, 999])
  out = gaussian.as_eps_output(tables, jnp.concatenate([x0, v], -1), x_t, t, 'x0')
  np.testing.assert_array_equal(out[..., 1:], v)
  got = gaussian.p_mean_variance(tables, out, x_t, t, 'learned_range', clip_denoised=False)
  np.testing.assert_allclose(got['pred_xstart'], x0, atol=2e-4)
  # eps mode leaves the output alone.
  same = gaussian.as_eps_output(tables, jnp.concatenate([x0, v], -1), x_t, t, 'eps')
  np.testing.assert_array_equal(same, jnp.concatenate([x0, v], -1))


def test_x0_objective_regresses_the_mask():
  from cimd_jax.models import build  # pylint: disable=g-import-not-at-top
  from cimd_jax.train import objective  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  s = helpers.settings(diffusion__prediction='x0')
  networks = build.build_networks(s.model, 16, 1)
  mask = jnp.where(jnp.arange(16 * 16).reshape(1, 16, 16, 1) % 3 == 0, 1.0, -1.0)
  batch = {'image': jnp.zeros((1, 16, 16, 1)), 'mask': mask}

  @jax.jit   # one compiled program: op-by-op, init and loss take ~4x longer
  def fresh_terms(rng):
    params = build.init_params(networks, rng, 16, 1)
    return objective.loss_terms(params, networks, s.diffusion.tables(), batch,
                                jax.random.PRNGKey(1), s.objective, s.diffusion)

  # The UNet's output conv starts at zero: x0_hat = 0, so mse = mean(mask^2) = 1.
  terms = fresh_terms(jax.random.PRNGKey(0))
  np.testing.assert_allclose(terms['mse'], [1.0], rtol=1e-6)


def test_sampling_denoiser_clips_the_learned_variance_channel():
  from cimd_jax.inference import ensemble  # pylint: disable=g-import-not-at-top
  from cimd_jax.models import build  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  s = helpers.settings()
  tables = s.diffusion.tables()
  networks = build.build_networks(s.model, 16, 1)
  params = jax.jit(lambda r: build.init_params(networks, r, 16, 1))(jax.random.PRNGKey(0))
  params = params['unet']
  # The output conv's kernel starts at zero: its bias is the output, eps 0.3, v 5.
  params['out_conv']['bias'] = jnp.array([0.3, 5.0])
  x = jnp.zeros((2, 16, 16, 2))
  t = jnp.array([3, 40])
  clipped = jax.jit(ensemble.denoiser(s.model, 16, s.diffusion, clip_variance=True))(params, x, t)
  raw = jax.jit(ensemble.denoiser(s.model, 16, s.diffusion, clip_variance=False))(params, x, t)
  np.testing.assert_allclose(raw[..., 1], 5.0, rtol=1e-6)
  np.testing.assert_allclose(clipped[..., 1], 1.0, rtol=1e-6)
  np.testing.assert_allclose(clipped[..., 0], raw[..., 0])
  np.testing.assert_allclose(raw[..., 0], 0.3, rtol=1e-6)
  # With v clipped to 1 the reverse variance is beta_t exactly (the top of the range).
  out = gaussian.p_mean_variance(tables, clipped, x[..., 1:], t, 'learned_range')
  np.testing.assert_allclose(out['log_variance'][:, 0, 0, 0],
                             np.log(np.asarray(tables.betas)[[3, 40]]), rtol=1e-5)
  # The clip is to [-1, 1]: a v below -1 becomes -1 (variance beta_tilde), one inside
  # the range is left as it is.
  clip = jax.jit(ensemble.denoiser(s.model, 16, s.diffusion, clip_variance=True))
  for v, want in ((-5.0, -1.0), (-0.4, -0.4), (0.7, 0.7)):
    params['out_conv']['bias'] = jnp.array([0.3, v])
    np.testing.assert_allclose(clip(params, x, t)[..., 1], want, rtol=1e-6)
