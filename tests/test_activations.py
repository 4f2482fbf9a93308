"""Activation registry: formulas (against independent NumPy), masking, extremes, gradients."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shaped_attn import activations as act

PERIODIC = ["sinmax", "cosmax", "sin2max", "sin2max_shifted", "sirenmax", "sin10max", "sin_softmax"]
REQUIRED = (
    ["softmax", *PERIODIC]
    + [f"norm_{n}" for n in ["softmax", *PERIODIC]]
    + ["polynomial2", "polynomial3", "shaped_softmax", "sigmoid", "relu", "linear"]
)
NONNEGATIVE = ["sin2max", "sin2max_shifted", "sirenmax", "sin10max"]
SIGNED = ["sinmax", "cosmax"]
L = 6


# ------------------------------------------------------------- independent NumPy references


def _np_f(name):
    return {
        "sinmax": np.sin,
        "cosmax": np.cos,
        "sin2max": lambda s: np.sin(s) ** 2,
        "sin2max_shifted": lambda s: (1 + np.sin(2 * s)) / 2,  # = sin(s + pi/4)^2
        "sirenmax": lambda s: (np.sin(s) + 1) / np.maximum(2 - 2 * np.sin(s), act.DENOMINATOR_EPS),
        "sin10max": lambda s: 1 + np.sin(10 * s),
    }[name]


def _np_normalise(f, nonnegative):
    """The documented guards (docs/activations.md): exact for f >= 0; for signed f the row sum
    keeps its sign (0 -> +) and |sum| >= 1e-4 sum|f|; a row of zeros gives zeros."""
    scale = np.abs(f).sum()
    if scale == 0:
        return np.zeros_like(f)
    total = f.sum()
    if nonnegative:
        return f / total
    return f / (np.sign(total + (total == 0)) * max(abs(total), act.SIGNED_DENOMINATOR_RTOL * scale))


def np_reference(name, s, valid):
    """Row-by-row evaluation of docs/activations.md on the valid keys of each row."""
    out = np.zeros_like(s)
    for idx in np.ndindex(*s.shape[:-1]):
        keep = valid[idx]
        n = keep.sum()
        if n == 0:
            continue
        x = s[idx][keep]
        if name.startswith("norm_"):
            var = x.var(ddof=1) if n > 1 else 0.0
            x = (x - x.mean()) / np.sqrt(var + 1e-5)
            name_ = name[5:]
        else:
            name_ = name
        if name_ == "softmax":
            e = np.exp(x - x.max())
            w = e / e.sum()
        elif name_ == "sin_softmax":
            e = np.exp(np.sin(x))
            w = e / e.sum()
        elif name_ in act.ELEMENTWISE:
            w = _np_normalise(_np_f(name_)(x), name_ in NONNEGATIVE)
        elif name_.startswith("polynomial"):
            w = x ** int(name_[-1]) / math.sqrt(n)
        elif name_ == "sigmoid":
            w = 1 / (1 + np.exp(-(x - np.log(n))))
        elif name_ == "relu":
            w = np.maximum(x, 0) / n
        elif name_ == "linear":
            w = x / n
        elif name_ == "shaped_softmax":
            e = np.exp(x - x.max())
            w = e / e.sum() - 1.0 / n
            q = idx[-1]
            cols = np.flatnonzero(keep)
            w = w + (cols == q)
        else:
            raise AssertionError(name)
        out[idx][keep] = w
    return out


def _scores(seed, shape=(2, L, L), scale=1.0):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape)) * scale


MASKS = {
    "none": None,
    "causal": np.tril(np.ones((L, L), bool)),
    "random": np.asarray(jax.random.bernoulli(jax.random.key(7), 0.6, (2, L, L))).copy(),
}
MASKS["random"][:, :, 0] = True  # at least one valid key per row, except the row zeroed below
MASKS["random"][1, 2, :] = False  # one fully masked row


def _valid(mask, shape):
    return np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)


# ---------------------------------------------------------------------------------- registry


def test_registry_has_every_required_name():
    assert set(REQUIRED) <= set(act.names())
    assert list(act.names()) == sorted(act.names())


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown activation 'nope'.*softmax"):
        act.get("nope")


def test_register_and_overwrite(monkeypatch):
    monkeypatch.setattr(act, "_REGISTRY", dict(act._REGISTRY))  # leave no test names behind
    fn = lambda s, mask=None: act.softmax(2 * s, mask)  # noqa: E731
    act.register("_test_double_softmax", fn)
    assert act.get("_test_double_softmax") is fn
    with pytest.raises(ValueError, match="already registered"):
        act.register("_test_double_softmax", fn)
    act.register("_test_double_softmax", act.softmax, overwrite=True)
    assert act.get("_test_double_softmax") is act.softmax
    with pytest.raises(ValueError, match="callable"):
        act.register("_bad", 3)


@pytest.mark.parametrize("p", [0, -1, 2.5, True])
def test_polynomial_factory_rejects_bad_p(p):
    with pytest.raises(ValueError, match="p="):
        act.polynomial(p)


def test_polynomial_factory_general_p():
    s = _scores(1)
    np.testing.assert_allclose(act.polynomial(5)(s), s**5 / math.sqrt(L), rtol=1e-12)


# -------------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("name", REQUIRED)
def test_matches_formula(name, mask_name):
    mask = MASKS[mask_name]
    s = _scores(zlib.crc32(name.encode()) % 1000)  # a fixed seed per name (hash() varies by process)
    valid = _valid(mask, s.shape)
    got = np.asarray(act.get(name)(jnp.asarray(s), mask))
    want = np_reference(name, s, valid)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert np.all(got[~valid] == 0.0), "masked weights must be exactly 0"


@pytest.mark.parametrize("name", REQUIRED)
def test_fully_masked_row_is_zero(name):
    s = jnp.asarray(_scores(3))
    mask = np.ones(s.shape, bool)
    mask[0, 1, :] = False
    w = act.get(name)(jnp.where(mask, s, -jnp.inf), mask)
    assert np.all(np.asarray(w)[0, 1] == 0.0)
    assert np.all(np.isfinite(np.asarray(w)))


NORMALISED = ["softmax", "sin2max_shifted", "sin_softmax", "sirenmax", "cosmax", "sin10max"]


@pytest.mark.parametrize("name", NORMALISED + [f"norm_{n}" for n in ("sin_softmax", "cosmax")])
@pytest.mark.parametrize("mask_name", ["none", "causal"])
def test_row_sums_are_one(name, mask_name):
    # Small scores keep cosmax/sirenmax denominators far from 0 so the identity is exact.
    s = jnp.asarray(_scores(4, scale=0.3))
    w = act.get(name)(s, MASKS[mask_name])
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-12)


def test_shaped_softmax_rows_sum_to_one_and_centre_causally():
    s = jnp.asarray(_scores(5))
    causal = MASKS["causal"]
    a = np.asarray(act.shaped_softmax(s, causal))
    # I contributes 1, softmax 1, centring -1 on every row.
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-12)
    # Zero scores: softmax is uniform over the m_i visible keys and cancels the centring.
    a0 = np.asarray(act.shaped_softmax(jnp.zeros((L, L)), causal))
    np.testing.assert_allclose(a0, np.eye(L), atol=1e-15)


def test_shape_gains_and_query_positions():
    s = jnp.asarray(_scores(6, shape=(L, L)))
    w = act.softmax(s)
    no_id = act.shape(w, identity=0.0)
    no_c = act.shape(w, centre=0.0)
    np.testing.assert_allclose(no_id, w - 1.0 / L, atol=1e-15)
    np.testing.assert_allclose(no_c, w + np.eye(L), atol=1e-15)
    # Fewer queries than keys: rows 3..5 of the causal matrix, found from explicit positions,
    # from the mask (each query's last valid key) or, without a mask, as the last 3 keys.
    causal = MASKS["causal"]
    full = np.asarray(act.shape(act.softmax(s, causal), causal))
    rows = act.softmax(s[3:], causal[3:])
    for kwargs in (dict(query_positions=jnp.arange(3, 6)), {}):
        np.testing.assert_allclose(act.shape(rows, causal[3:], **kwargs), full[3:], atol=1e-15)
    np.testing.assert_allclose(act.shape(act.softmax(s[3:])), np.asarray(act.shape(act.softmax(s)))[3:],
                               atol=1e-15)


def test_shape_does_not_shift_the_diagonal_like_the_reference_cache_slice():
    # bobby-he/simplified_transformers adds diag[:Lk, :Lk] for a cached query: its row 0.
    # Our identity of a query at position p is e_p, so the decoded row has A_pp = 1 + w - 1/(p+1).
    p = 4
    w = act.softmax(jnp.zeros((1, L)), MASKS["causal"][p : p + 1])
    a = np.asarray(act.shape(w, MASKS["causal"][p : p + 1]))[0]
    np.testing.assert_allclose(a[: p + 1], [0, 0, 0, 0, 1], atol=1e-15)
    assert np.all(a[p + 1 :] == 0)


def test_prenormalisation_standardises_valid_keys():
    s = jnp.asarray(_scores(8, scale=7.0) + 3.0)
    mask = MASKS["causal"]
    z = np.asarray(act.standardise_rows(s, mask))
    for i in range(1, L):
        row = z[0, i, : i + 1]
        assert abs(row.mean()) < 1e-12
        np.testing.assert_allclose(row.var(ddof=1), 1.0, rtol=1e-4)  # eps = 1e-5 in the root
    assert np.all(z[0][~mask] == 0)


# ------------------------------------------------------------------ numerics and transforms

EXTREMES = [1e4, -1e4, 1e30, -1e30, math.pi / 2, math.pi / 2 + 2 * math.pi, 0.0]
BOUNDED = [n for n in REQUIRED if not n.startswith(("polynomial", "linear", "relu"))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", BOUNDED)
def test_finite_at_extreme_scores(name, dtype):
    # Rows of identical extreme values and rows mixing them, including sirenmax's pole and
    # zeros, which make cosmax/sinmax row sums vanish.
    rows = [np.full(L, v) for v in EXTREMES]
    rows.append(np.array(EXTREMES[:L]))
    rows.append(np.array([0.0, math.pi, 2 * math.pi, -math.pi, 3 * math.pi, 0.0]))  # sin sums to 0
    rows.append(np.array([math.pi / 2, -math.pi / 2] * (L // 2)))  # cos sums to 0
    s = jnp.asarray(np.stack(rows)[:, None, :].repeat(L, 1), dtype=dtype)
    w = act.get(name)(s)
    assert w.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(w))), name


@pytest.mark.parametrize("name", ["polynomial2", "polynomial3", "relu", "linear"])
def test_unbounded_activations_finite_in_range(name):
    s = jnp.asarray(np.linspace(-1e4, 1e4, L * L).reshape(L, L), jnp.float32)
    assert bool(jnp.all(jnp.isfinite(act.get(name)(s))))


def test_polynomial_computes_in_float32_for_half_inputs():
    s = jnp.full((2, 4), 50.0, jnp.bfloat16)
    w = act.polynomial(3)(s)
    assert w.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(w[0, 0]), 50.0**3 / 2, rtol=1e-2)


@pytest.mark.parametrize("name", REQUIRED)
def test_gradients_finite_with_neg_inf_fill(name):
    s = jnp.asarray(_scores(9, scale=2.0))
    mask = MASKS["causal"]
    filled = jnp.where(mask, s, -jnp.inf)
    probe = jnp.asarray(_scores(10))
    fn = act.get(name)
    g = jax.grad(lambda x: jnp.sum(fn(x, mask) * probe))(filled)
    assert bool(jnp.all(jnp.isfinite(g)))
    assert bool(jnp.all(g[..., ~mask] == 0))


@pytest.mark.parametrize("name", REQUIRED)
def test_jit_and_vmap_agree(name):
    s = jnp.asarray(_scores(11, shape=(3, L, L)))
    fn = act.get(name)
    mask = MASKS["causal"]
    eager = fn(s, mask)
    np.testing.assert_allclose(jax.jit(fn)(s, mask), eager, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(lambda x: fn(x, mask))(s), eager, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 4, 32, 256])
def test_softmax_frobenius_bound(n):
    # ||softmax(A)||_F <= sqrt(N) for any N x N scores (Saratchandran et al., Thm 3.1), including
    # the saturated case that attains it.
    for scale in (0.1, 1.0, 30.0):
        a = jax.random.normal(jax.random.key(n), (n, n)) * scale
        assert float(jnp.linalg.norm(act.softmax(a))) <= math.sqrt(n) * (1 + 1e-12)
    one_hot = jnp.eye(n) * 1e4
    np.testing.assert_allclose(float(jnp.linalg.norm(act.softmax(one_hot))), math.sqrt(n), rtol=1e-9)


# ------------------------------------------------------------------------------ the guards

ROW_NORMALISED_NONNEGATIVE = (
    ["softmax", "sin_softmax", *NONNEGATIVE]
    + [f"norm_{n}" for n in ["softmax", "sin_softmax", *NONNEGATIVE]]
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", ROW_NORMALISED_NONNEGATIVE)
def test_nonnegative_rows_sum_to_one_at_every_score_scale(name, dtype):
    # The old absolute guard (|sum| >= 1e-6) left sin2max rows summing to 0.06-0.29 at 1e-4.
    base = _scores(12, shape=(64, L))
    mask = np.tile(MASKS["causal"], (64 // L + 1, 1))[:64]
    for scale in (1e-6, 1e-4, 1e-2, 1.0, 1e2):
        s = jnp.asarray(base * scale, dtype)
        for m in (None, mask):
            w = np.asarray(act.get(name)(s, m), np.float64)
            assert np.all(w >= 0)
            # A row with one valid key standardises to 0, where norm_sin2max's f vanishes.
            rows = slice(None) if m is None or name != "norm_sin2max" else m.sum(-1) > 1
            np.testing.assert_allclose(w.sum(-1)[rows], 1.0, atol=1e-5, err_msg=f"{name} scale {scale}")


@pytest.mark.parametrize("name", ["sin2max", "sinmax", "norm_sin2max", "norm_sinmax"])
def test_all_zero_rows_give_zero_weights_and_finite_gradients(name):
    # f(0) = 0: zero scores (e.g. W_Q = 0) make every f vanish; no limit exists there (it
    # depends on the direction), so the row is 0 like a fully masked one.
    s = jnp.zeros((3, L)).at[1].set(jnp.asarray(_scores(13, shape=(L,))))
    fn = act.get(name)
    w = np.asarray(fn(s))
    assert np.all(w[[0, 2]] == 0)
    np.testing.assert_allclose(w[1].sum(), 1.0, rtol=1e-12)
    g = jax.grad(lambda x: jnp.sum(fn(x) * jnp.arange(3 * L).reshape(3, L)))(s)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_signed_guard_is_relative_to_the_row_scale():
    # sin(s) summing to exactly 0 (antisymmetric row): the floor 1e-4 * sum|sin s| bounds every
    # weight by 1e4 and gives the same weights at every scale (sin s ~ s for small s).
    row = np.array([0.3, -0.3, 0.7, -0.7, 1.1, -1.1])
    for scale in (1e-6, 1e-3, 1.0):
        f = np.sin(row * scale)
        w = np.asarray(act.get("sinmax")(jnp.asarray(row * scale)))
        np.testing.assert_allclose(w, f / (act.SIGNED_DENOMINATOR_RTOL * np.abs(f).sum()), rtol=1e-9)
        assert np.abs(w).max() <= 1 / act.SIGNED_DENOMINATOR_RTOL
    # A row with a resolvable sum is normalised exactly, however small its scores.
    s = jnp.asarray(_scores(14, shape=(L,)) * 1e-6 + 2e-6)
    np.testing.assert_allclose(act.get("sinmax")(s).sum(), 1.0, rtol=1e-9)


@pytest.mark.parametrize("name", REQUIRED)
def test_gradients_finite_from_tiny_to_large_scores(name):
    fn = act.get(name)
    probe = jnp.asarray(_scores(15))
    for scale in (0.0, 1e-6, 1e-4, 1.0, 1e2):
        s = jnp.asarray(_scores(16, scale=scale), jnp.float32)
        w, g = jax.value_and_grad(lambda x: jnp.sum(fn(x, MASKS["causal"]) * probe))(s)
        assert bool(jnp.isfinite(w)) and bool(jnp.all(jnp.isfinite(g))), (name, scale)


# ------------------------------------------- the two versions of the authors' code (NumPy)
#
# Independent transcriptions of Wang et al.'s public PyTorch code (docs/activations.md, "Two
# versions of the authors' code"), row by row, with torch's conventions: var() is unbiased,
# eps = 1e-5 inside the root, no guard of any denominator.


def _authors_prenorm(x):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-5)


def _authors_normalise(f):
    return f / f.sum(-1, keepdims=True)


def _authors_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# The module file ("vanilla for check/periodic_softmax.py"): each class takes the scaled scores.
MODULE_FILE = {
    "cosmax": lambda s: _authors_normalise(np.cos(s)),
    "sinmax": lambda s: _authors_normalise(np.sin(s)),
    "sirenmax": lambda s: _authors_normalise((np.sin(s) + 1) / (2 - 2 * np.sin(s))),
    "sin2max": lambda s: _authors_normalise(np.sin(s) ** 2),
    "sin2max_shifted": lambda s: _authors_normalise(np.sin(s + 0.25 * np.pi) ** 2),
    "sin_softmax": lambda s: _authors_softmax(np.sin(s)),
}

D_PAPER = 64  # head width of the paper's demo (512 / 8 heads)


def _paper_script(use_pro, qk, d=D_PAPER):
    """The training script (demo.py): ``qk`` is q.k before the 1/sqrt(d) scaling."""
    r = np.sqrt(d)
    pre = _authors_prenorm if use_pro.startswith("norm_") else (lambda x: x)
    base = use_pro.removeprefix("norm_")
    x = pre(qk)
    if base == "softmax":
        return _authors_softmax(x / r)
    if base == "sinmax":
        return _authors_normalise(1 + np.sin(10 * (x / r)))
    if base == "cosmax":
        return _authors_normalise(np.cos(x / r))
    if base == "sirenmax":
        y = x / r
        return _authors_normalise((np.sin(y) + 1) / (2 - 2 * np.sin(y)))
    if base == "sin_2_max_move":
        return _authors_normalise(np.sin(x / r + 0.25 * np.pi) ** 2)
    if base == "sin_2_max":  # shifts by -pi/4 before the scaling, then sin(. + pi/4)^2
        return _authors_normalise(np.sin((x - 0.25 * np.pi) / r + 0.25 * np.pi) ** 2)
    raise AssertionError(use_pro)


# paper-script name -> (our name, prenorm_order)
PAPER_SCRIPT = {
    "softmax": ("softmax", "after_scaling"),
    "norm_softmax": ("norm_softmax", "before_scaling"),
    "sinmax": ("sin10max", "after_scaling"),
    "norm_sinmax": ("norm_sin10max", "before_scaling"),
    "cosmax": ("cosmax", "after_scaling"),
    "norm_cosmax": ("norm_cosmax", "before_scaling"),
    "sirenmax": ("sirenmax", "after_scaling"),
    "norm_sirenmax": ("norm_sirenmax", "before_scaling"),
    "sin_2_max_move": ("sin2max_shifted", "after_scaling"),
    "norm_sin_2_max_move": ("norm_sin2max_shifted", "before_scaling"),
}

SCALES = (0.1, 1.0, 5.0)  # std of the scaled scores q.k / sqrt(d)


def _qk(seed, scale, d=D_PAPER, shape=(3, 2, 16, 16)):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape)) * scale * np.sqrt(d)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", sorted(MODULE_FILE))
@pytest.mark.parametrize("prenorm", [False, True])
def test_matches_the_authors_module_file(name, prenorm, scale):
    s = _qk(20, scale) / np.sqrt(D_PAPER)
    x = _authors_prenorm(s) if prenorm else s
    want = MODULE_FILE[name](x)
    got = np.asarray(act.get(f"norm_{name}" if prenorm else name)(jnp.asarray(s)))
    # Rows where our sirenmax pole guard acts (2 - 2 sin s < 1e-6) are ours by design.
    rows = np.all(2 - 2 * np.sin(x) >= act.DENOMINATOR_EPS, axis=-1)
    assert rows.mean() > 0.95
    np.testing.assert_allclose(got[rows], want[rows], rtol=1e-9, atol=1e-12)


def _attention_weights(name, order, qk, d=D_PAPER):
    from shaped_attn import functional
    from shaped_attn.config import AttentionConfig

    cfg = AttentionConfig(width=d, num_heads=1, activation=name, prenorm_order=order)
    return np.asarray(functional.attention_weights(cfg, jnp.asarray(qk)))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("use_pro", sorted(PAPER_SCRIPT))
def test_matches_the_authors_training_script(use_pro, scale):
    """demo.py's variants: our registered name with its prenorm_order, through the attention
    layer's own temperature (tau = sqrt(d) at d = 64)."""
    qk = _qk(21, scale)
    name, order = PAPER_SCRIPT[use_pro]
    np.testing.assert_allclose(_attention_weights(name, order, qk), _paper_script(use_pro, qk),
                               rtol=1e-9, atol=1e-12)


