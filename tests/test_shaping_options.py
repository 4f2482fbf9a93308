"""Training options of the module family (issue 10): gains g1, g2, s_minus, lam, gamma fixed,
scheduled ("recover") or learned, causal centring, and the paper's training initialisation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import shaped_attn as sa
from shaped_attn import activations, config, functional, lm, training
from helpers import F64, normal64, se_mean
from shaped_attn.attention import MultiHeadAttention

N, HEADS, L, DEPTH, WARMUP = 16, 2, 6, 2, 4


def _lm(block, seed=0, final_norm=False):
    cfg = sa.CausalLMConfig(sa.StackConfig(block, DEPTH), vocab_size=N, max_len=L, final_norm=final_norm)
    return sa.CausalLM(cfg, rngs=nnx.Rngs(params=seed))


def _tokens(seed=1, batch=3):
    return jax.random.randint(jax.random.key(seed), (batch, L), 0, N)


def _shaped(**kw):
    return sa.shaped_config(N, 0.3, num_heads=HEADS, out_proj=True, init="paper", **F64, **kw)


# ---------------------------------------------------------------------------- gains


def test_unit_gains_reproduce_the_shaped_attention_exactly():
    scores = normal64(0, (2, HEADS, L, L))
    mask = functional.causal_mask(L)
    att = sa.AttentionConfig(N, num_heads=HEADS, temperature="standard", identity_gain=1.0, centre_gain=1.0)
    tau = functional.temperature(att)
    qk = scores * tau
    reference = activations.shaped_softmax(qk / tau, mask)
    one = jnp.asarray(1.0, jnp.float64)
    np.testing.assert_array_equal(functional.attention_weights(att, qk, mask=mask, gains=(one, one)), reference)
    np.testing.assert_array_equal(functional.attention_weights(att, qk, mask=mask), reference)
    half = functional.attention_weights(att, qk, mask=mask, gains=(one / 2, one))
    assert np.abs(np.asarray(half - reference)).max() > 0.1  # the gain is used


def test_learned_gains_start_as_the_fixed_model():
    tokens = _tokens()
    fixed, learned = _lm(_shaped()), _lm(_shaped(learn=config.KNOBS))
    nnx.update(learned, nnx.state(fixed))  # same weights; the learned knobs keep their init
    np.testing.assert_array_equal(learned(tokens), fixed(tokens))
    layers = learned.stack.layers.learned
    assert layers["g1"][...].shape == (DEPTH,)
    np.testing.assert_allclose(layers["lam"][...], math.sqrt(1 - 0.3**2), rtol=1e-15)
    layers["g2"][...] = jnp.zeros(DEPTH)
    assert np.abs(np.asarray(learned(tokens) - fixed(tokens))).max() > 1e-6


def test_causal_centring_matrix_rows():
    valid = jnp.broadcast_to(functional.causal_mask(L), (L, L))
    c = np.asarray(activations.centring_matrix(valid, jnp.float64))
    for i in range(L):
        np.testing.assert_array_equal(c[i, : i + 1], np.full(i + 1, 1.0 / (i + 1)))
        np.testing.assert_array_equal(c[i, i + 1 :], 0.0)
    # zero scores: the causal softmax is exactly C, so A = g1 I + C - g2 C = I at g1 = g2 = 1
    att = sa.AttentionConfig(N, temperature="standard", identity_gain=1.0, centre_gain=1.0, causal=True)
    a = functional.attention_weights(att, jnp.zeros((1, L, L), jnp.float64))
    np.testing.assert_array_equal(a[0], np.eye(L))


# ------------------------------------------------------------------------- schedules


def test_ramp_values_and_no_recompilation():
    block = _shaped(schedule=config.recover_schedule(WARMUP))
    start = functional.configured_knobs(block)
    assert start.s_minus == 1 - 1 / math.sqrt(N)
    traces = []

    def values(step):
        traces.append(step)
        return functional.scheduled_values(block, step)

    jitted = jax.jit(values)
    for step, t in [(0, 0.0), (WARMUP // 2, 0.5), (WARMUP, 1.0), (3 * WARMUP, 1.0)]:
        v = jitted(jnp.asarray(step, jnp.int32))
        assert set(v) == set(config.RECOVER_KNOBS)
        np.testing.assert_allclose(v["g1"], 1 - t, rtol=0, atol=1e-15)
        np.testing.assert_allclose(v["s_minus"], (1 - t) * start.s_minus, rtol=0, atol=1e-15)
    assert len(traces) == 1
    assert float(jitted(jnp.asarray(WARMUP))["g2"]) == 0.0  # exactly, not approximately


def test_recover_ends_at_the_vanilla_transformer_without_layernorm():
    tokens = _tokens()
    recover = _lm(_shaped(schedule=config.recover_schedule(WARMUP)))
    vanilla = _lm(sa.unshaped_config(N, 0.3, num_heads=HEADS, out_proj=True, init="paper", **F64))
    nnx.update(vanilla, nnx.state(recover))
    assert not vanilla.cfg.stack.block.attention.shaped and not vanilla.cfg.stack.block.shaped_relu
    block = recover.cfg.stack.block
    end = recover(tokens, schedule=functional.scheduled_values(block, WARMUP))
    np.testing.assert_array_equal(end, vanilla(tokens))
    start = recover(tokens, schedule=functional.scheduled_values(block, 0))
    assert np.abs(np.asarray(start - end)).max() > 1e-6
    with pytest.raises(ValueError, match="schedule"):
        recover(tokens)  # scheduled knobs need their values


# --------------------------------------------------------------------------- learning


def test_learned_knobs_receive_gradients_and_move():
    model = _lm(_shaped(learn=config.KNOBS), final_norm=True)
    batch = {"tokens": jax.random.randint(jax.random.key(3), (4, L + 1), 0, N), "step": np.int32(0)}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: lm.loss(nnx.merge(graphdef, p, rest), batch, None)[0]))(params)
    for k in config.KNOBS:
        g = np.asarray(grads["stack"]["layers"]["learned"][k][...])
        assert g.shape == (DEPTH,) and np.all(np.isfinite(g)) and np.all(g != 0), k
    before = {k: np.array(p[...]) for k, p in model.stack.layers.learned.items()}
    tx = training.make_optimizer(training.TrainConfig(steps=2, learning_rate=1e-2, warmup_steps=0))
    updates, _ = tx.update(grads, tx.init(params), params)  # one step of the shared optimiser
    nnx.update(model, optax.apply_updates(params, updates))
    for k, p in model.stack.layers.learned.items():
        assert np.all(np.asarray(p[...]) != before[k]), k


def test_knob_validation():
    with pytest.raises(ValueError, match="learn='tau'"):
        _shaped(learn=("tau",))
    with pytest.raises(ValueError, match="more than once"):
        _shaped(learn=("g1",), schedule=(config.Ramp("g1", 0.0, 3),))
    with pytest.raises(ValueError, match="do not exist"):
        sa.pre_ln_config(N, learn=("lam",))
    with pytest.raises(ValueError, match="temperature='standard'"):
        sa.BlockConfig(sa.AttentionConfig(N, temperature="shaped"), kind="shaped", init="paper")
    with pytest.raises(ValueError, match="steps=0"):
        config.Ramp("g1", 0.0, 0)
    assert functional.residual_gains(_shaped(lam=0.5)) == (0.5, 0.3)


# -------------------------------------------------------------------- initialisation


def test_paper_init_variances_by_moments():
    n, blocks = 64, 8
    assert _shaped().attention.temperature == "standard"  # tau = tau0 sqrt(n_k)
    att_cfg = sa.AttentionConfig(n, num_heads=HEADS, temperature="standard", out_proj=True)
    assert functional.temperature(att_cfg) == math.sqrt(n // HEADS)
    mods = [MultiHeadAttention(att_cfg, init="paper", param_dtype="float64", rngs=nnx.Rngs(params=s))
            for s in range(blocks)]
    for name, variance in [("query", n**-1.5), ("key", n**-1.5), ("value", 1 / n), ("output", 1 / n)]:
        w = np.concatenate([np.asarray(getattr(m, name).kernel[...]).ravel() for m in mods])
        se_var = variance * math.sqrt(2 / (w.size - 1))
        assert abs(w.var(ddof=1) - variance) < 5 * se_var, name
        assert abs(w.mean()) < 5 * math.sqrt(variance / w.size), name
        assert getattr(mods[0], name).bias is None
    # tau0 = 1 equivalence: E[(x W_Q W_K^T y / tau)^2] = |x|^2 |y|^2 / n^3, as with theory init
    x = normal64(7, (3, n))
    att1 = sa.AttentionConfig(n, temperature="standard")

    def scaled_scores(key):
        m = MultiHeadAttention(att1, init="paper", param_dtype="float64", rngs=nnx.Rngs(params=key))
        return (m.query(x) @ m.key(x).T) / functional.temperature(att1)

    s2 = jax.vmap(scaled_scores)(jax.random.split(jax.random.key(8), 4000)) ** 2
    sq = jnp.sum(x**2, axis=1)
    ratio = np.asarray((s2 / (sq[:, None] * sq[None, :] / n**3)[None]).mean(axis=(1, 2)))
    assert abs(ratio.mean() - 1) < 5 * se_mean(ratio, ddof=1)


def test_paper_init_keeps_other_weights_theory_and_gamma_small():
    block = sa.Block(_shaped(), rngs=nnx.Rngs(params=0))
    assert block.mlp_in.bias is None and block.cfg.gamma == 0.3
    theory = sa.Block(sa.shaped_config(N, 0.3, num_heads=HEADS, out_proj=True, **F64), rngs=nnx.Rngs(params=0))
    np.testing.assert_array_equal(block.mlp_in.kernel[...], theory.mlp_in.kernel[...])
    np.testing.assert_allclose(block.attention.query.kernel[...],
                               theory.attention.query.kernel[...] * N**-0.25, rtol=1e-12)
    cfg = config.shaped_config(128, 0.1, init="paper")
    assert functional.residual_gains(cfg) == pytest.approx((math.sqrt(0.99), 0.1))
