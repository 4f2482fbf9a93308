"""Diagnostics against closed forms: Jacobians, saturation, entropy, rank, Frobenius bounds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shaped_attn import activations as act
from shaped_attn import diagnostics as dg
from shaped_attn.config import shaped_config
from shaped_attn.models import Stack

KEY = jax.random.PRNGKey(0)


# ------------------------------------------------------------------------- Jacobians


def test_softmax_jacobian_matches_closed_form():
    s = 2.0 * jax.random.normal(KEY, (5, 3, 7))
    jac = dg.activation_jacobian("softmax", s)
    p = act.softmax(s)
    assert jac.shape == (5, 3, 7, 7)
    np.testing.assert_allclose(jac, dg.softmax_jacobian(p), atol=1e-14)
    # row sums of dw/ds vanish (the weights sum to one)
    np.testing.assert_allclose(jac.sum(axis=-2), 0, atol=1e-14)


def test_shaped_softmax_has_softmax_jacobian():
    s = jax.random.normal(KEY, (2, 6, 6))
    np.testing.assert_allclose(
        dg.activation_jacobian("shaped_softmax", s), dg.activation_jacobian("softmax", s), atol=1e-14
    )


def test_jacobian_closed_form_frobenius():
    p = act.softmax(3 * jax.random.normal(KEY, (10, 9)))
    np.testing.assert_allclose(
        dg.softmax_jacobian_frobenius(p), dg.frobenius_norm(dg.softmax_jacobian(p)), rtol=1e-12
    )
    # finite gradient at a one-hot row, where the norm is 0
    g = jax.grad(lambda q: dg.softmax_jacobian_frobenius(q))(jnp.eye(4)[0])
    assert np.all(np.isfinite(g))


def test_masked_keys_have_zero_jacobian_columns():
    s = jax.random.normal(KEY, (3, 6))
    mask = jnp.array([True, True, False, True, False, True])
    for name in ("softmax", "norm_cosmax", "polynomial3", "sin2max_shifted", "sinmax"):
        jac = dg.activation_jacobian(name, s, mask)
        np.testing.assert_array_equal(jac[..., ~mask], 0)
        np.testing.assert_array_equal(jac[..., ~mask, :], 0)


def test_equal_scores_give_zero_saturation():
    n = 16
    s = jnp.full((3, n, n), 0.3)
    summary = dg.jacobian_summary("softmax", s)
    assert float(summary["saturation"]) == 0.0
    np.testing.assert_allclose(summary["frobenius_median"], math.sqrt(n - 1) / n, rtol=1e-12)
    np.testing.assert_allclose(summary["frobenius_median"], dg.uniform_softmax_jacobian_norm(n))


def test_one_hot_saturated_softmax_has_vanishing_jacobian():
    s = jnp.zeros((4, 10)).at[:, 3].set(200.0)
    jac = dg.activation_jacobian("softmax", s)
    assert float(jnp.max(jnp.abs(jac))) < 1e-60
    summary = dg.jacobian_summary("softmax", s)
    assert float(summary["saturation"]) == 1.0
    assert float(summary["nonfinite"]) == 0.0


def test_jacobians_finite_at_extremes():
    # huge outliers, exact poles of sirenmax (s = pi/2) and rows summing to zero for sinmax
    s = jnp.stack([
        dg.outlier_scores(KEY, 8, 8, n_outliers=1, magnitude=1e4),
        jnp.full((8, 8), math.pi / 2),
        jnp.tile(jnp.array([0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 0.1, -0.1]), (8, 1)),
    ])
    names = act.names()
    jacs = jax.jit(lambda x: [dg.activation_jacobian(n, x) for n in names])(s)
    for name, jac in zip(names, jacs):
        assert bool(jnp.all(jnp.isfinite(jac))), name


def test_score_samplers():
    s = dg.outlier_scores(KEY, 50, 12, n_outliers=3, magnitude=7.0)
    assert s.shape == (50, 12)
    np.testing.assert_array_equal(jnp.sum(s == 7.0, axis=-1), 3)
    n = dg.sample_scores(KEY, 1000, 12, "normal", std=3.0)
    assert abs(float(n.std()) - 3.0) < 0.1
    with pytest.raises(ValueError, match="kind='laplace' is not one of"):
        dg.sample_scores(KEY, 2, 2, "laplace")


def test_jacobian_sweep_softmax_saturates_with_spread():
    rows = dg.jacobian_sweep("softmax", KEY, [{"kind": "normal", "std": 0.1}, {"kind": "normal", "std": 50.0}],
                             n_rows=64, n_keys=16)
    assert rows[0]["saturation"] == 0.0
    assert rows[1]["saturation"] > 0.5
    assert rows[1]["frobenius_median"] < rows[0]["frobenius_median"]


# ------------------------------------------------------------------ attention, tokens


def test_entropy_closed_forms():
    n = 7
    uniform = jnp.full((2, 3, n), 1.0 / n)
    np.testing.assert_allclose(dg.attention_entropy(uniform), math.log(n), rtol=1e-12)
    np.testing.assert_allclose(dg.attention_entropy(jnp.eye(n)), 0, atol=1e-12)
    mask = jnp.arange(n) < 4
    np.testing.assert_allclose(dg.attention_entropy(act.softmax(jnp.zeros((n, n)), mask), mask), math.log(4),
                               rtol=1e-12)
    np.testing.assert_allclose(dg.attention_entropy(jnp.zeros((3, n))), 0)


def test_effective_rank_closed_forms():
    for m in (1, 3, 8):
        np.testing.assert_allclose(dg.effective_rank(jnp.eye(m)), m, rtol=1e-10)
        np.testing.assert_allclose(dg.effective_rank(5.0 * jnp.eye(m)), m, rtol=1e-10)
    v = jax.random.normal(KEY, (6, 1))
    np.testing.assert_allclose(dg.effective_rank(v @ v.T), 1.0, rtol=1e-6)
    # batched, and between 1 and m for a generic PSD matrix
    x = jax.random.normal(KEY, (3, 5, 5))
    r = dg.effective_rank(x @ jnp.swapaxes(x, -1, -2))
    assert r.shape == (3,) and np.all((r > 1) & (r < 5))


def test_token_statistics():
    x = jnp.tile(jax.random.normal(KEY, (1, 1, 9)), (2, 4, 1))  # all tokens equal
    np.testing.assert_allclose(dg.token_correlation(x), 1.0, rtol=1e-12)
    np.testing.assert_allclose(dg.token_effective_rank(x), 1.0, rtol=1e-6)
    orth = jnp.eye(4)[None]
    np.testing.assert_allclose(dg.token_correlation(orth), 0.0, atol=1e-12)
    np.testing.assert_allclose(dg.token_effective_rank(orth), 4.0, rtol=1e-10)


def test_attention_summary_shapes_and_softmax_bound():
    w = act.softmax(3 * jax.random.normal(KEY, (3, 2, 4, 5, 5)))  # [layers, B, H, L, L]
    out = dg.attention_summary(w)
    assert out["attn_frobenius"].shape == (3,)
    assert np.all(out["attn_frobenius_over_sqrt_n"] <= 1 + 1e-12)
    assert np.all(out["attn_entropy"] <= math.log(5) + 1e-12)


# ------------------------------------------------------------------ Frobenius bounds


@pytest.mark.parametrize("n", [2, 5, 16, 33])
def test_softmax_frobenius_bounds_random(n):
    for i, scale in enumerate((1e-3, 0.3, 1.0, 10.0, 1e3)):
        a = scale * jax.random.normal(jax.random.fold_in(KEY, 10 * n + i), (64, n, n))
        assert float(dg.softmax_frobenius_bound_ratio(a).max()) <= 1 + 1e-12
        assert float(dg.softmax_gradient_bound_ratio(a).max()) <= 1 + 1e-12


def test_softmax_frobenius_bounds_extremes():
    n = 6
    # one-hot rows attain ||softmax(A)||_F = sqrt(N)
    np.testing.assert_allclose(dg.softmax_frobenius_bound_ratio(1e3 * jnp.eye(n)), 1.0, rtol=1e-12)
    # equal scores: ||.||_F = 1, ratio 1/sqrt(N)
    np.testing.assert_allclose(dg.softmax_frobenius_bound_ratio(jnp.zeros((n, n))), 1 / math.sqrt(n))
    # two tied large entries per row: each block diag(p) - pp^T has norm 1/2
    a = jnp.zeros((n, n)).at[:, :2].set(1e3)
    np.testing.assert_allclose(dg.softmax_gradient_bound_ratio(a), math.sqrt(n) * 0.5 / (2 * math.sqrt(n)))
    # the gradient ratio agrees with the explicit Jacobian of the matrix map A -> softmax(A)
    a = jax.random.normal(KEY, (n, n))
    full = jax.jacfwd(act.softmax)(a)  # [n, n, n, n]
    np.testing.assert_allclose(
        dg.softmax_gradient_bound_ratio(a), jnp.sqrt(jnp.sum(full**2)) / (2 * math.sqrt(n)), rtol=1e-12
    )


# ------------------------------------------------------------------ gradient norms


def test_layer_gradient_norms_per_layer():
    depth, width = 3, 8
    stack = Stack(shaped_config(width, 0.5, param_dtype="float64"), depth, rngs=nnx.Rngs(params=1))
    x = jax.random.normal(KEY, (2, 5, width))

    def loss(model):
        return jnp.sum(model(x) ** 2)

    norms = dg.init_gradient_norms(stack, loss)
    assert set(norms) == {"query", "value"}
    assert norms["query"].shape == (depth,) and norms["value"].shape == (depth,)
    assert np.all(norms["value"] > 0) and np.all(norms["query"] > 0)
    # per-layer norms of a plain pytree, by hand
    tree = {"stack": {"layers": {"value": {"kernel": jnp.ones((depth, 2, 2))}}}}
    np.testing.assert_allclose(dg.layer_gradient_norms(tree, ("value",))["value"], [2.0] * depth)
    missing = r"no stacked 'kernel' gradients found under 'layers' for \['query', 'value'\]"
    with pytest.raises(ValueError, match=missing):
        dg.layer_gradient_norms({"a": jnp.ones(3)})
