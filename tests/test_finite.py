"""Finite-network Monte Carlo: exact input, sampler agreement, identities, sharding, stops."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from helpers import se_mean
from sde import FiniteSampler, simulate_finite
from sde._helpers.linalg import gram
from sde._helpers.wishart import LayerDraws, chi_square
from sde._mc.gram_maps import gram_map, gram_scores
from sde._mc.inputs import initial_tokens
from sde._mc.sampler import SAMPLERS, stop_samples
from sde._theory.coefficients import correlation
from shaped_attn import config as mc

M = 3
V0 = jnp.asarray(0.8 * np.eye(M) + 0.2)
KEY = jax.random.key(1234)


def test_initial_tokens_exact_and_centred():
    V = jnp.asarray([[2.0, 0.3, -0.5], [0.3, 1.0, 0.1], [-0.5, 0.1, 0.7]])
    x0 = initial_tokens(V, 40)
    np.testing.assert_allclose(x0 @ x0.T / 40, V, atol=1e-12)
    np.testing.assert_allclose(x0.mean(axis=1), 0.0, atol=1e-12)
    with pytest.raises(ValueError, match="width=3 must be at least m \\+ 1 = 4"):
        initial_tokens(V, 3)


def test_gram_map_on_collapsed_tokens():
    """Two identical tokens make x x^T / n singular (Cholesky fails): the fresh x W is still
    finite, keeps the two tokens identical, and has the right scale."""
    x = jnp.stack([jnp.ones(400), jnp.ones(400), jnp.cos(jnp.arange(400.0))])
    y = gram_map(jax.random.normal(jax.random.key(0), (3, 5000)))(x)
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(y[0], y[1], atol=1e-6)  # sqrt of a rounding-level eigenvalue
    S = gram(x)
    # entries of y y^T / n_out estimate S with standard error about sqrt(2 / 5000) * |S|
    np.testing.assert_allclose(gram(y), S, atol=5 * np.sqrt(2 / 5000) * 1.0)


VARIANTS = {
    "shaped": functools.partial(mc.shaped_config, gamma=0.5),
    "unshaped": functools.partial(mc.unshaped_config, gamma=0.5),
    "pre_ln": functools.partial(mc.pre_ln_config, out_proj=False),
}


VARIANTS["no_centre"] = functools.partial(mc.shaped_config, gamma=0.5, ablation="no_centre")
VARIANTS["shaped_out_proj_2_heads"] = functools.partial(mc.shaped_config, gamma=0.5, out_proj=True, num_heads=2)


@functools.lru_cache(maxsize=None)
def _last_layer(variant: str, sampler: str, seed: int) -> np.ndarray:
    """``V`` at the last layer of 1500 networks (width 24, depth 6), shared between tests."""
    r = simulate_finite(V0, VARIANTS[variant], width=24, depth=6, num_samples=1500,
                               key=jax.random.key(seed), sampler=sampler)
    assert not r.stopped.any()
    return r.V[:, -1]


@pytest.mark.parametrize("variant", ["shaped", "unshaped", "pre_ln"])
def test_gram_and_weights_samplers_agree_in_distribution(variant):
    # Two independent Monte Carlo runs of the same network: two-sample KS tests on rho_12 and
    # on V entries at the last layer. With these fixed seeds a sampler that got a scale or a
    # map wrong fails by orders of magnitude in p-value (see the negative control below).
    last_g, last_w = _last_layer(variant, "gram", 1), _last_layer(variant, "weights", 2)
    for name, a, b in [
        ("rho12", np.asarray(correlation(last_g))[:, 0, 1], np.asarray(correlation(last_w))[:, 0, 1]),
        ("V11", last_g[:, 0, 0], last_w[:, 0, 0]),
        ("V12", last_g[:, 0, 1], last_w[:, 0, 1]),
    ]:
        p = stats.ks_2samp(a, b).pvalue
        assert p > 1e-4, f"{variant} {name}: KS p-value {p:.2e}"


def test_sampler_agreement_test_has_power():
    # Negative control: the same KS check separates the shaped network at gamma 0.5 and 0.8.
    kw = dict(width=24, depth=6, num_samples=1500, sampler="gram")
    a = simulate_finite(V0, functools.partial(mc.shaped_config, gamma=0.5), key=jax.random.key(1), **kw)
    b = simulate_finite(V0, functools.partial(mc.shaped_config, gamma=0.8), key=jax.random.key(2), **kw)
    assert stats.ks_2samp(a.V[:, -1, 0, 0], b.V[:, -1, 0, 0]).pvalue < 1e-4


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_zero_query_attention_keeps_the_mean_exactly(sampler):
    # W_Q = 0 gives A = I, so Z = lam X + gamma X W_V / sqrt(n) and E[V_1 | V_0] = V_0 at any n
    # (docs/sde.md §9). Monte Carlo mean of V_1 within 5 standard errors of V_0, every entry.
    cfg = functools.partial(mc.shaped_config, gamma=0.7, sublayers="attention", query_init="zero")
    r = simulate_finite(V0, cfg, width=16, depth=1, num_samples=4000, key=KEY, sampler=sampler)
    V1 = r.V[:, 1]
    se = se_mean(V1, axis=0, ddof=1)
    z = (V1.mean(axis=0) - np.asarray(V0)) / se
    assert np.all(np.abs(z) < 5), z
    # ...and the fluctuation is really there (the test is not vacuous): Var(V_1,11) ~ 1/n.
    assert V1[:, 0, 0].std() > 0.1


def test_results_do_not_depend_on_chunk_size():
    kw = dict(width=16, depth=4, num_samples=10, key=KEY)
    a = simulate_finite(V0, VARIANTS["shaped"], chunk_size=10, **kw)
    b = simulate_finite(V0, VARIANTS["shaped"], chunk_size=3, **kw)
    # Same per-sample keys; only XLA's batch-size-dependent rounding differs.
    np.testing.assert_allclose(a.V, b.V, rtol=1e-12)


def test_results_do_not_depend_on_device_count(tmp_path):
    # Four forced host devices in a subprocess (the flag must precede jax's initialisation).
    script = textwrap.dedent(
        """
        import functools, json, sys
        import jax, numpy as np
        jax.config.update("jax_enable_x64", True)
        import sde
        from sde._helpers import devices
        from shaped_attn import config as mc
        devices.SHARD_ON_CPU = True  # exercise the sharded program (small m: no XLA CPU deadlock)
        assert devices.sample_mesh().size == 4
        V0 = 0.8 * np.eye(3) + 0.2
        r = sde.simulate_finite(V0, functools.partial(mc.shaped_config, gamma=0.5), width=16,
                                   depth=4, num_samples=10, key=jax.random.key(1234), chunk_size=5)
        json.dump({"devices": jax.device_count(), "V": r.V.tolist()}, sys.stdout)
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    assert res["devices"] == 4
    local = simulate_finite(V0, VARIANTS["shaped"], width=16, depth=4, num_samples=10, key=KEY)
    np.testing.assert_allclose(np.asarray(res["V"]), local.V, rtol=1e-12, atol=1e-14)


