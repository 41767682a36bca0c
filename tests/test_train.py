"""Training: objective, gradients, sharding, compile-once, resume, TensorBoard."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from cimd_jax import checkpoint
from cimd_jax import from_config
from cimd_jax.models import build
from cimd_jax.train import loop
from cimd_jax.train import objective
from cimd_jax.train import state as state_lib
from cimd_jax.train import step as step_lib


def _config(tfds_dir, **training):
  config = test_config.get_config()
  config.data.tfds_dir = str(tfds_dir)
  for key, value in training.items():
    config.training[key] = value
  return config


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _fixed_batch(setup, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  size, channels = setup.unet.image_size, setup.unet.image_channels
  yy, xx = np.mgrid[:size, :size]
  masks, images = [], []
  for _ in range(batch_size):
    cy, cx = rng.integers(4, size - 4, 2)
    r = rng.integers(2, 5)
    m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
    masks.append(np.where(m, 1.0, -1.0)[..., None])
    images.append(np.repeat((0.8 * m - 0.4 + 0.05 * rng.standard_normal(m.shape))[..., None],
                            channels, -1))
  return {'image': jnp.asarray(np.stack(images), jnp.float32),
          'mask': jnp.asarray(np.stack(masks), jnp.float32)}


def _fresh(setup, mesh, microbatches=1):
  networks = build.build_networks(setup.unet, setup.latent)
  tx = state_lib.make_optimizer(setup.optimizer)
  init = loop.init_state_fn(setup, networks, tx)
  state = init(jax.random.PRNGKey(setup.loop.seed))
  sharding = jax.tree.map(lambda _: step_lib.replicated(mesh), state)
  state = jax.device_put(state, sharding)
  step = step_lib.jit_train_step(
      mesh, sharding, networks=networks, tables=setup.tables,
      objective_args=setup.objective, tx=tx,
      lr_fn=state_lib.learning_rate_schedule(setup.optimizer),
      ema_rate=setup.loop.ema_rate, microbatches=microbatches)
  return networks, state, step


def test_fixed_batch_overfits(tfds_dir):
  config = _config(tfds_dir, learning_rate=2e-3, num_steps=300)
  setup = from_config.train_setup(config)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  _, state, step = _fresh(setup, mesh)
  batch = _fixed_batch(setup, 8)
  losses = []
  for _ in range(300):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  first, last = np.mean(losses[:10]), np.mean(losses[-30:])
  assert np.all(np.isfinite(losses))
  assert last < first / 4, (first, last)
  # The train step compiled once for all 300 steps.
  assert step._cache_size() == 1


def test_gradients_reach_every_latent_leaf_and_kl_depends_on_them(tfds_dir):
  setup = from_config.train_setup(_config(tfds_dir))
  networks = build.build_networks(setup.unet, setup.latent)
  params = build.init_params(networks, jax.random.PRNGKey(0), setup.unet.image_size,
                             setup.unet.image_channels)
  batch = _fixed_batch(setup, 4)
  rng = jax.random.PRNGKey(3)

  # Break the UNet's zero-initialised output so x0_hat depends on it.
  params['unet'] = jax.tree.map(lambda p: p + 0.01, params['unet'])

  def mean_loss(p):
    return jnp.mean(objective.loss_terms(p, networks, setup.tables, batch, rng,
                                         setup.objective)['loss'])

  grads = jax.grad(mean_loss)(params)
  for name in ('amn', 'acn'):
    leaves = jax.tree_util.tree_leaves_with_path(grads[name])
    assert leaves
    for path, g in leaves:
      assert float(jnp.max(jnp.abs(g))) > 0, f'{name}{jax.tree_util.keystr(path)} has zero grad'
  # The UNet gets gradient from the KL too: with only the KL weighted, grads are non-zero.
  kl_only = objective.ObjectiveArgs(variance=setup.objective.variance, vlb_weight=0.0,
                                    kl_weight=1.0)

  def kl_loss(p):
    terms = objective.loss_terms(p, networks, setup.tables, batch, rng, kl_only)
    return jnp.mean(terms['kl'])

  unet_grad = jax.grad(kl_loss)(params)['unet']
  assert float(step_lib.tree_norm(unet_grad)) > 0

  base = objective.loss_terms(params, networks, setup.tables, batch, rng, setup.objective)
  for name in ('amn', 'acn'):
    moved = dict(params)
    moved[name] = jax.tree.map(lambda p: p * 1.5 + 0.02, params[name])
    terms = objective.loss_terms(moved, networks, setup.tables, batch, rng, setup.objective)
    assert not np.allclose(terms['kl'], base['kl']), name
    np.testing.assert_allclose(terms['mse'], base['mse'], rtol=1e-6)


def test_weighted_loss_is_the_documented_sum():
  args = objective.ObjectiveArgs(vlb_weight=0.25, kl_weight=3.0)
  terms = {'mse': jnp.array([1.0, 2.0]), 'vlb': jnp.array([4.0, 8.0]),
           'kl': jnp.array([0.5, 0.0])}
  np.testing.assert_allclose(objective.weighted_loss(terms, args), [3.5, 4.0])


def test_one_and_four_devices_agree(tfds_dir):
  assert jax.device_count() >= 4, 'conftest sets 4 fake CPU devices'
  setup = from_config.train_setup(_config(tfds_dir))
  batch = _fixed_batch(setup, 8, seed=1)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh = step_lib.make_mesh(devices)
    _, state, step = _fresh(setup, mesh)
    sharded = jax.device_put(batch, step_lib.batch_sharding(mesh))
    losses = []
    for _ in range(3):
      state, metrics = step(state, sharded)
      losses.append(float(metrics['loss']))
    results.append((losses, jax.device_get(state.params)))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_microbatches_give_the_same_updates(tfds_dir):
  """Gradient accumulation over 2 micro-batches on 4 devices == one batch on 1 device."""
  setup = from_config.train_setup(_config(tfds_dir))
  batch = _fixed_batch(setup, 8, seed=2)
  results = []
  for devices, microbatches in ((jax.devices()[:1], 1), (jax.devices()[:4], 2)):
    mesh = step_lib.make_mesh(devices)
    _, state, step = _fresh(setup, mesh, microbatches)
    sharded = jax.device_put(batch, step_lib.batch_sharding(mesh))
    records = []
    for _ in range(3):
      state, metrics = step(state, sharded)
      records.append([float(metrics[k]) for k in ('loss', 'mse', 'kl', 'grad_norm')])
    results.append((np.array(records), jax.device_get(state.params)))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_microbatches_must_divide_the_batch(tfds_dir):
  with pytest.raises(ValueError, match='microbatches'):
    from_config.train_setup(_config(tfds_dir, batch_size=8, microbatches=3))


def test_learning_rate_schedule():
  args = state_lib.OptimizerArgs(learning_rate=1.0, warmup_steps=10, num_steps=110,
                                 lr_schedule='cosine')
  fn = state_lib.learning_rate_schedule(args)
  np.testing.assert_allclose([fn(0), fn(5), fn(10), fn(60), fn(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  const = state_lib.learning_rate_schedule(
      state_lib.OptimizerArgs(learning_rate=0.3, warmup_steps=0))
  np.testing.assert_allclose([const(0), const(1000)], [0.3, 0.3])


def test_resume_equals_straight_run(tmp_path, tfds_dir):
  straight = _config(tfds_dir, num_steps=6, checkpoint_every=100)
  final_straight = loop.train_and_evaluate(from_config.train_setup(straight),
                                           str(tmp_path / 'straight'))
  first = _config(tfds_dir, num_steps=3, checkpoint_every=100)
  loop.train_and_evaluate(from_config.train_setup(first), str(tmp_path / 'resumed'))
  second = _config(tfds_dir, num_steps=6, checkpoint_every=100)
  final_resumed = loop.train_and_evaluate(from_config.train_setup(second),
                                          str(tmp_path / 'resumed'))
  assert int(final_resumed.step) == int(final_straight.step) == 6
  for field in ('params', 'ema_params', 'opt_state'):
    a = jax.tree.leaves(jax.device_get(getattr(final_straight, field)))
    b = jax.tree.leaves(jax.device_get(getattr(final_resumed, field)))
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  steps = sorted(int(os.path.basename(p)) for p in
                 glob.glob(str(tmp_path / 'resumed' / 'checkpoints' / '*')) if
                 os.path.basename(p).isdigit())
  assert steps[-1] == 6 and 3 in steps


def test_tensorboard_events_have_scalar_and_image_tags(tmp_path, tfds_dir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from cimd_jax import run_modes  # pylint: disable=g-import-not-at-top
  config = _config(tfds_dir, num_steps=2, log_every=1, image_every=2, checkpoint_every=2)
  workdir = tmp_path / 'tb'
  run_modes.train(config, str(workdir))
  events = glob.glob(str(workdir / '**' / 'events.out.tfevents*'), recursive=True)
  assert events, os.listdir(workdir)
  tags = set()
  for path in events:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.add(value.tag)
  for tag in ('loss', 'mse', 'vlb', 'kl', 'grad_norm', 'param_norm', 'learning_rate',
              'steps_per_s', 'images_per_s'):
    assert tag in tags, (tag, sorted(tags))
  assert any(t.startswith('samples') for t in tags), sorted(tags)


def test_non_finite_loss_stops_without_checkpoint(tmp_path, tfds_dir):
  config = _config(tfds_dir, num_steps=4, learning_rate=1e30, grad_clip_norm=0.0,
                   checkpoint_every=2)
  config.diffusion.vlb_weight = 1e30
  with pytest.raises(loop.NonFiniteLossError, match='step'):
    loop.train_and_evaluate(from_config.train_setup(config), str(tmp_path / 'nan'))
  manager = checkpoint.make_manager(str(tmp_path / 'nan'), 2)
  assert manager.latest_step() is None
