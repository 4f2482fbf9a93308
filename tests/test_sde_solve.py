"""sde.solve / solve_correlation: closed forms, one-step moments, weak order, stopping.

Statistical tolerances are stated in standard errors (SE) estimated from the samples; seeds
are fixed. Expected values for Euler-Maruyama are the exact laws of the *discrete* chain where
they are known (computed by quadrature), so that the O(dt) bias does not enter the tolerance;
the continuum value is checked with the bias added explicitly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import sde
from sde._theory.coefficients import sigma_lin
from sde._theory.integrate import check_state
from helpers import random_psd, se_mean, se_var


def log_factor_moments(s: float) -> tuple[float, float]:
    """E[log(1 + s xi)] and Var[log(1 + s xi)] for xi ~ N(0, 1) (mass below -1/s, where the
    Euler factor is negative and the path would stop, is ignored; it is < 1e-8 here)."""
    lo = -1.0 / s + 1e-12
    pdf = stats.norm.pdf
    m1 = integrate.quad(lambda x: math.log1p(s * x) * pdf(x), lo, 40, limit=200, points=[0.0])[0]
    m2 = integrate.quad(lambda x: math.log1p(s * x) ** 2 * pdf(x), lo, 40, limit=200, points=[0.0])[0]
    assert stats.norm.cdf(-1.0 / s) < 1e-8
    return m1, m2 - m1 * m1


def discrete_gbm_log_law(sigma2: float, T: float, dt: float) -> tuple[float, float]:
    """Mean and variance of log(V_N / V_0) for Euler on dV = sqrt(sigma2) V dW:
    V_{n+1} = V_n (1 + sqrt(sigma2 dt) xi_n), N = T / dt."""
    n = int(round(T / dt))
    m1, v1 = log_factor_moments(math.sqrt(sigma2 * dt))
    return n * m1, n * v1


def assert_mean_var(x, mean, var, n_se=5.0):
    x = np.asarray(x, dtype=np.float64)
    se_m, se_v = se_mean(x), se_var(x)
    assert abs(x.mean() - mean) < n_se * se_m, (x.mean(), mean, se_m)
    assert abs(x.var() - var) < n_se * se_v, (x.var(), var, se_v)
    return se_m, se_v


# --------------------------------------------------------------------------- closed forms


def test_m1_full_block_lognormal():
    """m = 1, full block: dV = sqrt(2 kappa) V dW, log V_T ~ N(log V0 - kappa T, 2 kappa T)."""
    gamma, T, dt, P = 0.5, 1.0, 0.01, 20_000
    p = sde.SDEParams(gamma, 1.0, block="transformer")
    kappa = gamma**2 * (4 - gamma**2)
    V0 = 2.0
    sol = sde.solve(np.array([[V0]]), p, T=T, dt=dt, num_paths=P, key=jax.random.key(1), save_every=100)
    assert sol.V.shape == (P, 2, 1, 1) and sol.stopped_fraction == 0.0
    logV = np.log(np.asarray(sol.V[:, -1, 0, 0]))
    mean_d, var_d = discrete_gbm_log_law(2 * kappa, T, dt)
    se_m, se_v = assert_mean_var(logV, math.log(V0) + mean_d, var_d)
    # continuum law: within 5 SE plus the (exactly known) Euler bias
    bias = abs(mean_d + kappa * T)
    assert bias < 0.05  # guard on this test's constants (dt small enough), not on the code
    assert abs(logV.mean() - (math.log(V0) - kappa * T)) < 5 * se_m + bias
    assert abs(logV.var() - 2 * kappa * T) < 5 * se_v + abs(var_d - 2 * kappa * T)
    # power: the attention-only kappa (gamma^2 (2 - gamma^2)) is rejected
    kappa_wrong = gamma**2 * (2 - gamma**2)
    assert abs(logV.mean() - (math.log(V0) - kappa_wrong * T)) > 20 * se_m


@pytest.fixture(scope="module")
def mlp_m2():
    """m = 2 residual MLP SDE and the 1-d correlation SDE, same settings, independent keys."""
    gamma, T, dt, P, rho0 = 0.5, 1.0, 0.01, 20_000, 0.2
    p = sde.SDEParams(gamma, block="mlp", c_plus=0.0, c_minus=-1.0)
    V0 = np.array([[1.0, rho0], [rho0, 1.0]])
    sol = sde.solve(V0, p, T=T, dt=dt, num_paths=P, key=jax.random.key(2), save_every=50)
    cor = sde.solve_correlation(rho0, p, T=T, dt=dt, num_paths=P, key=jax.random.key(3), save_every=50)
    return dict(gamma=gamma, T=T, dt=dt, P=P, sol=sol, cor=cor)


def test_mlp_diagonal_geometric_bm(mlp_m2):
    """Residual MLP diagonal: log V_t ~ N(log V0 - 2 gamma^2 t, 4 gamma^2 t)."""
    g, T, dt = mlp_m2["gamma"], mlp_m2["T"], mlp_m2["dt"]
    sol = mlp_m2["sol"]
    assert sol.stopped_fraction == 0.0
    np.testing.assert_allclose(np.asarray(sol.t), [0.0, 0.5, 1.0])
    mean_d, var_d = discrete_gbm_log_law(4 * g**2, T, dt)
    for a in range(2):
        logV = np.log(np.asarray(sol.V[:, -1, a, a]))
        se_m, _ = assert_mean_var(logV, mean_d, var_d)
        assert abs(logV.mean() + 2 * g**2 * T) < 5 * se_m + abs(mean_d + 2 * g**2 * T)


def test_matrix_and_correlation_sde_agree(mlp_m2):
    """rho = V12 / sqrt(V11 V22) of the 3-dim V SDE and the 1-d rho SDE have the same law at T:
    two-sample KS p > 1e-3 and quantiles within 5 bootstrap SE."""
    sol, cor = mlp_m2["sol"], mlp_m2["cor"]
    assert cor.V.shape == (mlp_m2["P"], 3) and cor.stopped_fraction == 0.0
    V = np.asarray(sol.V[:, -1])
    rho_v = V[:, 0, 1] / np.sqrt(V[:, 0, 0] * V[:, 1, 1])
    rho_c = np.asarray(cor.V[:, -1])
    assert stats.ks_2samp(rho_v, rho_c).pvalue > 1e-3
    qs = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(200):
        a = rng.choice(rho_v, rho_v.size)
        b = rng.choice(rho_c, rho_c.size)
        boot.append(np.quantile(a, qs) - np.quantile(b, qs))
    se = np.std(boot, axis=0)
    diff = np.quantile(rho_v, qs) - np.quantile(rho_c, qs)
    assert np.all(np.abs(diff) < 5 * se), (diff, se)
    # power: the median has moved away from rho0 by many bootstrap SE
    assert abs(np.median(rho_c) - 0.2) > 5 * se[2]


def test_deterministic_m2_attention_blowup():
    """Drift-only m = 2 attention: dV = c q^2 V, c = gamma^2 / (4 tau0^2), so
    V(t) = V0 / sqrt(1 - t / t*) with t* = 1 / (2 c q0^2); the path stops near t*."""
    gamma, tau0 = 1.0, 1.0
    p = sde.SDEParams(gamma, tau0, block="attention")
    V0 = np.array([[1.0, 0.2], [0.2, 1.0]])
    c = gamma**2 / (4 * tau0**2)
    q0 = (V0[0, 0] + V0[1, 1] - 2 * V0[0, 1]) / 2
    t_star = 1 / (2 * c * q0**2)  # 3.125
    sol = sde.solve(V0, p, T=3.0, dt=0.01, save_every=10, deterministic=True)
    ts = np.asarray(sol.t)
    exact = V0[None] / np.sqrt(1 - ts / t_star)[:, None, None]
    np.testing.assert_allclose(np.asarray(sol.V[0]), exact, rtol=1e-7)
    assert not bool(sol.stopped[0]) and math.isinf(float(sol.stop_time[0]))
    # past the blow-up time (same number of saves: same compiled program)
    T2, n2 = 3.3, 300
    sol2 = sde.solve(V0, p, T=T2, dt=T2 / n2, save_every=10, deterministic=True)
    h = T2 / n2
    assert bool(sol2.stopped[0])
    assert t_star - 3 * h <= float(sol2.stop_time[0]) <= t_star + 3 * h
    Vs = np.asarray(sol2.V[0])
    assert np.all(np.isfinite(Vs)) and np.max(np.abs(Vs)) <= 1e4
    k_stop = int(np.searchsorted(np.asarray(sol2.t), float(sol2.stop_time[0])))
    assert np.all(Vs[k_stop:] == Vs[-1])  # frozen


# --------------------------------------------------------------------------- one-step moments


@pytest.mark.parametrize(
    "noise, factor", [("structured", "cholesky"), ("structured", "eigh"), ("generic", "eigh")]
)
def test_one_step_moments(noise, factor):
    """One Euler step through diffrax: E[dV] = b(V0) dt, Cov(dV) = Sigma(V0) dt (5 SE).

    dt is large so that the drift is resolved; many such steps leave the PSD cone, so the PSD
    stop is switched off (psd_tol huge) to keep every increment in the sample."""
    m, P, dt = 3, 40_000, 0.1
    V0 = random_psd(np.random.default_rng(5), m, ridge=0.3)
    p = sde.SDEParams(0.8, 0.7, block="transformer")
    sol = sde.solve(
        V0, p, T=dt, dt=dt, num_paths=P, key=jax.random.key(6), noise=noise, factor=factor,
        psd_tol=1e6,
    )
    assert sol.stopped_fraction == 0.0
    dV = np.asarray(sde.sym_to_vec(sol.V[:, 1] - sol.V[:, 0]))
    b = np.asarray(sde.sym_to_vec(sde.drift(jnp.asarray(V0), p))) * dt
    S = np.asarray(sde.diffusion_matrix(jnp.asarray(V0), p)) * dt
    se_b = se_mean(dV, axis=0)
    assert np.all(np.abs(dV.mean(axis=0) - b) < 5 * se_b)
    x = dV - b  # the exact mean is known
    prods = x[:, :, None] * x[:, None, :]
    se_S = se_mean(prods, axis=0)
    z = np.abs(prods.mean(axis=0) - S) / se_S
    assert z.max() < 5.0
    # power: a 10% error in k_lin is rejected by the same data
    S_wrong = S + 0.1 * p.k_lin * np.asarray(sigma_lin(jnp.asarray(V0))) * dt
    assert (np.abs(prods.mean(axis=0) - S_wrong) / se_S).max() > 5.0
    # and the drift is visible: b dt is many SE away from 0 for some entry
    assert np.max(np.abs(b) / se_b) > 10


# --------------------------------------------------------------------------- weak order


def test_euler_weak_order_with_common_random_numbers():
    """Weak order 1 of Euler for E[log V_T], m = 1 (dV = V dW): with a common brownian_dt every
    dt sees the same Brownian path, so the paired differences d(dt) = E_dt - E_{dt/2} have small
    SE. Each d(dt) must match the exact discrete-chain value within 5 SE, and the slope of
    log|d| against log dt must be in [0.8, 1.2]."""
    sigma2 = 1.0
    kappa = sigma2 / 2
    gamma = math.sqrt(2 - math.sqrt(4 - kappa))  # gamma^2 (4 - gamma^2) = kappa
    p = sde.SDEParams(gamma, block="transformer")
    assert p.k_lin == pytest.approx(kappa)
    T, P = 1.0, 20_000
    key = jax.random.key(7)
    ns = [32, 64, 128, 256]
    logV = {}
    for n in ns:
        sol = sde.solve(
            np.array([[1.0]]), p, T=T, dt=T / n, num_paths=P, key=key, save_every=n,
            brownian_dt=T / ns[-1],
        )
        assert sol.stopped_fraction == 0.0
        logV[n] = np.log(np.asarray(sol.V[:, -1, 0, 0]))
    dts, ds = [], []
    for n in ns[:-1]:
        diff = logV[n] - logV[2 * n]
        se = se_mean(diff)
        exact = discrete_gbm_log_law(sigma2, T, T / n)[0] - discrete_gbm_log_law(sigma2, T, T / (2 * n))[0]
        assert abs(diff.mean() - exact) < 5 * se, (n, diff.mean(), exact, se)
        assert abs(diff.mean()) > 4 * se  # resolved
        dts.append(T / n)
        ds.append(abs(diff.mean()))
    slope = np.polyfit(np.log(dts), np.log(ds), 1)[0]
    assert 0.8 <= slope <= 1.2, slope


# --------------------------------------------------------------------------- stopping


@pytest.fixture(scope="module")
def blowup_runs():
    """m = 4, V0 eigenvalues ~100 (80 and 160): the cubic attention drift blows some paths up.

    tau0 = 5 rather than 0.5: with tau0 = 0.5 every path blows up within the first step even at
    dt = 1e-4 (the drift is ~gamma^2/tau0^2 |V|^3), which would not exercise the freezing."""
    m = 4
    V0 = 100 * (0.8 * np.eye(m) + 0.2 * np.ones((m, m)))
    p = sde.SDEParams(1.0, 5.0, block="transformer")
    kw = dict(T=0.01, dt=1e-4, num_paths=24, key=jax.random.key(8))
    full = sde.solve(V0, p, save_every=1, **kw)
    sparse = sde.solve(V0, p, save_every=5, chunk_size=7, **kw)
    return dict(V0=V0, p=p, full=full, sparse=sparse, h=1e-4, T=0.01)


def test_stopping_freezes_paths(blowup_runs):
    full, h, T = blowup_runs["full"], blowup_runs["h"], blowup_runs["T"]
    stopped = np.asarray(full.stopped)
    st = np.asarray(full.stop_time)
    V = np.asarray(full.V)
    assert 0.0 < full.stopped_fraction < 1.0
    assert np.all(np.isfinite(V))
    assert np.all(np.isinf(st[~stopped]))
    assert np.all((st[stopped] > 0) & (st[stopped] <= T))
    assert np.any(st[stopped] < T)
    for i in np.where(stopped)[0]:
        k = int(round(st[i] / h))  # index of the first bad grid time
        assert abs(k * h - st[i]) < 1e-12
        last_good = V[i, k - 1]
        assert np.all(V[i, k:] == last_good)  # frozen at the last good state
        assert np.max(np.abs(last_good)) <= 1e4
        assert np.linalg.eigvalsh(last_good)[0] >= -1e-8 * np.max(np.abs(last_good))
        assert not bool(check_state(jnp.asarray(last_good), 1e4, 1.5e-8)[0])
        assert np.any(V[i, k - 1] != V[i, k - 2])  # was still moving before the stop
    for i in np.where(~stopped)[0]:
        assert np.all(np.any(V[i, 1:] != V[i, :-1], axis=(-2, -1)))


def test_outputs_symmetric(blowup_runs):
    """Symmetric up to rounding (XLA may contract a*b + c into FMAs differently for (i, j) and
    (j, i)); the asymmetry does not grow (1e-14 relative after 100 steps)."""
    V = np.asarray(blowup_runs["full"].V)
    scale = np.max(np.abs(V), axis=(-2, -1), keepdims=True)
    assert np.max(np.abs(V - np.swapaxes(V, -1, -2)) / scale) < 1e-14


def test_check_state_flags():
    good = np.array([[2.0, 0.5], [0.5, 1.0]])
    nan = np.array([[1.0, np.nan], [np.nan, 1.0]])
    indef = np.array([[1.0, 2.0], [2.0, 1.0]])
    big = 2e4 * np.eye(2)
    edge = np.array([[1.0, 1.0], [1.0, 1.0]]) - 1e-9 * np.array([[1.0, -1.0], [-1.0, 1.0]]) / 2
    V = jnp.asarray(np.stack([good, nan, indef, big, edge]))
    for factor in ["cholesky", "eigh"]:
        bad, L = check_state(V, 1e4, 1e-6, factor)
        np.testing.assert_array_equal(np.asarray(bad), [False, True, True, True, False])
        np.testing.assert_allclose(np.asarray(L[0] @ L[0].T), good, atol=1e-12)
    # inactive entries never matter
    bad, _ = check_state(V, 1e4, 1e-6, "cholesky", active=jnp.array([True, False, False, True, True]))
    assert not bool(bad[0]) and bool(bad[3]) and not bool(bad[4])


def test_solve_on_the_psd_boundary():
    """rho0 = 1 (rank-1 V0) under the MLP block: Cholesky fails on the exactly singular V0 and
    the eigh fallback takes over; the noise vanishes in the null direction, so rho stays 1 (to
    rounding) and nothing stops, with either factor."""
    p = sde.SDEParams(0.7, block="mlp")
    V0 = np.ones((2, 2))
    kw = dict(T=0.5, dt=0.01, num_paths=16, key=jax.random.key(11), save_every=25)
    for factor in ["cholesky", "eigh"]:
        sol = sde.solve(V0, p, factor=factor, **kw)
        assert sol.stopped_fraction == 0.0
        V = np.asarray(sol.V[:, -1])
        rho = V[:, 0, 1] / np.sqrt(V[:, 0, 0] * V[:, 1, 1])
        np.testing.assert_allclose(rho, 1.0, atol=1e-10)
        assert np.std(np.log(V[:, 0, 0])) > 0.1  # the diagonal still diffuses


def test_save_every_and_chunks_do_not_change_paths(blowup_runs):
    full, sparse = blowup_runs["full"], blowup_runs["sparse"]
    np.testing.assert_array_equal(np.asarray(sparse.V), np.asarray(full.V)[:, ::5])
    np.testing.assert_array_equal(np.asarray(sparse.stopped), np.asarray(full.stopped))
    np.testing.assert_array_equal(np.asarray(sparse.stop_time), np.asarray(full.stop_time))
    np.testing.assert_allclose(np.asarray(sparse.t), np.asarray(full.t)[::5], rtol=1e-12)


def test_brownian_dt_equal_to_dt_is_the_default_path():
    V0 = np.array([[1.0, 0.3], [0.3, 2.0]])
    p = sde.SDEParams(0.7, 0.9)
    kw = dict(T=0.2, dt=0.02, num_paths=4, key=jax.random.key(4), save_every=10)
    a = sde.solve(V0, p, **kw)
    b = sde.solve(V0, p, brownian_dt=0.02, **kw)
    c = sde.solve(V0, p, brownian_dt=0.01, **kw)
    np.testing.assert_allclose(np.asarray(b.V), np.asarray(a.V), rtol=1e-13)
    assert not np.allclose(np.asarray(c.V[:, -1]), np.asarray(a.V[:, -1]))
    # one V0 per path: paths with the same V0 are the same paths as in the unbatched solve
    V0s = np.stack([V0, 2 * V0, V0, V0])
    d = sde.solve(V0s, p, **kw)
    np.testing.assert_array_equal(np.asarray(d.V)[[0, 2, 3]], np.asarray(a.V)[[0, 2, 3]])
    np.testing.assert_array_equal(np.asarray(d.V[1, 0]), 2 * V0)
    assert not np.allclose(np.asarray(d.V[1, -1]), np.asarray(a.V[1, -1]))


def test_psd_stop():
    """Large m dt: Euler leaves the PSD cone; those paths stop with max|V| < stop_norm."""
    m = 8
    p = sde.SDEParams(1.0, block="mlp")
    sol = sde.solve(np.eye(m), p, T=0.5, dt=0.05, num_paths=32, key=jax.random.key(9), save_every=10)
    stopped = np.asarray(sol.stopped)
    assert stopped.any()
    V = np.asarray(sol.V)
    assert np.all(np.isfinite(V))
    for i in np.where(stopped)[0]:
        assert np.max(np.abs(V[i, -1])) < 1e4
        assert np.linalg.eigvalsh(V[i, -1])[0] > -1.5e-8 * max(1, np.max(np.abs(V[i, -1])))


# --------------------------------------------------------------------------- dtype, validation


def test_float32():
    m = 3
    V0 = (0.8 * np.eye(m) + 0.2).astype(np.float32)
    p = sde.SDEParams(0.5, 1.0)
    sol = sde.solve(V0, p, T=0.2, dt=0.01, num_paths=16, key=jax.random.key(10), save_every=5)
    assert sol.V.dtype == jnp.float32 and sol.t.dtype == jnp.float32
    assert sol.stop_time.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(sol.V))) and sol.stopped_fraction == 0.0
    np.testing.assert_allclose(np.asarray(sol.t)[-1], 0.2, rtol=1e-6)
    cor = sde.solve_correlation(
        np.float32(0.2), sde.SDEParams(0.5, block="mlp"), T=0.2, dt=0.01, num_paths=16, key=jax.random.key(1)
    )
    assert cor.V.dtype == jnp.float32 and np.all(np.abs(np.asarray(cor.V)) <= 1)


V_OK = np.eye(2)
P_OK = sde.SDEParams(0.5)
KW_OK = dict(T=1.0, dt=0.1, num_paths=2, key=jax.random.key(0))


@pytest.mark.parametrize(
    "V0, kwargs, match",
    [
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), {}, "non-finite"),
        (np.array([[1.0, 0.5], [0.1, 1.0]]), {}, "not symmetric"),
        (np.array([[1.0, 2.0], [2.0, 1.0]]), {}, "not PSD"),
        (np.ones((2, 3)), {}, "shape"),
        (np.ones((3, 2, 2)), {}, "num_paths=2"),
        (np.eye(2, dtype=np.float16), {}, "float16"),
        (2e4 * np.eye(2), {}, "stop_norm"),
        (V_OK, dict(T=0.0), r"T=0.0 is outside \(0, inf\)"),
        (V_OK, dict(T=-1.0), "T=-1.0"),
        (V_OK, dict(dt=2.0), r"dt=2.0 is outside \(0, T=1.0\]"),
        (V_OK, dict(dt=0.0), "dt=0.0"),
        (V_OK, dict(dt=0.3), "integer number of steps"),
        (V_OK, dict(save_every=3), "save_every=3 does not divide"),
        (V_OK, dict(save_every=0), "save_every=0"),
        (V_OK, dict(num_paths=0), "num_paths=0"),
        (V_OK, dict(stop_norm=0.0), "stop_norm=0.0"),
        (V_OK, dict(psd_tol=-1.0), "psd_tol=-1.0"),
        (V_OK, dict(noise="exact"), "noise='exact'"),
        (V_OK, dict(factor="qr"), "factor='qr'"),
        (V_OK, dict(brownian_dt=0.03), "brownian_dt=0.03 must divide"),
        (V_OK, dict(brownian_dt=-1.0), "brownian_dt=-1.0"),
        (V_OK, dict(chunk_size=0), "chunk_size=0"),
        (V_OK, dict(key=None), "key=None"),
        (V_OK, dict(deterministic=True), "num_paths=2 must be 1"),
    ],
)
def test_solve_validation(V0, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sde.solve(V0, P_OK, **{**KW_OK, **kwargs})


def test_solve_correlation_validation():
    p = sde.SDEParams(0.5, block="mlp")
    with pytest.raises(ValueError, match="block='transformer'"):
        sde.solve_correlation(0.2, P_OK, **KW_OK)
    with pytest.raises(ValueError, match=r"rho0=1.5 is outside \[-1, 1\]"):
        sde.solve_correlation(1.5, p, **KW_OK)
    with pytest.raises(ValueError, match="shape"):
        sde.solve_correlation(np.zeros(3), p, **KW_OK)
    with pytest.raises(ValueError, match="dt=0.3"):
        sde.solve_correlation(0.2, p, **{**KW_OK, "dt": 0.3})


_SHARD_CHILD = """
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
import sde
from sde._helpers import devices
assert len(jax.local_devices()) == 2
out = []
for shard in (False, True):
    devices.SHARD_ON_CPU = shard
    assert (devices.sample_mesh() is not None) == shard
    p = sde.SDEParams(0.6, 0.8)
    r = sde.solve(0.8 * np.eye(3) + 0.2, p, T=0.1, dt=0.01, num_paths=7, key=jax.random.key(3),
                  save_every=5, chunk_size=3)
    c = sde.solve_correlation(0.3, sde.SDEParams(0.6, block="mlp"), T=0.1, dt=0.01, num_paths=5,
                              key=jax.random.key(4))
    out.append((np.asarray(r.V), np.asarray(r.stop_time), np.asarray(c.V)))
for a, b in zip(*out):
    np.testing.assert_array_equal(a, b)
print("SHARDED_OK")
"""


def test_sharded_over_two_cpu_devices_gives_identical_paths():
    """The shard_map path (used on multi-device accelerators) run on 2 forced CPU devices in a
    subprocess: identical results to the single-device program."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _SHARD_CHILD], env=env, capture_output=True,
                         text=True, timeout=300)
    assert "SHARDED_OK" in res.stdout, res.stderr[-3000:]
