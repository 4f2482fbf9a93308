"""Training loop, data and the LeViT-like model: reproducibility, loss decrease, offline data."""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shaped_attn import data, levit, training

STEPS = 60


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def _tiny(ds, activation="softmax", depth=1):
    return levit.levit_config(activation, depth=depth, width=16, num_heads=2, image_size=ds.image_size,
                              channels=ds.channels, num_classes=ds.num_classes, grid=4)


def _config(seed=0):
    return training.TrainConfig(steps=STEPS, learning_rate=2e-2, warmup_steps=4, log_every=10, seed=seed)


def _run(ds, seed):
    model = levit.build(_tiny(ds), seed)
    res = training.train(
        model, levit.classifier_loss, data.batches(ds.x_train, ds.y_train, 32, seed=seed), _config(seed),
        eval_fn=levit.classifier_eval, eval_batches=data.eval_batches(ds.x_test, ds.y_test, 450),
    )
    return res


@pytest.fixture(scope="module")
def runs(digits):
    return _run(digits, 0), _run(digits, 0), _run(digits, 1)


# ------------------------------------------------------------------------ training


def test_loss_decreases_and_metrics_are_logged(runs):
    res = runs[0]
    losses = [h["train/loss"] for h in res.history]
    assert len(res.history) == STEPS // 10
    assert losses[-1] < 0.8 * losses[0]
    assert not res.diverged
    assert res.final_eval["accuracy"] > 0.3  # 60 steps of a width-16 model: well above chance
    last = res.history[-1]
    assert len(last["train/attn_frobenius"]) == 1  # one layer
    assert len(last["train/token_correlation"]) == 2  # stem output and the layer
    assert np.all(np.asarray(last["train/attn_frobenius_over_sqrt_n"]) <= 1 + 1e-6)  # softmax
    assert last["eval/accuracy"] == res.final_eval["accuracy"]


def test_bit_reproducible_with_same_seed(runs):
    a, b, c = runs
    assert a.history == b.history
    assert a.final_eval == b.final_eval
    for x, y in zip(jax.tree.leaves(a.model), jax.tree.leaves(b.model)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.history[-1]["train/loss"] != c.history[-1]["train/loss"]


def test_ensemble_matches_separate_runs(digits, runs):
    models = [levit.build(_tiny(digits), s) for s in (0, 1)]
    streams = [data.batches(digits.x_train, digits.y_train, 32, seed=s) for s in (0, 1)]
    res = training.train_ensemble(models, levit.classifier_loss, streams, _config(), seeds=[0, 1],
                                  eval_fn=levit.classifier_eval,
                                  eval_batches=data.eval_batches(digits.x_test, digits.y_test, 450))
    for ens, single in zip(res, (runs[0], runs[2])):
        np.testing.assert_allclose(
            [h["train/loss"] for h in ens.history], [h["train/loss"] for h in single.history], rtol=1e-4
        )


def test_train_config_validation_and_schedule():
    with pytest.raises(ValueError, match="warmup_steps=10 must be < steps=10"):
        training.TrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="learning_rate=-1.0"):
        training.TrainConfig(learning_rate=-1.0)
    sched = training.make_schedule(training.TrainConfig(steps=100, warmup_steps=10, learning_rate=1.0))
    assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
    assert float(sched(55)) < float(sched(20)) and abs(float(sched(100))) < 1e-6


def test_peak_learning_rate_is_a_step_argument(digits):
    """Training at two rates reuses one compiled step, and 3 steps at each rate equal the
    plain optimiser (make_optimizer at that rate) applied by hand."""
    import dataclasses

    batches = list(data.batches(digits.x_train, digits.y_train, 32, seed=0, epochs=1))[:3]
    tiny = _tiny(digits)  # float64 parameters: Adam's g / sqrt(v) amplifies float32 rounding
    tiny = dataclasses.replace(tiny, block=dataclasses.replace(tiny.block, param_dtype="float64"))
    graphdef, params0, rest = nnx.split(levit.build(tiny, 0), nnx.Param, ...)
    grad = jax.jit(jax.grad(lambda p, batch, key: levit.classifier_loss(nnx.merge(graphdef, p, rest), batch, key)[0]))
    training._compiled_step.cache_clear()
    for lr in (3e-3, 5e-2):
        cfg = training.TrainConfig(steps=3, learning_rate=lr, warmup_steps=1, log_every=1)
        trained = training.train(levit.build(tiny, 0), levit.classifier_loss, batches, cfg).model
        tx = training.make_optimizer(cfg)
        params, opt_state = params0, tx.init(params0)
        update = jax.jit(tx.update)
        for i, batch in enumerate(batches):
            updates, opt_state = update(grad(params, batch, jax.random.fold_in(jax.random.PRNGKey(0), i)),
                                        opt_state, params)
            params = optax.apply_updates(params, updates)
        for x, y in zip(jax.tree.leaves(nnx.state(trained, nnx.Param)), jax.tree.leaves(params)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-9)
    assert training._compiled_step.cache_info().misses == 1


