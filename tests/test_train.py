"""Training: objective, gradients, sharding, compile-once, resume, TensorBoard."""

import glob
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cimd_jax import checkpoint
from cimd_jax.models import build
from cimd_jax.train import loop
from cimd_jax.train import monitor
from cimd_jax.train import objective
from cimd_jax.train import state as state_lib
from cimd_jax.train import step as step_lib
from cimd_jax.train import validation
from cimd_jax.utils.errors import ConfigError, DivergenceError
from tests import helpers


def _settings(tfds_dir, **training):
  return helpers.settings(tfds_dir, **{f'training__{k}': v for k, v in training.items()})


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _fixed_batch(s, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  size, channels = s.data.image_size, s.data.image_channels
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


def _fresh(s, mesh, microbatches=1):
  networks = build.build_networks(s.model, s.data.image_size, s.data.image_channels)
  tx = state_lib.make_optimizer(s.training, s.model.ambiguity)
  init = loop.init_state_fn(networks, tx, s.data.image_size, s.data.image_channels)
  state = init(jax.random.PRNGKey(s.training.seed))
  sharding = jax.tree.map(lambda _: step_lib.replicated(mesh), state)
  state = jax.device_put(state, sharding)
  step = step_lib.jit_train_step(
      mesh, sharding, networks=networks, tables=s.diffusion.tables(),
      objective_args=s.objective, diffusion=s.diffusion, tx=tx,
      lr_fn=state_lib.learning_rate_schedule(s.training),
      ema_rate=s.training.ema_rate, microbatches=microbatches)
  return networks, state, step


def test_fixed_batch_overfits(tfds_dir):
  """100 steps on one fixed batch: the loss falls by far more than 20x (measured
  ~170x at step 100, ~40x already at step 60), with one compilation."""
  num_steps = 100
  s = _settings(tfds_dir, learning_rate=2e-3, num_steps=num_steps)
  mesh = step_lib.make_mesh(jax.devices()[:1])
  _, state, step = _fresh(s, mesh)
  batch = _fixed_batch(s, 8)
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  first, last = np.mean(losses[:10]), np.mean(losses[-30:])
  assert np.all(np.isfinite(losses))
  assert last < first / 20, (first, last)
  # The train step compiled once for all steps.
  assert step._cache_size() == 1


def test_gradients_reach_every_latent_leaf_and_kl_depends_on_them(tfds_dir):
  s = _settings(tfds_dir)
  tables = s.diffusion.tables()
  networks = build.build_networks(s.model, s.data.image_size, s.data.image_channels)
  params = jax.jit(lambda r: build.init_params(networks, r, s.data.image_size,
                                               s.data.image_channels))(jax.random.PRNGKey(0))
  batch = _fixed_batch(s, 4)
  rng = jax.random.PRNGKey(3)

  # Break the UNet's zero-initialised output so x0_hat depends on it.
  params['unet'] = jax.tree.map(lambda p: p + 0.01, params['unet'])

  def mean_loss(p):
    return jnp.mean(objective.loss_terms(p, networks, tables, batch, rng, s.objective,
                                         s.diffusion)['loss'])

  grads = jax.jit(jax.grad(mean_loss))(params)
  for name in ('amn', 'acn'):
    leaves = jax.tree_util.tree_leaves_with_path(grads[name])
    assert leaves
    for path, g in leaves:
      assert np.max(np.abs(np.asarray(g))) > 0, f'{name}{jax.tree_util.keystr(path)} has zero grad'
  # The UNet gets gradient from the KL too: with only the KL weighted, grads are non-zero.
  kl_only = objective.ObjectiveArgs(vlb_weight=0.0, kl_weight=1.0)

  def kl_loss(p):
    terms = objective.loss_terms(p, networks, tables, batch, rng, kl_only, s.diffusion)
    return jnp.mean(terms['kl'])

  unet_grad = jax.jit(jax.grad(kl_loss))(params)['unet']
  assert float(step_lib.tree_norm(unet_grad)) > 0

  terms_of = jax.jit(lambda p: objective.loss_terms(p, networks, tables, batch, rng,
                                                   s.objective, s.diffusion))
  base = terms_of(params)
  for name in ('amn', 'acn'):
    moved = dict(params)
    moved[name] = jax.tree.map(lambda p: p * 1.5 + 0.02, params[name])
    terms = terms_of(moved)
    assert not np.allclose(terms['kl'], base['kl']), name
    np.testing.assert_allclose(terms['mse'], base['mse'], rtol=1e-6)


def test_weighted_loss_is_the_documented_sum():
  args = objective.ObjectiveArgs(vlb_weight=0.25, kl_weight=3.0)
  terms = {'mse': jnp.array([1.0, 2.0]), 'vlb': jnp.array([4.0, 8.0]),
           'kl': jnp.array([0.5, 0.0])}
  np.testing.assert_allclose(objective.weighted_loss(terms, args), [3.5, 4.0])


_RECORDED = ('loss', 'mse', 'kl', 'grad_norm', 'mse_q0_sum', 'q0_count', 'q3_count')


def _three_steps(s, devices, microbatches=1):
  """Metrics [3, len(_RECORDED)] and final params of 3 steps on one fixed batch of 8."""
  mesh = step_lib.make_mesh(devices)
  _, state, step = _fresh(s, mesh, microbatches)
  sharded = jax.device_put(_fixed_batch(s, 8, seed=1), step_lib.batch_sharding(mesh))
  records = []
  for _ in range(3):
    state, metrics = step(state, sharded)
    records.append([float(metrics[k]) for k in _RECORDED])
  return np.array(records), jax.device_get(state.params)


@pytest.fixture(scope='module')
def one_device_run(tfds_dir):
  """The reference both sharded runs are compared with: one device, one micro-batch."""
  return _three_steps(_settings(tfds_dir), jax.devices()[:1])


def _assert_same_run(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_one_and_four_devices_agree(tfds_dir, one_device_run):
  assert jax.device_count() >= 4, 'conftest sets 4 fake CPU devices'
  _assert_same_run(_three_steps(_settings(tfds_dir), jax.devices()[:4]), one_device_run)


def test_microbatches_give_the_same_updates(tfds_dir, one_device_run):
  """Gradient accumulation over 2 micro-batches on 4 devices == one batch on 1 device."""
  _assert_same_run(_three_steps(_settings(tfds_dir), jax.devices()[:4], microbatches=2),
                   one_device_run)


def test_microbatches_must_divide_the_batch(tfds_dir):
  with pytest.raises(ConfigError, match='training.microbatches'):
    _settings(tfds_dir, batch_size=8, microbatches=3)


def test_learning_rate_schedule():
  from cimd_jax.train.args import TrainingArgs  # pylint: disable=g-import-not-at-top
  args = TrainingArgs(learning_rate=1.0, warmup_steps=10, num_steps=110,
                      lr_schedule='cosine')
  fn = state_lib.learning_rate_schedule(args)
  np.testing.assert_allclose([fn(0), fn(5), fn(10), fn(60), fn(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  const = state_lib.learning_rate_schedule(TrainingArgs(learning_rate=0.3, warmup_steps=0))
  np.testing.assert_allclose([const(0), const(1000)], [0.3, 0.3])


@pytest.mark.parametrize('weight_decay', [0.0, 0.1])
def test_first_adamw_step_by_hand_and_frozen_networks_untouched(weight_decay):
  """One update with gradient 0.5 everywhere and params 2: Adam's first step moves a
  trained parameter by -lr (m̂/√v̂ = 1, up to eps) and AdamW's decay by -lr·wd·p
  (none at weight_decay 0); FROZEN networks (both in 'frozen', the AMN only in
  'target') do not move at all, decay included."""
  from cimd_jax.train.args import TrainingArgs  # pylint: disable=g-import-not-at-top
  lr = 0.01
  args = TrainingArgs(learning_rate=lr, warmup_steps=0, weight_decay=weight_decay,
                      grad_clip_norm=0.0)
  params = {name: {'w': jnp.full((3,), 2.0)} for name in ('unet', 'amn', 'acn')}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  moved = 2.0 - lr - lr * weight_decay * 2.0
  expected = {'trained': {'unet': moved, 'amn': moved, 'acn': moved},
              'frozen': {'unet': moved, 'amn': 2.0, 'acn': 2.0},
              'target': {'unet': moved, 'amn': 2.0, 'acn': moved},
              'off': {'unet': moved, 'amn': moved, 'acn': moved}}
  for mode, want in expected.items():
    tx = state_lib.make_optimizer(args, mode)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for name, value in want.items():
      np.testing.assert_allclose(new[name]['w'], value, rtol=0, atol=1e-6,
                                 err_msg=f'{mode} {name}')


def test_the_loop_keeps_frozen_networks_at_their_initialisation(tmp_path, tfds_dir):
  """Trained for 3 steps with weight decay: the networks 'frozen' and 'target' freeze
  (state.FROZEN_NETWORKS) end where they started, in the parameters and their EMA; the
  others move."""
  for mode in ('frozen', 'target'):
    s = helpers.settings(tfds_dir, training__num_steps=3, training__weight_decay=0.1,
                         training__checkpoint_every=100, model__ambiguity=mode)
    final = jax.device_get(helpers.train_loop(s, tmp_path / mode))
    networks = build.build_networks(s.model, s.data.image_size, s.data.image_channels)
    init = loop.init_state_fn(networks, state_lib.make_optimizer(s.training, mode),
                              s.data.image_size, s.data.image_channels)
    start = jax.device_get(jax.jit(init)(jax.random.PRNGKey(s.training.seed)).params)
    assert set(final.params) == set(start) == {'unet', 'amn', 'acn'}
    for name in start:
      for field in ('params', 'ema_params'):
        rtol = 1e-6 if field == 'ema_params' else 0   # the EMA of a constant: rounding
        same = [np.allclose(a, b, rtol=rtol, atol=0) for a, b in zip(
            jax.tree.leaves(getattr(final, field)[name]), jax.tree.leaves(start[name]))]
        if name in state_lib.FROZEN_NETWORKS[mode]:
          assert all(same), f'{mode}: {field}[{name!r}] moved'
        else:
          assert not all(same), f'{mode}: {field}[{name!r}] did not move'


def test_quartile_sums_and_logged_learning_rate_by_hand():
  """quartile_sums bins t by t·4 // T (T = 1000: 0 and 249 in q0, 250 in q1, 999 in
  q3); the learning rate logged with an update is the one that update used: in a
  10-step warm-up to 1.0 the first update (step 0) uses and logs 0.0, the next 0.1."""
  from cimd_jax.train.args import TrainingArgs  # pylint: disable=g-import-not-at-top
  sums = step_lib.quartile_sums(jnp.array([1.0, 2.0, 4.0, 8.0]), jnp.array([0, 249, 250, 999]),
                                1000)
  assert {k: float(v) for k, v in sums.items()} == {
      'mse_q0_sum': 3.0, 'q0_count': 2.0, 'mse_q1_sum': 4.0, 'q1_count': 1.0,
      'mse_q2_sum': 0.0, 'q2_count': 0.0, 'mse_q3_sum': 8.0, 'q3_count': 1.0}
  args = TrainingArgs(learning_rate=1.0, warmup_steps=10, grad_clip_norm=0.0)
  tx, lr_fn = state_lib.make_optimizer(args), state_lib.learning_rate_schedule(args)
  params = {'unet': {'w': jnp.full((2,), 3.0)}}
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(0))
  grads = {'unet': {'w': jnp.ones((2,))}}
  for lr in (0.0, 0.1):
    before = np.asarray(state.params['unet']['w'])
    state, metrics = step_lib.apply_gradients(state, grads, {'loss': jnp.float32(1.0)}, {},
                                              tx=tx, lr_fn=lr_fn, ema_rate=0.5)
    assert float(metrics['learning_rate']) == pytest.approx(lr)
    # Adam's step is lr · m̂/√v̂ = lr for a constant gradient (float32 bias correction:
    # 1 − 0.999² loses ~1e-5 of its precision).
    np.testing.assert_allclose(before - np.asarray(state.params['unet']['w']), lr, atol=1e-5)


def test_window_rates_count_timed_steps_only():
  """3 timed steps in 1.5 s at batch 4: 2 steps/s, 8 images/s; a window whose only
  step compiled has no rate instead of one that counts the compilation."""
  metrics = {k: np.float32(1.0) for k in monitor.WINDOW_KEYS}
  metrics.update({f'mse_q{q}_sum': np.float32(0.0) for q in range(4)})
  metrics.update({f'q{q}_count': np.float32(0.0) for q in range(4)})
  metrics['learning_rate'] = np.float32(0.1)
  host = [(s, metrics) for s in (1, 2, 3, 4)]
  got = monitor.window_scalars(host, 4, 1.5, 3)
  assert got['steps_per_s'] == pytest.approx(2.0) and got['images_per_s'] == pytest.approx(8.0)
  assert 'steps_per_s' not in monitor.window_scalars(host[:1], 4, 30.0, 0)


def test_logged_rates_leave_out_validation_saving_and_compilation(tmp_path, tfds_dir,
                                                                  monkeypatch):
  """A clock that only moves during validation (100 s each) and saving (50 s): every
  logged steps_per_s must ignore those seconds (they were charged to the next window),
  and the first window, whose one step compiles, logs no rate."""
  clock = [0.0]
  monkeypatch.setattr(loop, 'time', type('FakeTime', (), {
      'perf_counter': staticmethod(lambda: clock[0])}))
  real_validate, real_save = monitor.validate, checkpoint.save

  def slow_validate(*args):
    clock[0] += 100.0
    return real_validate(*args)

  def slow_save(*args, **kwargs):
    clock[0] += 50.0
    return real_save(*args, **kwargs)
  monkeypatch.setattr(monitor, 'validate', slow_validate)
  monkeypatch.setattr(checkpoint, 'save', slow_save)
  logged = {}
  s = helpers.settings(tfds_dir, training__num_steps=6, training__log_every=1,
                       training__eval_every=2, training__checkpoint_every=3,
                       data__validation_fraction=0.25)
  helpers.train_loop(s, tmp_path, on_log=lambda step, sc: logged.update({step: sc}))
  assert sorted(logged) == [1, 2, 3, 4, 5, 6]
  assert 'steps_per_s' not in logged[1]
  assert all(logged[k]['steps_per_s'] > 1.0 for k in range(2, 7)), (
      {k: logged[k].get('steps_per_s') for k in logged})


def test_best_checkpoint_outlives_a_resume_without_validation(tmp_path, tfds_dir):
  """Validated to step 4 (best kept beyond keep_checkpoints=1), then resumed to step 6
  with eval_every=0: the best step is still there and still `best` (a manager
  without the best policy deleted it at the next save)."""
  common = dict(training__keep_checkpoints=1, training__checkpoint_every=2,
                data__validation_fraction=0.25)
  helpers.train_loop(helpers.settings(tfds_dir, training__num_steps=4,
                                      training__eval_every=2, **common), tmp_path)
  best = checkpoint.resolve_step(str(tmp_path), 'best')
  helpers.train_loop(helpers.settings(tfds_dir, training__num_steps=6,
                                      training__eval_every=0, **common), tmp_path)
  assert checkpoint.resolve_step(str(tmp_path), 'best') == best
  assert checkpoint.complete_steps(str(tmp_path)) == sorted({best, 6})


def _assert_same_state(a, b):
  assert int(a.step) == int(b.step)
  for field in ('params', 'ema_params', 'opt_state'):
    x_leaves = jax.tree.leaves(jax.device_get(getattr(a, field)))
    y_leaves = jax.tree.leaves(jax.device_get(getattr(b, field)))
    assert len(x_leaves) == len(y_leaves)
    for x, y in zip(x_leaves, y_leaves):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6, err_msg=field)


def test_resume_equals_straight_run(tmp_path, tfds_dir):
  """Resumed from the end of a shorter run, and from a checkpoint saved mid-run (an
  asynchronous save followed by steps that donate the state), training ends where an
  uninterrupted run does: parameters, EMA and optimizer state."""
  straight = _settings(tfds_dir, num_steps=6, checkpoint_every=2)
  final_straight = helpers.train_loop(straight, tmp_path / 'straight')
  first = _settings(tfds_dir, num_steps=3, checkpoint_every=100)
  helpers.train_loop(first, tmp_path / 'resumed')
  second = _settings(tfds_dir, num_steps=6, checkpoint_every=100)
  final_resumed = helpers.train_loop(second, tmp_path / 'resumed')
  assert int(final_resumed.step) == 6
  _assert_same_state(final_straight, final_resumed)
  steps = sorted(int(os.path.basename(p)) for p in
                 glob.glob(str(tmp_path / 'resumed' / 'checkpoints' / '*')) if
                 os.path.basename(p).isdigit())
  assert steps[-1] == 6 and 3 in steps
  # The straight run's mid-run checkpoint 4, with 6 removed: steps 5 and 6 again.
  shutil.rmtree(tmp_path / 'straight' / 'checkpoints' / '6')
  assert checkpoint.complete_steps(str(tmp_path / 'straight'))[-1] == 4
  _assert_same_state(final_straight, helpers.train_loop(straight, tmp_path / 'straight'))


def test_tensorboard_events_have_scalar_and_image_tags(tmp_path, tfds_dir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  s = helpers.settings(tfds_dir, training__num_steps=2, training__log_every=1,
                       training__eval_every=2, training__checkpoint_every=2,
                       data__validation_fraction=0.1)
  workdir = tmp_path / 'tb'
  helpers.train_mode(s, workdir)
  events = glob.glob(str(workdir / '**' / 'events.out.tfevents*'), recursive=True)
  assert events, os.listdir(workdir)
  tags = set()
  for path in events:
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        tags.add(value.tag)
  for tag in ('loss', 'mse', 'vlb', 'kl', 'grad_norm', 'param_norm', 'learning_rate',
              'steps_per_s', 'images_per_s', 'val/ci', 'val/ged', 'val/hm_iou',
              'val/calibration_mae', 'val/calibration_dispersion', 'val/per_image_ci',
              'val/cases', 'val/calibration',
              'ambiguity/amn_mean_spread', 'ambiguity/spread_over_sigma'):
    assert tag in tags, (tag, sorted(tags))
  assert any(t.startswith('mse_by_t/q') for t in tags), sorted(tags)


def test_non_finite_loss_stops_without_checkpoint(tmp_path, tfds_dir):
  s = helpers.settings(tfds_dir, training__num_steps=4, training__learning_rate=1e30,
                       training__grad_clip_norm=0.0, training__checkpoint_every=2,
                       objective__vlb_weight=1e30)
  with pytest.raises(DivergenceError, match='step'):
    helpers.train_loop(s, tmp_path / 'nan')
  assert checkpoint.complete_steps(str(tmp_path / 'nan')) == []


def test_validation_scores_are_stored_and_best_is_kept(tmp_path, tfds_dir, monkeypatch):
  """Training with validation stores each validated step's score (Orbax writes metrics
  only when its best_fn is set: without it `best` never resolved and the best step was
  deleted like any other); `best` is the highest stored score, kept beyond
  keep_checkpoints; calibration_mae as best_metric on data without known structure
  frequencies is refused (it would be NaN at every step). Validation samples with the
  EMA weights (ema_rate 0.9: unlike the trained ones after 6 steps)."""
  s = helpers.settings(tfds_dir, training__num_steps=6, training__checkpoint_every=2,
                       training__keep_checkpoints=1, training__eval_every=2,
                       data__validation_fraction=0.25)
  validated = {}
  real_call = validation.Validator.__call__

  def recording_call(self, params, step):
    validated[step] = jax.device_get(params)
    return real_call(self, params, step)
  monkeypatch.setattr(validation.Validator, '__call__', recording_call)
  final = helpers.train_loop(s, tmp_path / 'run')
  assert sorted(validated) == [2, 4, 6]
  ema, trained = jax.device_get((final.ema_params['unet'], final.params['unet']))
  for got, want in zip(jax.tree.leaves(validated[6]), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(got, want)
  assert any(not np.allclose(a, b) for a, b in zip(*map(jax.tree.leaves, (ema, trained))))
  manager = checkpoint.make_manager(str(tmp_path / 'run'), keep=3, read_only=True, best=True)
  scores = {st: float(manager.metrics(st)[checkpoint.BEST_KEY])
            for st in checkpoint.complete_steps(str(tmp_path / 'run'))}
  manager.close()
  assert 6 in scores and all(np.isfinite(v) for v in scores.values()), scores
  best = checkpoint.resolve_step(str(tmp_path / 'run'), 'best')
  assert scores[best] == max(scores.values())
  # The validation grid logged something for all three validated steps.
  assert len(glob.glob(str(tmp_path / 'run' / '**' / 'events.out.tfevents.*'),
                       recursive=True)) >= 1


def test_resuming_keeps_the_metric_the_checkpoints_are_ranked_by(tmp_path):
  """Checkpoints scored by -GED cannot be ranked with later ones scored by +CI (the
  better one would be deleted): resuming follows the stored best_metric, refuses an
  explicit other one, and is free to change it while no step holds a score."""
  from cimd_jax.apps import resume   # pylint: disable=g-import-not-at-top

  ged = helpers.settings(training__best_metric='ged')
  helpers.save_stand_in_checkpoint(tmp_path / 'scored', 2, ged, {checkpoint.BEST_KEY: -1.17})
  resumed = resume.resume_settings(helpers.settings(training__best_metric='ci'),
                                  str(tmp_path / 'scored'), set())
  assert resumed.training.best_metric == 'ged'
  with pytest.raises(ConfigError, match=r"^--config.training.best_metric='ci' differs .* "
                                        r"ranked by 'ged'"):
    resume.resume_settings(helpers.settings(training__best_metric='ci'),
                          str(tmp_path / 'scored'), {'training.best_metric'})
  helpers.save_stand_in_checkpoint(tmp_path / 'unscored', 2, ged)
  resumed = resume.resume_settings(helpers.settings(training__best_metric='ci'),
                                  str(tmp_path / 'unscored'), {'training.best_metric'})
  assert resumed.training.best_metric == 'ci'


def test_a_finished_run_refuses_settings_it_was_not_trained_with(tmp_path, caplog):
  """A workdir trained to its num_steps with kl_weight 1 and seed 0: asked for kl_weight
  0.001 (a config file or a mode like ablations) nothing would be trained, so it is
  refused, naming the key and both values (before, the old model was reported under
  the new settings and config.json rewritten to claim them); with a larger num_steps
  the run continues with a warning; keys that only say how to run (num_steps,
  eval_every, tfds_dir) or what to test on change freely."""
  from cimd_jax.apps import resume   # pylint: disable=g-import-not-at-top
  helpers.save_stand_in_checkpoint(tmp_path, 2, helpers.settings(training__num_steps=2))
  other = helpers.settings(training__num_steps=2, objective__kl_weight=0.001,
                           training__seed=3)
  with pytest.raises(ConfigError, match=r'finished training \(step 2 of training.num_steps=2\)'
                                        r'.*objective.kl_weight=0.001 \(trained with 1.0\).*'
                                        r'training.seed=3 \(trained with 0\)'):
    resume.resume_settings(other, str(tmp_path), set())
  longer = helpers.settings(training__num_steps=4, objective__kl_weight=0.001)
  with caplog.at_level(logging.WARNING):
    got = resume.resume_settings(longer, str(tmp_path), set())
  assert got.objective.kl_weight == 0.001
  assert any('objective.kl_weight=0.001 (trained with 1.0)' in r.getMessage()
             for r in caplog.records)
  same = helpers.settings(training__num_steps=2, training__eval_every=7,
                          data__tfds_dir=str(tmp_path / 'elsewhere'),
                          data__synthetic_num_test=9)      # the test split only
  assert resume.resume_settings(same, str(tmp_path), set()).training.eval_every == 7


def test_resume_refuses_another_data_order_and_warns_about_the_schedule(tmp_path, caplog):
  """Stopped at step 2 of 8: another batch size (or data) would make the saved data
  position skip or repeat examples (refused, naming the key); a cosine decay rebuilt
  over another num_steps, and a num_steps below the checkpoint's step, are named in
  warnings."""
  from cimd_jax.apps import resume   # pylint: disable=g-import-not-at-top
  helpers.save_stand_in_checkpoint(
      tmp_path, 2, helpers.settings(training__num_steps=8, training__lr_schedule='cosine'))
  for key, value in (('training__batch_size', 8), ('data__synthetic_seed', 99),
                     ('training__seed', 3), ('training__grad_clip_norm', 0.0)):
    other = helpers.settings(training__num_steps=8, training__lr_schedule='cosine',
                             **{key: value})
    with pytest.raises(ConfigError, match=rf'resuming at step 2 with '
                                          rf'{key.replace("__", ".")} changed'):
      resume.resume_settings(other, str(tmp_path), set())
  clip = helpers.settings().training.grad_clip_norm
  assert clip > 0   # another positive bound fits the saved optimizer state: a warning only
  resume.resume_settings(helpers.settings(training__num_steps=8, training__lr_schedule='cosine',
                                         training__grad_clip_norm=2 * clip),
                        str(tmp_path), set())
  with caplog.at_level(logging.WARNING):
    resume.resume_settings(helpers.settings(training__num_steps=16,
                                           training__lr_schedule='cosine'), str(tmp_path), set())
    resume.resume_settings(helpers.settings(training__num_steps=1,
                                           training__lr_schedule='cosine'), str(tmp_path), set())
  warned = ' | '.join(r.getMessage() for r in caplog.records)
  assert 'cosine learning-rate decay was built over 8 steps' in warned
  assert 'rebuilt over training.num_steps=16' in warned
  assert 'past training.num_steps=1' in warned


def test_resume_with_another_data_worker_count_restarts_the_order(tmp_path, tfds_dir, caplog):
  """The iterator state of 0 workers does not fit 2 (and back): the resume warns that
  the data order starts afresh instead of failing on a bare KeyError."""
  helpers.train_loop(helpers.settings(tfds_dir, training__num_steps=2, data__worker_count=0),
                     tmp_path)
  with caplog.at_level(logging.WARNING):
    state = helpers.train_loop(helpers.settings(tfds_dir, training__num_steps=3,
                                                data__worker_count=2), tmp_path)
  assert int(state.step) == 3
  assert any('data order starts afresh' in r.getMessage() for r in caplog.records)


def test_calibration_mae_as_best_metric_needs_known_frequencies(tmp_path):
  """On data without known structure frequencies (a CIMD folder) val/calibration_mae
  would be NaN at every validation: refused when validation starts, naming the key."""
  from cimd_jax.train import validation   # pylint: disable=g-import-not-at-top
  from tests.test_data import make_cimd_folder   # pylint: disable=g-import-not-at-top
  root = make_cimd_folder(tmp_path / 'src', num_train=4, num_test=1, num_labels=3)
  s = helpers.settings(tmp_path / 'tfds', data__name='folder', data__source_dir=root,
                       data__validation_fraction=0.25, training__eval_every=2,
                       training__best_metric='calibration_mae')
  with pytest.raises(ConfigError, match=r"^training.best_metric='calibration_mae' needs "
                                        r".*data.name='folder'"):
    validation.Validator(str(tmp_path), s.data, s.model, s.diffusion, s.sampling, s.training)
  # 'ci' is fine on the same data.
  ok = helpers.settings(tmp_path / 'tfds', data__name='folder', data__source_dir=root,
                        data__validation_fraction=0.25, training__eval_every=2)
  assert validation.Validator(str(tmp_path), ok.data, ok.model, ok.diffusion, ok.sampling,
                              ok.training).best_metric == 'ci'


def test_frozen_networks_at_a_large_kl_weight_are_warned_about(tmp_path, caplog, monkeypatch):
  """'frozen' with a KL weight above the official 0.001 is named in a warning when
  training starts; the official weight, or 'trained' at weight 1, are not."""
  frozen = helpers.settings(model__ambiguity='frozen', objective__kl_weight=0.5)
  assert 'objective.kl_weight=0.5' in objective.ambiguity_warning(frozen.objective, 'frozen')
  official = helpers.settings(model__ambiguity='frozen', objective__kl_weight=0.001)
  assert objective.ambiguity_warning(official.objective, 'frozen') is None
  assert objective.ambiguity_warning(frozen.objective, 'trained') is None

  class Stop(Exception):
    pass

  def stop(*args, **kwargs):
    raise Stop()
  monkeypatch.setattr(loop.build, 'build_networks', stop)
  with caplog.at_level(logging.WARNING), pytest.raises(Stop):
    helpers.train_loop(frozen, tmp_path / 'frozen')
  assert "objective.kl_weight=0.5 with model.ambiguity='frozen'" in caplog.text
