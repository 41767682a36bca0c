"""sampling.variance_transfer='x0_uncertainty': the learned variance of a T-step model
re-expressed for a respaced step, against a float64 numpy re-derivation from the
betas (posterior of q(x_s | x_t, x_0) for the kept steps s < t)."""

import jax.numpy as jnp
import numpy as np
import pytest

from cimd_jax.diffusion import gaussian
from cimd_jax.diffusion import schedule
from cimd_jax.inference import ensemble
from cimd_jax.inference.args import SamplingArgs
from cimd_jax.utils.errors import ConfigError

BETAS = np.linspace(1e-4, 0.02, 1000)   # the linear schedule, written out here


def _expected_variance(v, t, s):
  """The step variance t -> s (s < t kept steps; s = -1 is x_0) a model with learned
  range v at the T-step chain's t implies: beta_tilde' + coef1'^2 Var[x_0 | x_t]."""
  ab = np.cumprod(1.0 - BETAS)
  ab_prev_1 = ab[t - 1] if t > 0 else 1.0
  beta_tilde = (1.0 - np.concatenate([[1.0], ab[:-1]])) / (1.0 - ab) * BETAS
  tilde_t = beta_tilde[t] if t > 0 else beta_tilde[1]
  frac = (v + 1.0) / 2.0
  model_var = np.exp(frac * np.log(BETAS[t]) + (1.0 - frac) * np.log(tilde_t))
  coef1 = BETAS[t] * np.sqrt(ab_prev_1) / (1.0 - ab[t])
  var_x0 = np.clip((model_var - tilde_t) / coef1**2, 0.0, 1.0)
  ab_s = ab[s] if s >= 0 else 1.0
  ratio = ab[t] / ab_s                       # alpha_bar_t / alpha_bar_s
  tilde_ts = (1.0 - ab_s) / (1.0 - ab[t]) * (1.0 - ratio)
  coef1_ts = np.sqrt(ab_s) * (1.0 - ratio) / (1.0 - ab[t])
  return tilde_ts + coef1_ts**2 * var_x0


@pytest.mark.parametrize('spacing', ['50', '7', 'ddim10'])
def test_respaced_step_variance_matches_numpy(spacing):
  full = schedule.make_tables(BETAS)
  sampler_tables = schedule.respaced_tables(BETAS, spacing)
  kept = np.asarray(sampler_tables.timestep_map)
  transfer = ensemble.variance_transfer_fn(full, sampler_tables)
  vs = np.array([-1.0, -0.3, 0.4, 1.0, 2.5, 6.0, 13.0])
  for k in range(1, len(kept)):                 # step k -> k - 1 (k = 0 adds no noise)
    t = jnp.full((len(vs),), kept[k], jnp.int32)
    v_new = transfer(jnp.asarray(vs, jnp.float32).reshape(-1, 1, 1, 1), t)
    out = gaussian.p_mean_variance(
        sampler_tables, jnp.concatenate([jnp.zeros_like(v_new), v_new], -1),
        jnp.zeros_like(v_new), jnp.full((len(vs),), k, jnp.int32), 'learned_range')
    want = np.array([_expected_variance(v, kept[k], kept[k - 1]) for v in vs])
    np.testing.assert_allclose(np.asarray(out['variance']).ravel(), want, rtol=2e-3,
                               err_msg=f'{spacing}: step {k} (t = {kept[k]})')


def test_full_chain_keeps_the_models_own_variance():
  full = schedule.make_tables(BETAS)
  transfer = ensemble.variance_transfer_fn(full, full)
  t = jnp.array([2, 10, 50, 200, 400], jnp.int32)
  v = jnp.array([-1.0, -0.5, 0.0, 0.5, 1.0]).reshape(-1, 1, 1, 1)
  # Inside [-1, 1] the implied Var[x_0 | x_t] lies in [0, 1] at these t: v unchanged.
  np.testing.assert_allclose(np.asarray(transfer(v, t)), np.asarray(v), atol=2e-4)


def test_clip_and_transfer_together_is_a_config_error():
  with pytest.raises(ConfigError, match='sampling.clip_variance'):
    SamplingArgs(variance_transfer='x0_uncertainty', clip_variance=True)
  with pytest.raises(ConfigError, match='sampling.variance_transfer'):
    SamplingArgs(variance_transfer='analytic')
  SamplingArgs(variance_transfer='x0_uncertainty', clip_variance=False)


