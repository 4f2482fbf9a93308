"""Activation registry: formulas (against independent NumPy), masking, extremes, gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shaped_attn import activations as act

PERIODIC = ["sinmax", "cosmax", "sin2max", "sin2max_shifted", "sirenmax", "sin_softmax"]
REQUIRED = (
    ["softmax", *PERIODIC]
    + [f"norm_{n}" for n in PERIODIC]
    + ["polynomial2", "polynomial3", "shaped_softmax", "sigmoid", "relu", "linear"]
)
L = 6


# ------------------------------------------------------------- independent NumPy references


def _np_f(name):
    return {
        "sinmax": np.sin,
        "cosmax": np.cos,
        "sin2max": lambda s: np.sin(s) ** 2,
        "sin2max_shifted": lambda s: (1 + np.sin(2 * s)) / 2,  # = sin(s + pi/4)^2
        "sirenmax": lambda s: (np.sin(s) + 1) / np.maximum(2 - 2 * np.sin(s), act.DENOMINATOR_EPS),
    }[name]


def _np_guard(x):
    """The documented denominator guard: |x| floored at DENOMINATOR_EPS, sign kept (0 -> +)."""
    return np.sign(x + (x == 0)) * max(abs(x), act.DENOMINATOR_EPS)


def np_reference(name, s, valid):
    """Row-by-row evaluation of spec/activations.md on the valid keys of each row."""
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
        elif name_ in ("sinmax", "cosmax", "sin2max", "sin2max_shifted", "sirenmax"):
            f = _np_f(name_)(x)
            w = f / _np_guard(f.sum())
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
    s = _scores(hash(name) % 1000)
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


NORMALISED = ["softmax", "sin2max_shifted", "sin_softmax", "sirenmax", "cosmax"]


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


def test_shape_gains_and_square_check():
    s = jnp.asarray(_scores(6, shape=(L, L)))
    w = act.softmax(s)
    no_id = act.shape(w, identity=0.0)
    no_c = act.shape(w, centre=0.0)
    np.testing.assert_allclose(no_id, w - 1.0 / L, atol=1e-15)
    np.testing.assert_allclose(no_c, w + np.eye(L), atol=1e-15)
    with pytest.raises(ValueError, match="Lq=2, Lk=3"):
        act.shape(jnp.zeros((2, 3)))


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