def test_stop_samples_flags_and_freezes():
    V = np.ones((3, 5, 2, 2))
    V[1, 3:] = 1e6
    V[2, 2, 0, 0] = np.nan
    r = stop_samples(V, width=10, stop_norm=1e4)
    np.testing.assert_array_equal(r.stopped, [False, True, True])
    np.testing.assert_array_equal(r.stop_time, [np.inf, 0.3, 0.2])
    np.testing.assert_allclose(r.t, np.arange(5) / 10)
    assert np.all(np.isfinite(r.V))
    np.testing.assert_array_equal(r.V[1, 3:], np.ones((2, 2, 2)))
    assert r.stopped_fraction == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(V0=np.array([[1.0, 2.0], [2.0, 1.0]])), "V0 is not positive semi-definite"),
        (dict(V0=np.array([[1.0, np.nan], [np.nan, 1.0]])), "V0 holds NaN"),
        (dict(V0=np.array([[1.0, 0.5], [0.1, 1.0]])), "V0 is not symmetric"),
        (dict(width=0), "width=0 must be an integer >= 1"),
        (dict(depth=-2), "depth=-2 must be an integer >= 1"),
        (dict(num_samples=0), "num_samples=0"),
        (dict(sampler="loop"), "sampler='loop' is not one of"),
    ],
)
def test_validation(kwargs, match):
    args = dict(V0=V0, width=8, depth=2, num_samples=2, sampler="gram") | kwargs
    with pytest.raises(ValueError, match=match):
        simulate_finite(args.pop("V0"), VARIANTS["shaped"], key=KEY, **args)


def test_bartlett_scores_have_the_law_of_explicit_products():
    # (x W_Q)(x W_K)^T with explicit N(0, 1/n) weights against gram_scores' R B G3 R^T, at
    # n_k = m = 3 where the product is far from Gaussian. KS on a diagonal and an off-diagonal
    # entry; the negative control (a Gaussian of the same variance) must be rejected.
    n, nk, draws = 10, 3, 20000
    x = initial_tokens(V0, n)
    keys = jax.random.split(jax.random.key(5), draws)

    def explicit(k):
        kq, kk = jax.random.split(k)
        wq = jax.random.normal(kq, (n, nk)) / np.sqrt(n)
        wk = jax.random.normal(kk, (n, nk)) / np.sqrt(n)
        return (x @ wq) @ (x @ wk).T

    a = np.asarray(jax.vmap(explicit)(keys))
    def bartlett(k):
        maps = lambda d: gram_scores(d.wishart_factor((1,), 3, nk), d.normal((1, 3, 3)))  # noqa: E731
        return LayerDraws.build(maps, k, x.dtype)(x)[0]

    b = np.asarray(jax.vmap(bartlett)(jax.random.split(jax.random.key(6), draws)))
    for i, j in [(0, 0), (0, 1), (2, 1)]:
        assert stats.ks_2samp(a[:, i, j], b[:, i, j]).pvalue > 1e-4, (i, j)
    gauss = np.random.default_rng(0).normal(size=draws) * a[:, 0, 0].std()
    assert stats.ks_2samp(a[:, 0, 0], gauss).pvalue < 1e-6


