"""Stack (scan over layers) against layer-by-layer application, configs, vmap over keys,
and the two model heads (shapes, gradients, causality)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import shaped_attn as sa
from shaped_attn import functional

# Small, shared shapes: on CPU most of the test time is XLA compiling the random-number and
# matmul kernels once per distinct shape, so the tests reuse (DEPTH, N, N) kernels where they can.
N, M, B, DEPTH = 16, 5, 2, 2


def inputs(seed=0, shape=(B, M, N)):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


# ------------------------------------------------------------------------------- Stack


STACK_CONFIGS = {
    "shaped": sa.shaped_config(N, 0.7, param_dtype="float64"),
    "shaped_causal": sa.shaped_config(N, 0.5, causal=True, param_dtype="float64"),
    "pre_ln_heads": sa.pre_ln_config(N, num_heads=4, init="standard", param_dtype="float64"),
    "post_ln_attention_only": sa.post_ln_config(N, num_heads=2, sublayers="attention", param_dtype="float64"),
}


@pytest.mark.parametrize("name", list(STACK_CONFIGS))
def test_stack_equals_layers_applied_one_by_one(name):
    cfg = STACK_CONFIGS[name]
    stack = sa.Stack(cfg, DEPTH, rngs=nnx.Rngs(0))
    x = inputs(1)
    mask = jnp.asarray(np.random.default_rng(0).random((M, M)) < 0.8) | jnp.eye(M, dtype=bool)
    out = stack(x, mask, return_hidden=True, return_attention=True)
    heads = cfg.attention.num_heads
    assert out.hidden.shape == (DEPTH + 1, B, M, N)
    assert out.attention.shape == (DEPTH, B, heads, M, M)
    np.testing.assert_array_equal(np.asarray(out.hidden[0]), np.asarray(x))

    stacked = nnx.state(stack.layers)
    h = x
    kernels = []
    for i in range(DEPTH):
        block = sa.Block(cfg, rngs=nnx.Rngs(123))  # fresh parameters, then overwritten
        nnx.update(block, jax.tree.map(lambda a: a[i], stacked))
        kernels.append(np.asarray(block.attention.value.kernel[...]))
        h, att = block(h, mask, return_attention=True)
        np.testing.assert_allclose(np.asarray(out.hidden[i + 1]), np.asarray(h), rtol=0, atol=1e-10)
        np.testing.assert_allclose(np.asarray(out.attention[i]), np.asarray(att), rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(out.output), np.asarray(h), rtol=0, atol=1e-10)
    # layers are independently initialised, and the stack actually changes its input
    assert not np.allclose(kernels[0], kernels[1])
    assert np.abs(np.asarray(out.output - x)).max() > 1e-2


def test_stack_mlp_only_returns_no_attention():
    cfg = sa.shaped_config(N, 0.5, sublayers="mlp", param_dtype="float64")
    stack = sa.Stack(cfg, DEPTH, rngs=nnx.Rngs(0))
    out = stack(inputs(), return_hidden=True, return_attention=True)
    assert out.attention is None and out.hidden.shape == (DEPTH + 1, B, M, N)
    plain = stack(inputs())  # no return_* flag: just the output array
    assert isinstance(plain, jax.Array)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(out.output))


def test_stack_under_vmap_over_keys():
    """The Monte Carlo pattern: build from a key and run, vmapped over keys."""
    cfg = sa.shaped_config(N, 0.5, param_dtype="float64")
    x0 = inputs(2, (M, N))
    keys = jax.random.split(jax.random.key(0), 4)
    run = lambda k: sa.Stack(cfg, DEPTH, rngs=nnx.Rngs(k))(x0, return_hidden=True).hidden
    hidden = jax.jit(jax.vmap(run))(keys)
    assert hidden.shape == (4, DEPTH + 1, M, N)
    # same numbers as the plain (eager, unbatched) construction with that key
    np.testing.assert_allclose(np.asarray(hidden[2]), np.asarray(run(keys[2])), rtol=0, atol=1e-10)
    assert np.abs(np.asarray(hidden[0, -1] - hidden[1, -1])).max() > 1e-2  # keys differ
    gram = jnp.einsum("kdmn,kdpn->kdmp", hidden, hidden) / N  # V_l = X_l X_l^T / n
    assert gram.shape == (4, DEPTH + 1, M, M) and bool(jnp.all(jnp.isfinite(gram)))


def test_stack_rejects_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        sa.Stack(sa.shaped_config(N, 0.5), 0, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- configs


BAD_ATTENTION = [
    ("width", dict(width=0)),
    ("num_heads", dict(width=8, num_heads=0)),
    ("head_dim", dict(width=8, head_dim=0)),
    ("num_heads", dict(width=10, num_heads=4)),
    ("num_heads", dict(width=10, num_heads=4, head_dim=3, out_proj=True)),
    ("activation", dict(width=8, activation="nosuchmax")),
    ("temperature", dict(width=8, temperature="hot")),
    ("tau0", dict(width=8, tau0=0.0)),
    ("tau0", dict(width=8, tau0=-1.0)),
    ("query_init", dict(width=8, query_init="ones")),
    ("identity_gain", dict(width=8, identity_gain=float("nan"))),
    ("shaped_softmax", dict(width=8, activation="shaped_softmax", identity_gain=1.0)),
]


@pytest.mark.parametrize("param,kwargs", BAD_ATTENTION)
def test_attention_config_validation(param, kwargs):
    with pytest.raises(ValueError, match=param):
        sa.AttentionConfig(**kwargs)


ATT = sa.AttentionConfig(8)
BAD_BLOCK = [
    ("gamma", dict(gamma=0.0)),
    ("gamma", dict(gamma=1.5)),
    ("gamma", dict(gamma=-0.2)),
    ("kind", dict(kind="sandwich_ln")),
    ("init", dict(init="xavier")),
    ("sublayers", dict(sublayers="neither")),
    ("mlp_hidden", dict(mlp_hidden=0)),
    ("param_dtype", dict(param_dtype="int32")),
    ("ln_eps", dict(ln_eps=0.0)),
    ("attention", dict(attention="softmax")),
]


@pytest.mark.parametrize("param,kwargs", BAD_BLOCK)
def test_block_config_validation(param, kwargs):
    kwargs = {"attention": ATT, **kwargs}
    with pytest.raises(ValueError, match=param):
        sa.BlockConfig(**kwargs)


def test_config_validation_messages_are_one_line_and_name_the_value():
    with pytest.raises(ValueError, match="gamma=2.0") as err:
        sa.shaped_config(8, gamma=2.0)
    assert str(err.value) == "gamma=2.0 is outside (0, 1]"
    with pytest.raises(ValueError, match="ablation"):
        sa.shaped_config(8, 0.5, ablation="no_softmax")
    with pytest.raises(ValueError, match="depth"):
        sa.StackConfig(sa.shaped_config(8, 0.5), depth=0)
    with pytest.raises(ValueError, match="patch_size"):
        sa.ImageClassifierConfig(sa.StackConfig(sa.pre_ln_config(8), 1), 10, image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="vocab_size"):
        sa.CausalLMConfig(sa.StackConfig(sa.pre_ln_config(8), 1), vocab_size=0)


def test_configs_resolve_defaults_and_are_hashable():
    att = sa.AttentionConfig(12, num_heads=3)
    assert att.head_dim == 4 and att.value_dim == 4
    att = sa.AttentionConfig(12, num_heads=5, head_dim=2, out_proj=False)  # 5 does not divide 12
    assert att.value_dim == 12
    cfg = sa.shaped_config(12, 0.5, activation=sa.activations.softmax)
    assert cfg.mlp_hidden == 12 and hash(cfg) == hash(sa.shaped_config(12, 0.5, activation=sa.activations.softmax))
    assert cfg.attention.shaped and not sa.unshaped_config(12, 0.5).attention.shaped
    assert functional.residual_gains(sa.shaped_config(12, 0.6)) == pytest.approx((0.8, 0.6))
    assert functional.residual_gains(sa.pre_ln_config(12)) == (1.0, 1.0)


# ------------------------------------------------------------------------------ models


def finite_nonzero_grads(grads):
    leaves = jax.tree.leaves(grads)
    assert leaves
    for g in leaves:
        assert bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize("stem,block", [
    ("patch", sa.pre_ln_config(N, num_heads=2, init="standard", param_dtype="float64")),
    ("conv", sa.shaped_config(N, 0.5, param_dtype="float64")),
], ids=["patch_pre_ln", "conv_shaped"])
def test_image_classifier_shapes_and_gradients(stem, block):
    cfg = sa.ImageClassifierConfig(
        sa.StackConfig(block, DEPTH), num_classes=N, image_size=16, channels=3, stem=stem,
        patch_size=4, conv_layers=2, final_norm=True,
    )  # 16 tokens, N classes: parameter shapes shared with the other tests (compile once)
    assert cfg.num_tokens == 16
    model = sa.ImageClassifier(cfg, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3), jnp.float64)
    labels = jnp.array([0, 3, 4])
    assert model.tokens(images).shape == (3, 16, N)

    if stem == "conv":  # forward only (each gradient compile costs seconds on CPU)
        logits = model(images)
        assert logits.shape == (3, N) and bool(jnp.all(jnp.isfinite(logits)))
        return

    def loss(model):
        logits = model(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (value, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    assert logits.shape == (3, N) and bool(jnp.isfinite(value))
    finite_nonzero_grads(grads)


@pytest.mark.parametrize("block", [
    sa.pre_ln_config(N, num_heads=2, param_dtype="float64"),
    sa.shaped_config(N, 0.5, causal=True, param_dtype="float64"),
], ids=["pre_ln", "shaped"])
def test_causal_lm_shapes_gradients_and_causality(block):
    vocab = N  # parameter shapes shared with the other tests (compile once)
    cfg = sa.CausalLMConfig(sa.StackConfig(block, DEPTH), vocab_size=vocab, max_len=N)
    model = sa.CausalLM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, vocab)
    logits = model(tokens)
    assert logits.shape == (2, 7, vocab)

    if block.kind == "pre_ln":  # one gradient check per model head (compiles are slow)

        def loss(model):
            lg = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(lg, tokens[:, 1:]).mean()

        finite_nonzero_grads(nnx.jit(nnx.grad(loss))(model))

    t = 3
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 5) % vocab)
    logits2 = model(changed)
    np.testing.assert_allclose(np.asarray(logits2[:, :t + 1]), np.asarray(logits[:, :t + 1]), rtol=0, atol=1e-12)
    assert np.abs(np.asarray(logits2[:, t + 1:] - logits[:, t + 1:])).max() > 1e-6
    # and position t does depend on token t (the check above can fail)
    changed_t = tokens.at[:, t].set((tokens[:, t] + 5) % vocab)
    assert np.abs(np.asarray(model(changed_t)[:, t] - logits[:, t])).max() > 1e-6

    with pytest.raises(ValueError, match="max_len"):
        model(jnp.zeros((1, N + 1), jnp.int32))
