"""KV-cache decoding of the causal models: token-by-token logits equal the full causal forward
pass (shaped and Pre-LN), the cache's bookkeeping, and CausalLM.generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import shaped_attn as sa
from shaped_attn import functional

V, MAXLEN, N, B, L = 13, 12, 16, 2, 9


def lm(block, depth=2, **kw):
    cfg = sa.CausalLMConfig(sa.StackConfig(block, depth), vocab_size=V, max_len=MAXLEN,
                            final_norm=block.layer_norm, **kw)
    return sa.CausalLM(cfg, rngs=nnx.Rngs(0))


def tokens(seed=1, shape=(B, L)):
    return jax.random.randint(jax.random.key(seed), shape, 0, V)


BLOCKS = {
    "shaped": sa.shaped_config(N, 0.5, num_heads=2, out_proj=True, param_dtype="float64"),
    "shaped_single_head": sa.shaped_config(N, 0.7, c_minus=-2.0, param_dtype="float64"),
    "shaped_scheduled": sa.shaped_config(N, 0.5, num_heads=2, out_proj=True, init="paper",
                                         schedule=sa.recover_schedule(10), param_dtype="float64"),
    "pre_ln": sa.pre_ln_config(N, num_heads=2, param_dtype="float64"),
    "pre_ln_sin2max_shifted": sa.pre_ln_config(N, num_heads=4, activation="sin2max_shifted",
                                               param_dtype="float64"),
    "pre_ln_polynomial3": sa.pre_ln_config(N, num_heads=2, activation="polynomial3", param_dtype="float64"),
    "pre_ln_shaped_softmax": sa.pre_ln_config(N, num_heads=2, activation="shaped_softmax",
                                              param_dtype="float64"),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_cached_decoding_equals_the_full_causal_pass(name):
    block = BLOCKS[name]
    model = lm(block)
    toks = tokens()
    schedule = functional.scheduled_values(block, 4) if block.schedule else None
    full = model(toks, schedule=schedule)
    cache = model.init_cache(B)
    logits, cache = model.decode(toks[:, :3], cache, schedule=schedule)  # a prompt, then 1 by 1
    pieces = [logits]
    for i in range(3, L):
        logits, cache = model.decode(toks[:, i : i + 1], cache, schedule=schedule)
        pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(cache.index), [L, L])
    # Positions not yet written stay zero in every layer.
    assert np.all(np.asarray(cache.key)[:, :, L:] == 0)


def test_cached_decoding_under_jit():
    model = lm(BLOCKS["shaped"])
    toks = tokens(2)
    full = model(toks)

    @nnx.jit
    def step(model, tok, cache):
        return model.decode(tok, cache)

    cache = model.init_cache(B)
    pieces = []
    for i in range(L):
        logits, cache = step(model, toks[:, i : i + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(full), atol=1e-12)


def test_attention_rows_of_a_cached_query_use_its_absolute_position():
    """Shaped attention: query at position p against the cache has I at key p and C = 1/(p + 1);
    its row equals row p of the square matrix (bobby-he's cached path slices diag[:Lk, :Lk]
    and would put the 1 at key 0)."""
    cfg = sa.AttentionConfig(N, num_heads=2, identity_gain=1.0, centre_gain=1.0, causal=True)
    att = sa.MultiHeadAttention(cfg, param_dtype="float64", rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (B, L, N), jnp.float64)
    _, square = att(x, return_weights=True)
    cache = functional.init_kv_cache(cfg, (B,), MAXLEN, jnp.float64)
    maps = dict(query=att.query, key=att.key, value=att.value, output=att.output)
    (_, first), cache = functional.attention_apply(cfg, x[:, :5], **maps, return_weights=True, cache=cache)
    (_, row), cache = functional.attention_apply(cfg, x[:, 5:6], **maps, return_weights=True, cache=cache)
    assert row.shape == (B, 2, 1, MAXLEN)
    np.testing.assert_allclose(np.asarray(row[..., 0, :L]), np.asarray(square[..., 5, :]), atol=1e-14)
    np.testing.assert_allclose(np.asarray(first[..., :5]), np.asarray(square[..., :5, :5]), atol=1e-14)
    assert np.all(np.asarray(row)[..., 6:] == 0)
    with pytest.raises(ValueError, match="scores= .* cannot be used with cache="):
        functional.attention_apply(cfg, x, query=None, key=None, value=att.value, output=att.output,
                                   scores=lambda h: h, cache=cache)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generate_matches_step_by_step_sampling(temperature):
    model = lm(BLOCKS["shaped"])
    prompt = tokens(5, (B, 4))
    key = jax.random.key(6)
    out = model.generate(prompt, 6, key, temperature)
    assert out.shape == (B, 10) and out.dtype == prompt.dtype
    np.testing.assert_array_equal(np.asarray(out[:, :4]), np.asarray(prompt))
    assert np.all((np.asarray(out) >= 0) & (np.asarray(out) < V))
    # The same tokens from the full forward pass, one position at a time.
    seq = prompt
    for i in range(6):
        last = model(seq)[:, -1]
        if temperature == 0:
            nxt = jnp.argmax(last, -1)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(key, i), last / temperature, axis=-1)
        seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))
    np.testing.assert_array_equal(np.asarray(model.generate(prompt, 0, key)), np.asarray(prompt))


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=-1), "steps=-1 must be an integer >= 0"),
    (dict(steps=9), "steps=9 plus the prompt length 4 exceeds max_len=12"),
    (dict(steps=2, temperature=-1.0), "temperature=-1.0 must be a finite number >= 0"),
    (dict(steps=2, temperature=float("inf")), "temperature=inf must be a finite number >= 0"),
    (dict(steps=2, prompt=jnp.zeros((B, 4))), "prompt must be an integer array"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    model = lm(BLOCKS["pre_ln"], depth=1)
    kwargs = {"prompt": tokens(7, (B, 4)), "key": jax.random.key(0), **kwargs}
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs)


def test_cache_arguments_are_checked():
    model = lm(BLOCKS["pre_ln"], depth=1)
    with pytest.raises(ValueError, match="max_len=13 must be an integer in \\[1, 12\\]"):
        model.init_cache(B, 13)
    with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
        model.init_cache(0)
    with pytest.raises(ValueError, match="max_len=0 must be an integer >= 1"):
        functional.init_kv_cache(BLOCKS["pre_ln"].attention, (B,), 0)
    mlp_only = sa.Stack(sa.shaped_config(N, 0.5, sublayers="mlp"), 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sublayers='mlp' has no attention to cache"):
        mlp_only.init_cache((B,), 4)


def test_sample_text_continues_the_prompt():
    from shaped_attn import lm as lm_mod

    block = sa.shaped_config(N, 0.5, num_heads=2, out_proj=True, init="paper",
                             schedule=sa.recover_schedule(10), param_dtype="float64")
    cfg = sa.CausalLMConfig(sa.StackConfig(block, 1), vocab_size=256, max_len=MAXLEN, final_norm=False)
    model = sa.CausalLM(cfg, rngs=nnx.Rngs(0))
    text = lm_mod.sample_text(model, b"def f", 6, jax.random.key(0), step=10)
    again = lm_mod.sample_text(model, b"def f", 6, jax.random.key(0), step=10)
    assert text.startswith("def f") and text == again
    assert len(text.encode("utf-8", errors="surrogateescape")) >= 11
    with pytest.raises(ValueError, match="prompt=b'' must be non-empty bytes"):
        lm_mod.sample_text(model, b"", 6, jax.random.key(0))
