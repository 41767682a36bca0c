"""cimd_jax.load(...).sample(): the seed and eta arguments reach the sampler, the
run's own sampler keeps its steps, and a partly non-finite ensemble is refused, not
scored."""

import dataclasses

import jax
import numpy as np
import pytest

from cimd_jax import settings as settings_lib
from cimd_jax.inference import ensemble
from cimd_jax.inference import model as model_lib
from cimd_jax.models import build
from cimd_jax.utils.errors import DivergenceError
from tests import helpers


@pytest.fixture(scope='module')
def model():
  """A tiny random model (configs/test.py, 16 px) whose UNet output is not constant:
  every parameter is perturbed, so that masks depend on the image and the noise."""
  s = helpers.settings(diffusion__prediction='x0')
  networks = build.build_networks(s.model, 16, 1)
  params = jax.jit(lambda r: build.init_params(networks, r, 16, 1))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  unet = jax.tree.map(lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(
      np.float32), params['unet'])
  return model_lib.Model(unet, 0, settings_lib.to_dict(s))


def _images():
  return np.random.default_rng(1).integers(0, 256, (2, 16, 16), dtype=np.uint8)


def test_seed_and_eta_change_the_masks_and_a_seed_repeats(model):
  draw = lambda **kw: model.sample(_images(), num_samples=4, sampler='ddim', steps='ddim5',
                                   **kw).masks
  first = draw(seed=0, eta=1.0)
  assert first.shape == (2, 4, 16, 16)
  np.testing.assert_array_equal(draw(seed=0, eta=1.0), first)
  assert not np.array_equal(draw(seed=1, eta=1.0), first), 'seed ignored'
  assert not np.array_equal(draw(seed=0, eta=0.0), first), 'eta ignored'


def test_naming_the_runs_own_sampler_keeps_its_steps(model):
  """The run samples with DDPM over '10' of T = 50 steps: sample(sampler='ddpm') with
  steps omitted is that run (the same masks as sample()), not DDPM over all 50;
  naming the steps explicitly still changes them."""
  assert (model.sampling.sampler, model.sampling.steps) == ('ddpm', '10')
  default = model.sample(_images(), num_samples=2).masks
  np.testing.assert_array_equal(model.sample(_images(), num_samples=2, sampler='ddpm').masks,
                                default)
  np.testing.assert_array_equal(
      model.sample(_images(), num_samples=2, sampler='ddpm', steps='10').masks, default)
  assert not np.array_equal(
      model.sample(_images(), num_samples=2, sampler='ddpm', steps='').masks, default)


def test_a_partly_non_finite_ensemble_is_refused(model, monkeypatch):
  real = ensemble.samplers.sample_ensemble

  def one_nan(*args, **kwargs):
    x0 = np.array(real(*args, **kwargs))
    x0.flat[7] = np.nan
    return x0
  monkeypatch.setattr(ensemble.samplers, 'sample_ensemble', one_nan)
  with pytest.raises(DivergenceError):
    model.sample(_images(), num_samples=2, sampler='ddim', steps='ddim5')


def test_a_non_finite_ensemble_with_the_unclipped_variance_names_the_clip(model, monkeypatch):
  """Respaced DDPM with clip_variance=False: the error names the clip (the usual
  cause, docs/samplers.md), not retraining; with the clip on it names retraining."""
  real = ensemble.samplers.sample_ensemble
  monkeypatch.setattr(ensemble.samplers, 'sample_ensemble',
                      lambda *a, **k: np.full(np.shape(real(*a, **k)), np.nan, np.float32))
  images = np.zeros((1, model.image_size, model.image_size, model.image_channels), np.float32)
  messages = []
  for clip in (False, True):
    sampling = dataclasses.replace(model.sampling, sampler='ddpm', steps='10', num_samples=2,
                                   clip_variance=clip)
    draw = ensemble.make_ensemble_fn(model.model, model.image_size, model.diffusion, sampling)
    with pytest.raises(DivergenceError) as e:
      draw(model.params, images, jax.random.PRNGKey(0), 0)
    messages.append(str(e.value))
  assert 'clip_variance=True' in messages[0] and 'learning_rate' not in messages[0]
  assert 'learning_rate' in messages[1] and 'clip_variance' not in messages[1]


def test_raw_hdf5_floats_are_warned_about_for_an_hdf5_trained_model(model, caplog):
  """A model whose stored data source is a PHiSeg HDF5 file (floats stored in
  data.hdf5_image_range, mapped to [-1, 1] for training) warns when given floats
  inside that raw range; the same floats for a model trained on another source do
  not."""
  raw = np.random.default_rng(2).uniform(-0.5, 0.5, (1, 16, 16)).astype(np.float32)
  config = dict(model.config, data=dict(model.config['data'], name='lidc_hdf5',
                                        hdf5_image_range=(-0.5, 0.5)))
  hdf5_model = model_lib.Model(model.params, 0, config)
  with caplog.at_level('WARNING'):
    model.sample(raw, num_samples=1, sampler='ddim', steps='ddim5')
    assert not [r for r in caplog.records if 'inside the range' in r.getMessage()]
    hdf5_model.sample(raw, num_samples=1, sampler='ddim', steps='ddim5')
  assert [r for r in caplog.records if 'inside the range [-0.5, 0.5]' in r.getMessage()]
