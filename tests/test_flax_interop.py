"""shaped_attn.attention_fn inside Flax's attention layers (nnx and linen): Flax's own softmax
attention reproduced, our MultiHeadAttention's weights reproduced for every registered name,
masks, is_causal, bias, dropout, sowing, jit, grad and KV-cache decoding."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import shaped_attn as sa
from shaped_attn import activations, flax_interop

# Head width 6: 1/sqrt(6) is not a power of two, so the order of scaling and product matters.
B, L, H, D = 2, 5, 4, 6
N = H * D


def x_in(seed=0, dtype=jnp.float64, shape=(B, L, N)):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def random_mask(seed=3):
    """Random [B, 1, L, L] mask with every query seeing itself (no fully masked row)."""
    return jax.random.bernoulli(jax.random.key(seed), 0.6, (B, 1, L, L)) | jnp.eye(L, dtype=bool)[None, None]


def nnx_mha(attention_fn=nnx.dot_product_attention, dtype="float64", seed=1, **kw):
    return nnx.MultiHeadAttention(H, N, decode=False, attention_fn=attention_fn, param_dtype=dtype,
                                  rngs=nnx.Rngs(seed), **kw)


def sown(module):
    return nnx.pop(module, nnx.Intermediate)["attention_weights"].get_value()[0]


# ------------------------------------------------------------------ Flax's softmax exactly


CASES = {"none": {}, "mask": {"mask": random_mask()}, "is_causal": {"is_causal": True},
         "mask_and_causal": {"mask": random_mask(4), "is_causal": True}}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_reproduces_flax_nnx(case, dtype):
    kw = CASES[case]
    x = x_in(dtype=dtype)
    ref, ours = nnx_mha(dtype=dtype), nnx_mha(sa.attention_fn("softmax"), dtype=dtype)
    # Sown weights: Flax's dot_product_attention_weights path, equal to the last bit.
    out_ref, out = ref(x, sow_weights=True, **kw), ours(x, sow_weights=True, **kw)
    np.testing.assert_array_equal(np.asarray(sown(ours)), np.asarray(sown(ref)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_ref))
    # Without sowing or dropout Flax takes jax.nn.dot_product_attention, which scales the
    # product instead of the query and runs its softmax in float32: equal to float32 rounding.
    fast = np.asarray(ref(x, **kw))
    np.testing.assert_allclose(np.asarray(ours(x, **kw)), fast, rtol=0, atol=1e-6)


def test_softmax_reproduces_flax_with_bias_dropout_and_gqa():
    q, k, v = (x_in(s, shape=(B, L, H, D)) for s in (5, 6, 7))
    bias = x_in(8, shape=(B, H, L, L))
    mask = random_mask()
    fn = sa.attention_fn("softmax")
    for broadcast in (True, False):
        kw = dict(bias=bias, mask=mask, dropout_rng=jax.random.key(9), dropout_rate=0.3,
                  deterministic=False, broadcast_dropout=broadcast)
        np.testing.assert_array_equal(np.asarray(fn(q, k, v, **kw)),
                                      np.asarray(nnx.dot_product_attention(q, k, v, **kw)))
    # deterministic=True ignores the rate; 2 key heads for 4 query heads (grouped queries).
    k2, v2 = k[..., :2, :], v[..., :2, :]
    kw = dict(mask=mask, dropout_rate=0.3, deterministic=True)
    np.testing.assert_allclose(np.asarray(fn(q, k2, v2, **kw)),
                               np.asarray(nnx.dot_product_attention(q, k2, v2, **kw)), atol=1e-6)


def test_fully_masked_rows_are_zero_not_flax_uniform():
    q, k, v = (x_in(s, shape=(B, L, H, D)) for s in (5, 6, 7))
    mask = jnp.ones((B, 1, L, L), bool).at[0, 0, 2].set(False)
    ours = np.asarray(sa.attention_fn("softmax")(q, k, v, mask=mask))
    flax_out = np.asarray(nnx.dot_product_attention(q, k, v, mask=mask))
    assert np.all(ours[0, 2] == 0)
    np.testing.assert_allclose(flax_out[0, 2], np.broadcast_to(v[0].mean(0), (H, D)), rtol=1e-5)
    keep = np.ones((B, L), bool)
    keep[0, 2] = False
    np.testing.assert_allclose(ours[keep], flax_out[keep], atol=1e-6)


def test_softmax_reproduces_flax_linen():
    x = x_in()
    kw = dict(num_heads=H, qkv_features=N, param_dtype=jnp.float64, dtype=jnp.float64)
    ref = linen.MultiHeadDotProductAttention(**kw)
    ours = linen.MultiHeadDotProductAttention(**kw, attention_fn=sa.attention_fn("softmax"))
    params = ref.init(jax.random.key(0), x)
    mask = random_mask()
    out_ref, st_ref = ref.apply(params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
    out, st = ours.apply(params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_ref))
    w, w_ref = (s["intermediates"]["attention_weights"][0] for s in (st, st_ref))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(w_ref))


# ------------------------------------------------------- our MultiHeadAttention, every name


def flax_copy_of(ours: sa.MultiHeadAttention, fn, dtype="float64"):
    """An nnx.MultiHeadAttention carrying our module's kernels (no biases)."""
    m = nnx_mha(fn, dtype=dtype, use_bias=False)
    m.query.kernel[...] = ours.query.kernel[...].reshape(N, H, D)
    m.key.kernel[...] = ours.key.kernel[...].reshape(N, H, D)
    m.value.kernel[...] = ours.value.kernel[...].reshape(N, H, D)
    m.out.kernel[...] = ours.output.kernel[...].reshape(H, D, N)
    return m