# ------------------------------------------------------------------------ reduced sampler


@pytest.mark.parametrize("variant, against", [
    ("shaped", ("gram", "weights")),
    ("unshaped", ("gram", "weights")),
    ("no_centre", ("gram", "weights")),
    ("shaped_out_proj_2_heads", ("gram",)),
])
def test_reduced_sampler_agrees_in_distribution(variant, against):
    # The KS checks of the gram-vs-weights test (p > 1e-4 with fixed seeds; the negative
    # control above shows their power), the reduced sampler against the others' runs.
    a = _last_layer(variant, "reduced", 3)
    for other in against:
        b = _last_layer(variant, other, {"gram": 1, "weights": 2}[other])
        for name, x, y in [
            ("rho12", np.asarray(correlation(a))[:, 0, 1], np.asarray(correlation(b))[:, 0, 1]),
            ("V11", a[:, 0, 0], b[:, 0, 0]),
            ("V12", a[:, 0, 1], b[:, 0, 1]),
        ]:
            p = stats.ks_2samp(x, y).pvalue
            assert p > 1e-4, f"{variant} reduced vs {other} {name}: KS p-value {p:.2e}"


def _shaped_relu_kernel(V, s_plus, s_minus):
    """``E[sigma_s(u) sigma_s(v)]`` for ``(u, v) ~ N(0, V)`` entrywise (arc-cosine kernel)."""
    d = np.sqrt(np.diag(V))
    ab = np.outer(d, d)
    theta = np.arccos(np.clip(V / ab, -1, 1))
    j = ab * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)  # E[u+ v+] = E[u- v-]
    c = 2 / (s_plus**2 + s_minus**2)
    return c * ((s_plus**2 + s_minus**2) * j + 2 * s_plus * s_minus * (V / 2 - j))


def test_reduced_sampler_one_layer_mean_of_the_mlp_block():
    # E[V_1] = lam^2 V_0 + gamma^2 K(V_0) exactly at any width, K the shaped-ReLU kernel (c_plus
    # != 0 checks that the slopes are the width-n ones). Every entry within 5 standard errors.
    # (The attention path's mean: test_zero_query_attention_keeps_the_mean_exactly.)
    S, width, gamma = 16384, 16, 0.6
    mlp = functools.partial(mc.shaped_config, gamma=gamma, sublayers="mlp", c_plus=0.5, c_minus=-1.0)
    V1 = simulate_finite(V0, mlp, width=width, depth=1, num_samples=S, key=KEY, sampler="reduced",
                                chunk_size=S).V[:, 1]
    s_plus, s_minus = 1 + 0.5 / np.sqrt(width), 1 - 1.0 / np.sqrt(width)
    expected = (1 - gamma**2) * np.asarray(V0) + gamma**2 * _shaped_relu_kernel(np.asarray(V0), s_plus, s_minus)
    z = (V1.mean(axis=0) - expected) / se_mean(V1, axis=0, ddof=1)
    assert np.all(np.abs(z) < 5), z
    assert V1[:, 0, 0].std() > 0.1  # the fluctuation is there


def test_reduced_sampler_rejects_layer_norm_and_auto_picks():
    with pytest.raises(ValueError, match="sampler='reduced' does not support this block: kind='pre_ln' has LayerNorm"):
        simulate_finite(V0, VARIANTS["pre_ln"], width=8, depth=2, num_samples=2, key=KEY, sampler="reduced")
    pick = lambda config: FiniteSampler(V0, config, width=8, depth=1, sampler="auto").sampler  # noqa: E731
    assert pick(VARIANTS["pre_ln"]) == "gram"
    assert pick(VARIANTS["shaped"]) == pick(VARIANTS["unshaped"]) == "reduced"


def test_reduced_sampler_samples_depend_only_on_their_index():
    # Samples 2, 3 computed in chunk [0, 4) and in chunk [2, 6): same fold_in(key, i) draws.
    runner = FiniteSampler(V0, VARIANTS["shaped"], width=16, depth=2, sampler="reduced")
    np.testing.assert_allclose(runner.chunk(KEY, 0, 4)[2:], runner.chunk(KEY, 2, 6)[:2], rtol=1e-12)


@pytest.mark.parametrize("proposals", [1, 4])
def test_chi_square_law(proposals):
    # proposals=1 makes repeat rounds (the while loop) frequent; df < 2 takes the boost path.
    dfs = np.array([0.5, 1.0, 3.0, 197.0])
    draw = jax.jit(jax.vmap(lambda k: chi_square(k, dfs, (4,), jnp.float64, proposals=proposals)))
    x = np.asarray(draw(jax.random.split(jax.random.key(7), 5000)))
    for i, df in enumerate(dfs):
        assert stats.kstest(x[:, i], stats.chi2(df).cdf).pvalue > 1e-4, df