def test_variance_check_table_against_closed_forms():
  """A probe UNet (output conv kernel zero at init, bias set) predicts a constant
  eps = c and a constant v: then x_hat_0 - x_0 = sqrt((1 - alpha_bar_t) /
  alpha_bar_t) (noise - c), whose squared error is (1 - alpha_bar_t) / alpha_bar_t
  (1 + c^2) in expectation, and Var_v has a closed form."""
  import jax   # pylint: disable=g-import-not-at-top
  from cimd_jax import settings as settings_lib   # pylint: disable=g-import-not-at-top
  from cimd_jax.apps import variance_check   # pylint: disable=g-import-not-at-top
  from cimd_jax.inference import model as model_lib   # pylint: disable=g-import-not-at-top
  from cimd_jax.models import build   # pylint: disable=g-import-not-at-top
  from tests import helpers   # pylint: disable=g-import-not-at-top
  s = helpers.settings(diffusion__prediction='eps')
  networks = build.build_networks(s.model, 16, 1)
  params = jax.jit(lambda r: build.init_params(networks, r, 16, 1))(jax.random.PRNGKey(0))
  unet = jax.tree.map(np.asarray, params['unet'])
  v_const, c = 2.5, 0.5
  unet['out_conv']['bias'] = np.array([c, v_const], np.float32)
  model = model_lib.Model(unet, 0, settings_lib.to_dict(s))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (6, 16, 16, 1)).astype(np.float32)
  experts = rng.random((6, 3, 16, 16)) > 0.5
  timesteps = [1, 7, 30]
  rows = variance_check.variance_table(model, images, experts, timesteps)
  betas = np.asarray(s.diffusion.betas(), np.float64)
  ab = np.cumprod(1.0 - betas)
  for row, t in zip(rows, timesteps):
    tilde = betas[t] * (1.0 - ab[t - 1]) / (1.0 - ab[t])
    coef1 = betas[t] * np.sqrt(ab[t - 1]) / (1.0 - ab[t])
    frac = (v_const + 1.0) / 2.0
    var_v = (np.exp(frac * np.log(betas[t]) + (1 - frac) * np.log(tilde)) - tilde) / coef1**2
    var_clipped = (betas[t] - tilde) / coef1**2         # v clipped to 1: sigma^2 = beta_t
    assert row['t'] == t and row['frac_v_above_1'] == 1.0
    np.testing.assert_allclose(row['mean_v'], v_const, rtol=1e-6)
    np.testing.assert_allclose(row['mean_var_from_v'], var_v, rtol=1e-3)
    np.testing.assert_allclose(row['mean_var_from_clipped_v'], var_clipped, rtol=1e-3)
    np.testing.assert_allclose(row['one_minus_alpha_bar'], 1.0 - ab[t], rtol=1e-5)
    # 6 x 3 x 256 pixels of a chi-square mean: within 10 %.
    np.testing.assert_allclose(row['mse_x0_hat'], (1.0 - ab[t]) / ab[t] * (1 + c**2),
                               rtol=0.1)
    # The noise the table draws (seed 0 folded with t), recomputed here.
    noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), t),
                                         (18, 16, 16, 1)), np.float64)
    np.testing.assert_allclose(row['mse_eps_hat'], np.mean((noise - c)**2), rtol=1e-4)
    offsets = np.sqrt((1.0 - ab[t]) / ab[t]) * (noise.mean(axis=(1, 2, 3)) - c)
    np.testing.assert_allclose(row['mse_x0_hat_offset'], np.mean(offsets**2), rtol=1e-3)
    assert row['frac_all_foreground'] == 0.0
  # eps_hat = -1000: x_hat_0 is far above 0 at every pixel; the 3 masks of image 0
  # are all foreground already and do not count: 15 of 18.
  unet['out_conv']['bias'] = np.array([-1000.0, v_const], np.float32)
  experts[0] = True
  rows = variance_check.variance_table(model_lib.Model(unet, 0, settings_lib.to_dict(s)),
                                       images, experts, [7])
  np.testing.assert_allclose(rows[0]['frac_all_foreground'], 15 / 18, rtol=1e-6)


def test_ensemble_uses_the_transfer_for_respaced_ddpm():
  """The flag reaches the sampler: with a constant v = 4 (above the clip), respaced
  DDPM draws other masks with the transfer than with the clipped interpolation."""
  import jax   # pylint: disable=g-import-not-at-top
  from cimd_jax.models import build   # pylint: disable=g-import-not-at-top
  from tests import helpers   # pylint: disable=g-import-not-at-top
  s = helpers.settings(diffusion__prediction='eps')
  networks = build.build_networks(s.model, 16, 1)
  params = jax.jit(lambda r: build.init_params(networks, r, 16, 1))(jax.random.PRNGKey(0))
  unet = jax.tree.map(np.asarray, params['unet'])
  unet['out_conv']['bias'] = np.array([0.0, 4.0], np.float32)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  masks = {}
  for name, clip in (('interpolate', True), ('x0_uncertainty', False)):
    args = SamplingArgs(sampler='ddpm', steps='7', num_samples=3, clip_variance=clip,
                        variance_transfer=name)
    draw = ensemble.make_ensemble_fn(s.model, 16, s.diffusion, args)
    masks[name] = draw(unet, images, jax.random.PRNGKey(0), 0)
  assert masks['interpolate'].shape == masks['x0_uncertainty'].shape == (2, 3, 16, 16)
  assert np.mean(masks['interpolate'] != masks['x0_uncertainty']) > 0.05
