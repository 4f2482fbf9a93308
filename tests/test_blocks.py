"""Blocks against a literal NumPy evaluation of docs/model.md §1 and of the baselines.

Every reference below is written independently of shaped_attn.functional: weights are read
out of the modules, converted to the N(0, 1) convention of docs/model.md §1 where it is used, and
the formulas are evaluated in float64 NumPy exactly as written there.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import shaped_attn as sa
from helpers import normal64
from shaped_attn import functional

N, M, B = 16, 6, 2  # width, tokens, batch
TOL = 1e-6  # module vs the literal equations to 1e-6 (float64 gives ~1e-14)


def inputs(seed=0, m=M, n=N, batch=B):
    return np.asarray(normal64(seed, (batch, m, n)))


def build(cfg, seed=1):
    return sa.Block(cfg, rngs=nnx.Rngs(seed))


def kern(linear):
    return np.asarray(linear.kernel[...], np.float64)


def perturb_affine(block, seed=7):
    """Give every bias and LayerNorm scale a random value (in place: the state's variables
    are the module's), so a reference that ignored them (or a module that dropped them)
    fails. Returns the number of arrays changed."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    changed = 0
    for path, var in nnx.to_flat_state(nnx.state(block, nnx.Param)):
        if path[-1] in ("bias", "scale"):
            var[...] = var[...] + 0.3 * jax.random.normal(next(keys), var.shape, var.dtype)
            changed += 1
    return changed


# ------------------------------------------------------------------ literal equations (N(0,1) W)


def np_softmax_rows(s, valid):
    s = np.where(valid, s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_centring(m, causal):
    if not causal:
        return np.ones((m, m)) / m
    return np.tril(np.ones((m, m))) / np.arange(1, m + 1)[:, None]


def spec_weights(block):
    """W_Q, W_K, W_V, W_pre, W_post in the iid N(0, 1) convention of docs/model.md §1."""
    n = block.cfg.width
    w = {}
    if block.attention is not None:
        w["Q"] = kern(block.attention.query) * math.sqrt(n)
        w["K"] = kern(block.attention.key) * math.sqrt(n)
        w["V"] = kern(block.attention.value) * math.sqrt(n)
    if block.mlp_in is not None:
        w["pre"] = kern(block.mlp_in) * math.sqrt(n)
        w["post"] = kern(block.mlp_out) * math.sqrt(block.cfg.mlp_hidden)
    return w


def spec_attention(X, w, *, n, n_k, tau0, lam, gamma, causal, identity, centre, sqrt_n, shaped):
    """Spec section 1 attention sub-block, one head, returning (Z, A)."""
    m = X.shape[0]
    Y = X @ (w["Q"] / np.sqrt(n)) @ (w["K"] / np.sqrt(n)).T @ X.T
    tau = tau0 * np.sqrt(n * n_k) if sqrt_n else tau0 * np.sqrt(n_k)
    valid = np.tril(np.ones((m, m), bool)) if causal else np.ones((m, m), bool)
    A = np_softmax_rows(Y / tau, valid)
    if shaped:
        A = identity * np.eye(m) + A - centre * np_centring(m, causal)
    A = np.where(valid, A, 0.0)
    Z = lam * X + gamma * A @ X @ w["V"] / np.sqrt(n)
    return Z, A


def spec_mlp(Z, w, *, n, hidden, lam, gamma, c_plus, c_minus, shaped):
    if shaped:
        s_plus, s_minus = 1 + c_plus / np.sqrt(n), 1 + c_minus / np.sqrt(n)
    else:
        s_plus, s_minus = 1.0, 0.0
    c = 2 / (s_plus**2 + s_minus**2)
    H = Z @ w["pre"] / np.sqrt(n)
    sig = s_plus * np.maximum(H, 0) + s_minus * np.minimum(H, 0)
    return lam * Z + gamma * sig * np.sqrt(c / hidden) @ w["post"]


def spec_layer(cfg, block, X):
    """The literal layer of docs/model.md §1 for shaped / unshaped kinds (single head, out_proj=False)."""
    att = cfg.attention
    assert att.num_heads == 1 and not att.out_proj
    n, gamma = cfg.width, cfg.gamma
    lam = np.sqrt(1 - gamma**2)
    w = spec_weights(block)
    A = None
    if cfg.sublayers in ("both", "attention"):
        X, A = spec_attention(
            X, w, n=n, n_k=att.head_dim, tau0=att.tau0, lam=lam, gamma=gamma,
            causal=att.causal, identity=att.identity_gain, centre=att.centre_gain,
            sqrt_n=att.temperature == "shaped", shaped=cfg.kind == "shaped",
        )
    if cfg.sublayers in ("both", "mlp"):
        X = spec_mlp(
            X, w, n=n, hidden=cfg.mlp_hidden, lam=lam, gamma=gamma, c_plus=cfg.c_plus,
            c_minus=cfg.c_minus, shaped=cfg.shaped_relu,
        )
    return X, A


def check_against_spec(cfg, seed=0, x=None):
    block = build(cfg, seed=seed + 1)
    x = inputs(seed) if x is None else x
    y, att = block(jnp.asarray(x), return_attention=True)
    for b in range(x.shape[0]):
        y_ref, a_ref = spec_layer(cfg, block, x[b])
        np.testing.assert_allclose(np.asarray(y[b]), y_ref, rtol=0, atol=TOL)
        if a_ref is not None:
            np.testing.assert_allclose(np.asarray(att[b, 0]), a_ref, rtol=0, atol=TOL)
    if cfg.sublayers == "mlp":
        assert att is None
    # The output must actually move away from the input (else the check is vacuous).
    assert np.abs(np.asarray(y) - x).max() > 1e-2
    return block, y, att


@pytest.mark.parametrize("sublayers", ["both", "attention", "mlp"])
@pytest.mark.parametrize("causal", [False, True])
def test_shaped_block_matches_spec(sublayers, causal):
    cfg = sa.shaped_config(
        N, 0.6, tau0=0.7, c_plus=0.5, c_minus=-1.5, causal=causal, sublayers=sublayers,
        param_dtype="float64",
    )
    check_against_spec(cfg)


def test_shaped_block_head_dim_and_hidden_differ_from_width():
    cfg = sa.shaped_config(N, 0.5, head_dim=5, mlp_hidden=2 * N, param_dtype="float64")
    assert cfg.attention.head_dim == 5 and cfg.mlp_hidden == 2 * N
    check_against_spec(cfg)


@pytest.mark.parametrize("ablation", ["no_centre", "no_identity", "no_sqrt_n"])
@pytest.mark.parametrize("causal", [False, True])
def test_ablations_match_spec(ablation, causal):
    cfg = sa.shaped_config(N, 1 / math.sqrt(2), ablation=ablation, causal=causal, param_dtype="float64")
    att = cfg.attention
    expected = {
        "no_centre": (1.0, 0.0, "shaped"),
        "no_identity": (0.0, 1.0, "shaped"),
        "no_sqrt_n": (1.0, 1.0, "standard"),
    }[ablation]
    assert (att.identity_gain, att.centre_gain, att.temperature) == expected
    check_against_spec(cfg)


@pytest.mark.parametrize("causal", [False, True])
def test_unshaped_block_matches_spec(causal):
    cfg = sa.unshaped_config(N, 1 / math.sqrt(8), causal=causal, param_dtype="float64")
    assert not cfg.attention.shaped and not cfg.shaped_relu and cfg.attention.temperature == "standard"
    check_against_spec(cfg)


def test_spec_reference_detects_wrong_temperature():
    """Sanity check of the harness: the sqrt(n) temperature matters at these sizes."""
    cfg = sa.shaped_config(N, 0.9, tau0=0.3, param_dtype="float64")
    block = build(cfg, seed=1)
    x = inputs(0)
    y = np.asarray(block(jnp.asarray(x)))
    w = spec_weights(block)
    z, _ = spec_attention(
        x[0], w, n=N, n_k=N, tau0=0.3, lam=np.sqrt(1 - 0.81), gamma=0.9, causal=False,
        identity=1.0, centre=1.0, sqrt_n=False, shaped=True,
    )
    y_wrong = spec_mlp(z, w, n=N, hidden=N, lam=np.sqrt(1 - 0.81), gamma=0.9, c_plus=0.0,
                       c_minus=-1.0, shaped=True)
    assert np.abs(y[0] - y_wrong).max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_zero_query_gives_identity_attention_exactly(causal):
    cfg = sa.shaped_config(N, 0.5, query_init="zero", causal=causal, param_dtype="float64")
    block = build(cfg)
    assert np.all(kern(block.attention.query) == 0)
    x = inputs(3)
    y, att = block(jnp.asarray(x), return_attention=True)
    np.testing.assert_array_equal(np.asarray(att), np.broadcast_to(np.eye(M), att.shape))
    # With A = I the attention sub-block is Z = lam X + gamma X W_V / sqrt(n).
    cfg_att = sa.shaped_config(N, 0.5, query_init="zero", causal=causal, sublayers="attention",
                               param_dtype="float64")
    block = build(cfg_att)
    z = np.asarray(block(jnp.asarray(x)))
    wv = kern(block.attention.value)
    np.testing.assert_allclose(z, np.sqrt(0.75) * x + 0.5 * x @ wv, rtol=0, atol=1e-12)


# -------------------------------------------------- multi-head / LayerNorm NumPy reference


def np_lin(x, lin):
    y = x @ kern(lin)
    if lin.bias is not None:
        y = y + np.asarray(lin.bias[...])
    return y


def np_layer_norm(x, ln, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if ln is not None:
        y = y * np.asarray(ln.scale[...]) + np.asarray(ln.bias[...])
    return y


def np_activation(name, s, valid):
    if name == "softmax":
        return np_softmax_rows(s, valid)
    if name == "cosmax":
        f = np.where(valid, np.cos(np.where(valid, s, 0)), 0)
        return f / f.sum(-1, keepdims=True)
    raise NotImplementedError(name)


def np_mha(att_cfg, mha, x, valid, bias=None):
    """Multi-head attention of one example x [m, n], returning (out, weights [H, m, m])."""
    m, n = x.shape
    H, dk = att_cfg.num_heads, att_cfg.head_dim
    dv = n // H if att_cfg.out_proj else n
    q, k, v = np_lin(x, mha.query), np_lin(x, mha.key), np_lin(x, mha.value)
    tau = att_cfg.tau0 * (np.sqrt(n * dk) if att_cfg.temperature == "shaped" else np.sqrt(dk))
    outs, ws = [], []
    for h in range(H):
        s = q[:, h * dk:(h + 1) * dk] @ k[:, h * dk:(h + 1) * dk].T / tau
        if bias is not None:
            s = s + bias[h]
        w = np_activation(att_cfg.activation, s, valid)
        if att_cfg.identity_gain or att_cfg.centre_gain:
            w = att_cfg.identity_gain * np.eye(m) + w - att_cfg.centre_gain * np_centring(m, att_cfg.causal)
        w = np.where(valid, w, 0)
        ws.append(w)
        outs.append(w @ v[:, h * dv:(h + 1) * dv])
    if att_cfg.out_proj:
        out = np_lin(np.concatenate(outs, axis=-1), mha.output)
    else:
        out = sum(outs) / np.sqrt(H)
    return out, np.stack(ws)


def np_block(cfg, block, x):
    """Pre-LN / post-LN / generic block on one example, from the module's parameters."""
    m = x.shape[0]
    valid = np.tril(np.ones((m, m), bool)) if cfg.attention.causal else np.ones((m, m), bool)
    g = cfg.gamma
    relu = lambda h: np.sqrt(2.0) * np.maximum(h, 0)  # standard ReLU, c = 2
    mlp = lambda h: np_lin(relu(np_lin(h, block.mlp_in)), block.mlp_out)
    att = lambda h: np_mha(cfg.attention, block.attention, h, valid)
    ln_a = lambda h: np_layer_norm(h, block.norm_attn, cfg.ln_eps)
    ln_m = lambda h: np_layer_norm(h, block.norm_mlp, cfg.ln_eps)
    if cfg.kind == "pre_ln":
        a_out, A = att(ln_a(x))
        z = x + g * a_out
        return z + g * mlp(ln_m(z)), A
    if cfg.kind == "post_ln":
        a_out, A = att(x)
        z = ln_a(x + g * a_out)
        return ln_m(z + g * mlp(z)), A
    raise ValueError(cfg.kind)


@pytest.mark.parametrize("kind", ["pre_ln", "post_ln"])
@pytest.mark.parametrize("init", ["theory", "standard"])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_norm_blocks_match_reference(kind, init, causal):
    make = sa.pre_ln_config if kind == "pre_ln" else sa.post_ln_config
    cfg = make(N, num_heads=4, init=init, causal=causal, param_dtype="float64")
    block = build(cfg, seed=2)
    n_affine = perturb_affine(block)
    assert n_affine == 4 + (6 if init == "standard" else 0)  # LN scale/bias x2, 6 linear biases
    x = inputs(4)
    y, att = block(jnp.asarray(x), return_attention=True)
    assert att.shape == (B, 4, M, M)
    for b in range(B):
        y_ref, a_ref = np_block(cfg, block, x[b])
        np.testing.assert_allclose(np.asarray(y[b]), y_ref, rtol=0, atol=TOL)
        np.testing.assert_allclose(np.asarray(att[b]), a_ref, rtol=0, atol=TOL)
    assert np.abs(np.asarray(y) - x).max() > 1e-2


@pytest.mark.parametrize("out_proj", [True, False])
@pytest.mark.parametrize("shaped", [True, False])
def test_multi_head_layouts(out_proj, shaped):
    H = 4
    cfg = sa.AttentionConfig(
        N, num_heads=H, head_dim=3 if not out_proj else None, out_proj=out_proj,
        temperature="shaped" if shaped else "standard",
        identity_gain=float(shaped), centre_gain=float(shaped),
    )
    mha = sa.MultiHeadAttention(cfg, param_dtype="float64", rngs=nnx.Rngs(0))
    dk = cfg.head_dim
    dv = N // H if out_proj else N
    assert mha.query.kernel.shape == (N, H * dk) and mha.key.kernel.shape == (N, H * dk)
    assert mha.value.kernel.shape == (N, H * dv)
    assert (mha.output is not None) == out_proj
    if out_proj:
        assert mha.output.kernel.shape == (H * dv, N)
    x = inputs(5)
    bias = np.asarray(jax.random.normal(jax.random.key(9), (H, M, M)))
    y, w = mha(jnp.asarray(x), score_bias=jnp.asarray(bias), return_weights=True)
    assert y.shape == (B, M, N) and w.shape == (B, H, M, M)
    valid = np.ones((M, M), bool)
    for b in range(B):
        y_ref, w_ref = np_mha(cfg, mha, x[b], valid, bias=bias)
        np.testing.assert_allclose(np.asarray(y[b]), y_ref, rtol=0, atol=TOL)
        np.testing.assert_allclose(np.asarray(w[b]), w_ref, rtol=0, atol=TOL)
    # the bias matters
    y0 = mha(jnp.asarray(x))
    assert np.abs(np.asarray(y0) - np.asarray(y)).max() > 1e-3


def test_multi_head_unbatched_input():
    cfg = sa.AttentionConfig(N, num_heads=2)
    mha = sa.MultiHeadAttention(cfg, param_dtype="float64", rngs=nnx.Rngs(0))
    x = inputs(6)
    y, w = mha(jnp.asarray(x[0]), return_weights=True)
    assert y.shape == (M, N) and w.shape == (2, M, M)
    np.testing.assert_allclose(np.asarray(y), np.asarray(mha(jnp.asarray(x)))[0], atol=1e-12)


def test_single_head_without_out_proj_is_the_spec_block():
    """AttentionConfig built by hand (H=1, out_proj=False) inside a Block = docs/model.md §1."""
    att = sa.AttentionConfig(N, num_heads=1, out_proj=False, temperature="shaped",
                             identity_gain=1.0, centre_gain=1.0)
    cfg = sa.BlockConfig(att, kind="shaped", gamma=0.4, shaped_relu=True, c_plus=0.3,
                         c_minus=-0.8, param_dtype="float64")
    block, _, _ = check_against_spec(cfg)
    assert block.attention.output is None


def test_periodic_activation_with_shaping():
    """A = I + normalize(cos(Y / tau)) - C: shaping works with a non-softmax activation."""
    att = sa.AttentionConfig(N, num_heads=2, out_proj=False, activation="cosmax",
                             temperature="shaped", identity_gain=1.0, centre_gain=1.0, causal=True)
    mha = sa.MultiHeadAttention(att, param_dtype="float64", rngs=nnx.Rngs(3))
    x = inputs(8)
    y, w = mha(jnp.asarray(x), return_weights=True)
    valid = np.tril(np.ones((M, M), bool))
    for b in range(B):
        y_ref, w_ref = np_mha(att, mha, x[b], valid)
        np.testing.assert_allclose(np.asarray(w[b]), w_ref, rtol=0, atol=TOL)
        np.testing.assert_allclose(np.asarray(y[b]), y_ref, rtol=0, atol=TOL)


def test_callable_activation():
    calls = []

    def my_act(scores, mask=None):
        calls.append(scores.shape)
        return sa.activations.softmax(2.0 * scores, mask)

    att = sa.AttentionConfig(N, num_heads=2, activation=my_act)
    ref = sa.AttentionConfig(N, num_heads=2, tau0=0.5)
    x = jnp.asarray(inputs(2))
    y = sa.MultiHeadAttention(att, param_dtype="float64", rngs=nnx.Rngs(0))(x)
    y_ref = sa.MultiHeadAttention(ref, param_dtype="float64", rngs=nnx.Rngs(0))(x)
    assert calls == [(B, 2, M, M)]
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-12)


# ------------------------------------------------------------------------- init schemes


def test_theory_init_variance_and_no_bias():
    n, hidden = 128, 384
    cfg = sa.shaped_config(n, 0.5, num_heads=2, head_dim=40, mlp_hidden=hidden, param_dtype="float64")
    block = build(cfg, seed=11)
    params = nnx.state(block, nnx.Param)
    names = [p[-1] for p, _ in nnx.to_flat_state(params)]
    assert names and all(nm == "kernel" for nm in names), names
    for lin, fan_in in [
        (block.attention.query, n), (block.attention.key, n), (block.attention.value, n),
        (block.mlp_in, n), (block.mlp_out, hidden),
    ]:
        assert lin.bias is None
        w = kern(lin).ravel()
        var, size = 1.0 / fan_in, w.size
        se = var * math.sqrt(2.0 / (size - 1))
        assert abs(w.var() - var) < 5 * se, (lin.kernel.shape, w.var(), var)
        # untruncated normal: fourth standardised moment 3 (a 2-sigma truncated normal: ~2.4)
        z = w * math.sqrt(fan_in)
        assert abs(np.mean(z**4) - 3.0) < 5 * math.sqrt(96.0 / size)
        assert np.abs(z).max() > 3.0


def test_standard_init_has_biases():
    cfg = sa.pre_ln_config(N, num_heads=2, init="standard", param_dtype="float64")
    block = build(cfg)
    for lin in (block.attention.query, block.attention.key, block.attention.value,
                block.attention.output, block.mlp_in, block.mlp_out):
        assert lin.bias is not None
    assert block.norm_attn is not None and block.norm_mlp is not None


def test_param_dtype():
    block = build(sa.shaped_config(N, 0.5))
    assert block.attention.query.kernel.dtype == jnp.float32
    block = build(sa.shaped_config(N, 0.5, param_dtype="float64"))
    assert block.attention.query.kernel.dtype == jnp.float64


# ---------------------------------------------------------------- functional single sources


def test_functional_layer_norm_equals_module_layer_norm():
    cfg = sa.pre_ln_config(N, ln_eps=1e-3, param_dtype="float64")
    ln = sa.blocks.layer_norm_module(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(3.0 + 2.0 * inputs(1))
    np.testing.assert_array_equal(np.asarray(ln(x)), np.asarray(functional.layer_norm(x, 1e-3)))
    np.testing.assert_allclose(np.asarray(functional.layer_norm(x, 1e-3)),
                               np_layer_norm(np.asarray(x), None, 1e-3), atol=1e-13)


def test_shaped_relu_formula():
    x = jnp.linspace(-3.0, 3.0, 13)
    s_plus, s_minus = functional.relu_slopes(25, 1.0, -2.0)
    assert (s_plus, s_minus) == (1.2, 0.6)
    c = 2 / (1.2**2 + 0.6**2)
    ref = np.sqrt(c) * np.where(np.asarray(x) > 0, 1.2 * np.asarray(x), 0.6 * np.asarray(x))
    np.testing.assert_allclose(np.asarray(functional.shaped_relu(x, s_plus, s_minus)), ref, atol=1e-14)
    # standard ReLU times sqrt(2), unit second moment under N(0, 1)
    g = normal64(0, (200_000,))
    m2 = float(jnp.mean(functional.shaped_relu(g) ** 2))
    assert abs(m2 - 1.0) < 5 * math.sqrt(5.0 / 200_000)  # Var[out^2] = 6 - 1


def test_temperature_formula():
    att = sa.AttentionConfig(64, num_heads=4, temperature="shaped", tau0=2.0)
    assert functional.temperature(att) == pytest.approx(2.0 * math.sqrt(64 * 16))
    att = sa.AttentionConfig(64, num_heads=4, temperature="standard", tau0=2.0)
    assert functional.temperature(att) == pytest.approx(2.0 * 4.0)


def test_block_apply_with_plain_maps_counts_each_map_once():
    """The map protocol the Gram sampler relies on: any callables, each called once."""
    cfg = sa.shaped_config(N, 0.5, param_dtype="float64")
    block = build(cfg)
    x = jnp.asarray(inputs(2))
    calls = {}

    def counted(name, kernel):
        def f(h):
            calls[name] = calls.get(name, 0) + 1
            assert h.shape[-2:] == (M, kernel.shape[0])
            return h @ kernel
        return f

    w = {k: jnp.asarray(kern(getattr(block.attention, k))) for k in ("query", "key", "value")}
    w.update(mlp_in=jnp.asarray(kern(block.mlp_in)), mlp_out=jnp.asarray(kern(block.mlp_out)))
    maps = functional.BlockMaps(**{k: counted(k, v) for k, v in w.items()})
    y = functional.block_apply(cfg, x, maps=maps)
    assert calls == {k: 1 for k in w}
    np.testing.assert_allclose(np.asarray(y), np.asarray(block(x)), atol=1e-13)
    with pytest.raises(ValueError, match="no LayerNorm"):
        functional.block_apply(cfg, x, maps=maps._replace(norm_attn=lambda h: h))