def test_paper_script_sin_2_max_is_a_shifted_sin2max():
    """demo.py's sin_2_max subtracts pi/4 before the 1/sqrt(d) scaling: it is
    sin^2(s + pi/4 (1 - 1/sqrt(d))) = sin^2(s + 0.687) at d = 64, not sin^2(s)."""
    qk = _qk(22, 1.0)
    s = qk / np.sqrt(D_PAPER)
    shift = 0.25 * np.pi * (1 - 1 / np.sqrt(D_PAPER))
    assert shift == pytest.approx(0.687, abs=5e-4)
    np.testing.assert_allclose(_paper_script("sin_2_max", qk), act.get("sin2max")(jnp.asarray(s + shift)),
                               rtol=1e-9)
    assert not np.allclose(_paper_script("sin_2_max", qk), act.get("sin2max")(jnp.asarray(s)), atol=1e-3)


def test_before_scaling_differs_from_after_scaling_by_the_temperature():
    # Standardising q.k and then dividing by sqrt(d) leaves scores of std 1/8 at d = 64.
    qk = _qk(23, 1.0)
    after = _attention_weights("norm_softmax", "after_scaling", qk)
    before = _attention_weights("norm_softmax", "before_scaling", qk)
    z = _authors_prenorm(qk / np.sqrt(D_PAPER))
    np.testing.assert_allclose(after, _authors_softmax(z), rtol=1e-9)
    # Up to where eps sits: sqrt(var(q.k) + eps) against sqrt(var(q.k) + 64 eps).
    np.testing.assert_allclose(before, _authors_softmax(z / np.sqrt(D_PAPER)), rtol=1e-4)
    assert np.abs(after - before).max() > 0.05


@pytest.mark.parametrize("order, activation, message", [
    ("sideways", "norm_sinmax", "prenorm_order='sideways' is not one of"),
    ("before_scaling", "sinmax", "prenorm_order='before_scaling' needs a pre-normalised activation"),
])
def test_prenorm_order_is_validated(order, activation, message):
    from shaped_attn.config import AttentionConfig

    with pytest.raises(ValueError, match=message):
        act.split_prenorm(activation, order)
    with pytest.raises(ValueError, match=message):
        AttentionConfig(width=8, activation=activation, prenorm_order=order)