VARIANTS = [(name, "after_scaling") for name in activations.names()] + [
    (name, "before_scaling") for name in activations.names() if name.startswith("norm_")]


@pytest.mark.parametrize("name, order", VARIANTS)
def test_every_activation_equals_our_multi_head_attention(name, order):
    cfg = sa.AttentionConfig(N, num_heads=H, activation=name, causal=True, prenorm_order=order)
    ours = sa.MultiHeadAttention(cfg, param_dtype="float64", rngs=nnx.Rngs(5))
    x = 2.0 * x_in(10)
    out, w = ours(x, return_weights=True)
    flax_mha = flax_copy_of(ours, sa.attention_fn(name, prenorm_order=order))
    out_flax = flax_mha(x, is_causal=True, sow_weights=True)
    np.testing.assert_allclose(np.asarray(sown(flax_mha)), np.asarray(w), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(out_flax), np.asarray(out), rtol=1e-10, atol=1e-12)


def test_shaping_gains_and_temperature_equal_our_shaped_attention():
    cfg = sa.AttentionConfig(N, num_heads=H, temperature="shaped", tau0=0.7, identity_gain=1.0,
                             centre_gain=0.5, causal=True)
    ours = sa.MultiHeadAttention(cfg, param_dtype="float64", rngs=nnx.Rngs(6))
    x = x_in(11)
    out, w = ours(x, return_weights=True)
    fn = sa.attention_fn("softmax", identity_gain=1.0, centre_gain=0.5,
                         temperature=sa.functional.temperature(cfg))
    flax_mha = flax_copy_of(ours, fn)
    np.testing.assert_allclose(np.asarray(flax_mha(x, is_causal=True, sow_weights=True)),
                               np.asarray(out), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(sown(flax_mha)), np.asarray(w), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------- jit, grad, decode


@pytest.mark.parametrize("name", ["sin2max_shifted", "norm_sin2max_shifted", "polynomial3", "shaped_softmax"])
def test_jit_and_grad(name):
    layer = nnx_mha(sa.attention_fn(name))
    x = x_in(12)
    mask = random_mask()

    @nnx.jit
    def loss(layer, x):
        return jnp.sum(layer(x, mask=mask, is_causal=True) ** 2)

    eager = jnp.sum(layer(x, mask=mask, is_causal=True) ** 2)
    np.testing.assert_allclose(float(loss(layer, x)), float(eager), rtol=1e-12)
    grads = nnx.grad(loss)(layer, x)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


@pytest.mark.parametrize("fn_kwargs", [
    {"activation": "softmax"}, {"activation": "sin2max_shifted"}, {"activation": "shaped_softmax"},
    {"activation": "softmax", "identity_gain": 1.0, "centre_gain": 1.0},
])
def test_token_by_token_decode_equals_the_causal_forward(fn_kwargs):
    """nnx.MultiHeadAttention(decode=True) feeds one query against a cache of max_len keys; the
    shaping's I and C rows follow the query's absolute position (its last valid key)."""
    fn = sa.attention_fn(**fn_kwargs)
    full_layer = nnx_mha(fn)
    x = x_in(13)
    full = full_layer(x, is_causal=True)
    dec_layer = nnx_mha(fn)  # same seed: same parameters
    dec_layer.init_cache((B, L, N), dtype=jnp.float64)
    steps = [dec_layer(x[:, i : i + 1], decode=True) for i in range(L)]
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full),
                               rtol=1e-10, atol=1e-12)


def test_options_and_unknown_keywords_are_rejected():
    with pytest.raises(ValueError, match="unknown activation 'nope'"):
        sa.attention_fn("nope")
    with pytest.raises(ValueError, match="prenorm_order='before_scaling' needs"):
        sa.attention_fn("softmax", prenorm_order="before_scaling")
    with pytest.raises(ValueError, match="identity_gain=nan"):
        sa.attention_fn("softmax", identity_gain=float("nan"))
    with pytest.raises(ValueError, match="temperature=0"):
        sa.attention_fn("softmax", temperature=0)
    with pytest.raises(ValueError, match="activation='shaped_softmax' already adds"):
        sa.attention_fn("shaped_softmax", centre_gain=1.0)
    q = x_in(shape=(B, L, H, D))
    fn = sa.attention_fn("softmax")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['typo'\\]"):
        fn(q, q, q, typo=1)
    fn(q, q, q, force_fp32_for_softmax=True, promote_dtype=None)  # ignored by design
    assert set(flax_interop.IGNORED_KWARGS) >= {"force_fp32_for_softmax", "promote_dtype"}