def test_batches_run_out_is_an_error(digits):
    model = levit.build(_tiny(digits), 0)
    short = list(data.batches(digits.x_train, digits.y_train, 32, seed=0, epochs=1))[:3]
    with pytest.raises(ValueError, match="ran out"):
        training.train(model, levit.classifier_loss, short, _config())


# ---------------------------------------------------------------------------- data


def test_digits_split_deterministic_and_stratified(digits):
    assert digits.x_train.shape == (1347, 8, 8, 1) and digits.x_test.shape == (450, 8, 8, 1)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
    again = data.load_digits()
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    counts = np.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47
    assert abs(float(digits.x_train.mean())) < 1e-5 and abs(float(digits.x_train.std()) - 1) < 1e-3
    big = data.load_digits(image_size=16)
    assert big.x_train.shape == (1347, 16, 16, 1)
    np.testing.assert_array_equal(big.y_train, digits.y_train)


def test_batches_seeded_and_cover_an_epoch(digits):
    x, y = digits.x_train, digits.y_train
    one = [b["y"] for b in data.batches(x, y, 100, seed=3, epochs=1, drop_last=False)]
    two = [b["y"] for b in data.batches(x, y, 100, seed=3, epochs=1, drop_last=False)]
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    np.testing.assert_array_equal(np.sort(np.concatenate(one)), np.sort(y))
    assert all(len(b["x"]) == 64 for b, _ in zip(data.batches(x, y, 64), range(30)))


def test_cifar_offline_raises_clear_error_quickly(monkeypatch):
    # Neither package importable.
    monkeypatch.setattr(data, "_import", lambda name: None)
    t0 = time.perf_counter()
    with pytest.raises(data.DatasetUnavailableError, match="digits"):
        data.load("cifar10")
    # A package present but no network and no cache: the probe fails fast, no download.
    monkeypatch.setattr(data, "_import", lambda name: object() if name == "datasets" else None)
    monkeypatch.setattr(data, "_hf_cached", lambda: False)
    monkeypatch.setattr(data, "network_available", lambda host, port=443, timeout=0: False)
    with pytest.raises(data.DatasetUnavailableError, match="digits"):
        data.load("cifar10")
    assert time.perf_counter() - t0 < 1.0


def test_cifar_import_failure_through_sys_modules(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(data.DatasetUnavailableError, match="load\\('digits'\\)"):
        data.load_cifar10()
    with pytest.raises(ValueError, match="digits"):
        data.load("mnist")


def test_network_probe_times_out_quickly():
    t0 = time.perf_counter()
    assert data.network_available("10.255.255.1", port=9, timeout=0.2) in (True, False)
    assert time.perf_counter() - t0 < 2.0


# --------------------------------------------------------------------------- model


def test_relative_position_index():
    idx = levit.relative_position_index(4)
    assert idx.shape == (16, 16)
    np.testing.assert_array_equal(idx, idx.T)
    np.testing.assert_array_equal(np.diag(idx), 0)
    assert idx.max() == 15 and idx[0, 15] == 3 * 4 + 3


def _jitted(model, **kw):
    """One compiled program returning ``(model(x), levit.forward(model, x, **kw))``."""
    graphdef = nnx.graphdef(model)

    @jax.jit
    def both(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), levit.forward(m, x, **kw)

    return lambda x: both(nnx.state(model), x)


def test_levit_forward_and_bias(digits):
    model = levit.build(_tiny(digits, depth=2), 0)
    x = jnp.asarray(digits.x_test[:3])
    run = _jitted(model, return_hidden=True, return_attention=True)
    called, (logits, out) = run(x)
    assert logits.shape == (3, 10)
    assert out.attention.shape == (2, 3, 2, 16, 16) and out.hidden.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(called, logits, rtol=1e-6)
    # the relative position bias enters the scores: a non-zero bias changes the output
    model.relative_bias[...] = model.relative_bias[...] + jnp.arange(16, dtype=jnp.float32)[None, None, :]
    assert not np.allclose(run(x)[0], logits)
    with pytest.raises(ValueError, match="image_size / grid = 8/3"):
        levit.levit_config(image_size=8, grid=3)


def test_vit_forward_matches_call(digits):
    vit = levit.build(levit.vit_config(depth=1, width=8, num_heads=2, image_size=8, channels=1, patch_size=2), 0)
    called, (logits, out) = _jitted(vit, return_attention=True)(jnp.asarray(digits.x_test[:3]))
    np.testing.assert_allclose(called, logits, rtol=1e-6)
    assert out.attention.shape == (1, 3, 2, 16, 16) and out.hidden is None
