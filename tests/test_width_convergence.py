"""The finite-width study (docs/finite_width.md): its estimators, the time-step extrapolation,
the rate fit and the ReLU factor on synthetic or exact inputs; a small study whose variance
biases must shrink towards zero at least like n^{-1/2} (and the same check rejecting finite
networks with a wrong temperature); the ``widths`` preset and its resume after SIGKILL."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import sde
from sde._experiment import convergence as conv
from sde._experiment import runner, units
from sde._experiment.config import ExperimentConfig
from shaped_attn.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import sde_vs_finite as job  # noqa: E402


# ------------------------------------------------------------------------------- estimators


def test_moments_of_one_copy_are_compare_moments():
    """With one copy per sample the estimates and standard errors are those of
    sde.compare_moments (whose SEs of a sample against itself are sqrt(2) times one side's)."""
    x = np.random.default_rng(0).standard_gamma(2.0, size=50_000)
    mean, var = conv.moments(x[:, None], np.ones(x.size, bool))
    ref = {k: v.se / math.sqrt(2) for k, v in sde.compare_moments(x, x).items()}
    assert mean.value == pytest.approx(x.mean(), rel=1e-12) and var.value == pytest.approx(x.var(ddof=1), rel=1e-12)
    assert mean.se == pytest.approx(ref["mean"], rel=1e-3) and var.se == pytest.approx(ref["var"], rel=1e-3)


def test_exchangeable_copies_are_calibrated():
    """Three correlated exchangeable copies per sample: the pooled mean and variance are
    unbiased and their standard errors match the spread over 300 repetitions; stopped samples
    are left out."""
    rng = np.random.default_rng(1)
    cov = 0.7 * np.eye(3) + 0.3
    est = []
    for _ in range(300):
        x = rng.multivariate_normal(np.zeros(3), cov, size=2000) ** 2  # var of chi2(1) = 2
        keep = rng.random(2000) > 0.01
        x[~keep] = 1e9  # never looked at
        est.append([(e.value, e.se) for e in conv.moments(x, keep)])
    est = np.array(est)  # (rep, stat, value/se)
    for k, truth in ((0, 1.0), (1, 2.0)):
        values, ses = est[:, k, 0], est[:, k, 1]
        assert abs(values.mean() - truth) < 4 * values.std() / math.sqrt(len(values))
        assert ses.mean() == pytest.approx(values.std(), rel=0.12)


def test_common_random_numbers_combine_with_their_covariance():
    """Estimates on the same samples: the SE of a difference comes from the paired influence
    (tiny for nearly equal samples), and padding onto more samples keeps value and SE."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10_000, 1))
    a, _ = conv.moments(x, np.ones(10_000, bool))
    b, _ = conv.moments(x + 1e-3 * rng.normal(size=x.shape), np.ones(10_000, bool))
    assert (a - b).se < 2e-5 < a.se / 100
    assert conv.covariance(a, a) == pytest.approx(a.se**2)
    p = a.padded(40_000)
    assert p.value == a.value and p.se == pytest.approx(a.se) and p.influence.size == 40_000
    assert conv.combine((2.0, -1.0), (a, None)) is None


def test_extrapolation_weights_on_an_exact_expansion():
    """E_h = E_0 + a h + b h^2 at h, 2h, 4h: the reference is E_0 - 2 b h^2, the remaining bias
    estimate is exactly that -2 b h^2, and E_h - reference = a h + 3 b h^2."""
    e0, a, b, h = 0.3, 0.5, 2.0, 0.01
    e = [e0 + a * k * h + b * (k * h) ** 2 for k in conv.STEP_MULTIPLES]
    dot = lambda w: float(np.dot(w, e))  # noqa: E731
    assert dot(conv.REFERENCE) == pytest.approx(e0 - 2 * b * h * h, abs=1e-15)
    assert dot(conv.REMAINING) == pytest.approx(-2 * b * h * h, abs=1e-15)
    assert dot(conv.EULER_BIAS) == pytest.approx(a * h + 3 * b * h * h, abs=1e-15)
    assert sum(conv.REFERENCE) == 1 and abs(sum(conv.REMAINING)) < 1e-15 and sum(conv.EULER_BIAS) == 0


# ------------------------------------------------------------------------------- rate fit


def test_fit_rate_recovers_a_power_law_with_calibrated_errors():
    """Biases C n^-p plus noise with a shared offset (the SDE reference): p within its SE in
    most of 200 repetitions, and the SE matches the spread."""
    rng = np.random.default_rng(3)
    n = np.array([4, 8, 12, 16, 24, 32])
    truth = 0.1 * n**-0.8
    se_f, se_r = 0.05 * truth, 0.0005
    cov = np.diag(se_f**2) + se_r**2
    fits = []
    for _ in range(200):
        b = truth + rng.normal(size=n.size) * se_f + rng.normal() * se_r
        fits.append(conv.fit_rate(n, b, cov))
    rates = np.array([f["rate"] for f in fits if f["rate"] is not None])
    ses = np.array([f["rate_se"] for f in fits if f["rate"] is not None])
    assert rates.size > 150
    assert abs(rates.mean() - 0.8) < 4 * rates.std() / math.sqrt(rates.size)
    assert np.median(ses) == pytest.approx(rates.std(), rel=0.35)


def test_fit_rate_stops_at_the_first_unresolved_width_and_refuses_sign_changes():
    cov = np.diag(np.full(4, 1e-6))
    fit = conv.fit_rate([4, 8, 16, 32], [0.04, 0.02, 0.001, 0.01], cov)  # 32 resolved by chance: ignored
    assert fit["fit_widths"] == [4, 8] and fit["rate"] == pytest.approx(1.0) and fit["dof"] == 0
    fit = conv.fit_rate([4, 8, 16], [0.04, -0.02, 0.01], cov[:3, :3])
    assert fit["rate"] is None and "change sign" in fit["no_rate"] and fit["resolved_widths"] == [4, 8, 16]
    fit = conv.fit_rate([4, 8], [0.04, 0.001], cov[:2, :2])
    assert fit["rate"] is None and "fewer than two" in fit["no_rate"]
    assert fit["resolved_widths"] == [4] and fit["fit_widths"] == []


# ------------------------------------------------------------------------------- the ReLU factor


def test_relu_drift_factor_is_the_exact_one_layer_mean():
    """One shaped-ReLU MLP layer has mean lam^2 V + gamma^2 K_n(V); the theory's claim
    (docs/finite_width.md §3): n (K_n(V) - V) = c_n b_relu(V) exactly, c_n = 2 / (s_+^2 + s_-^2).
    Monte Carlo of K_n at n = 4 (c_n = 1.6) with 4e6 Gaussian pairs."""
    cfg = ExperimentConfig(block="mlp")
    n, V = 4, np.array([[1.3, 0.4], [0.4, 0.9]])
    s_plus, s_minus = 1.0, 1.0 - 1.0 / math.sqrt(n)
    assert conv.relu_drift_factor(cfg, n) == pytest.approx(2 / (s_plus**2 + s_minus**2), rel=1e-6)
    g = np.random.default_rng(4).multivariate_normal([0, 0], V, size=4_000_000)
    act = np.sqrt(conv.relu_drift_factor(cfg, n)) * np.where(g > 0, s_plus * g, s_minus * g)
    prod = act[:, 0] * act[:, 1]
    measured = n * (prod.mean() - V[0, 1])
    params = sde.SDEParams(gamma=1.0, block="mlp")
    b_relu = float(sde.drift(V, params)[0, 1])  # the mlp block's drift is gamma^2 b_relu
    assert measured == pytest.approx(conv.relu_drift_factor(cfg, n) * b_relu, abs=5 * n * prod.std() / 2000)
    assert abs(measured - b_relu) > 10 * n * prod.std() / 2000  # and not the SDE's own drift


def test_relu_scaled_params_scale_only_the_relu_drift():
    V = np.array([[1.3, 0.4, -0.5], [0.4, 0.9, 0.2], [-0.5, 0.2, 1.1]])
    for block in ("mlp", "transformer"):
        base = sde.SDEParams(gamma=0.6, block=block)
        scaled = conv.relu_scaled_params(base, 1.6)
        relu = np.asarray(sde.drift(V, sde.SDEParams(gamma=0.6, block="mlp")))
        np.testing.assert_allclose(np.asarray(sde.drift(V, scaled)) - np.asarray(sde.drift(V, base)), 0.6 * relu,
                                   rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(sde.diffusion_matrix(V, scaled), sde.diffusion_matrix(V, base), rtol=1e-12)


# ------------------------------------------------------------------------------- config and preset


@pytest.mark.parametrize("kwargs, message", [
    (dict(convergence_widths=(4, 6)), "convergence_widths: width 6 gives depth T * width = 4.5"),
    (dict(convergence_widths=(3,)), "convergence_widths=3 must be an integer >= 4"),
    (dict(convergence_steps=30), "convergence_steps=30 must be a multiple of 4"),
    (dict(convergence_widths=(4, 8), convergence_budget=6), "convergence_budget=6 must be 0 or at least"),
    (dict(convergence_slope_paths=10, convergence_paths=5), "convergence_slope_paths=10 must be an integer in [0, 5]"),
])
def test_bad_convergence_settings_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match="convergence_") as err:
        ExperimentConfig(**kwargs)
    assert message in str(err.value)


def test_widths_preset_and_its_sample_budget():
    cfg = job.resolve(["--preset", "widths"])[0]
    setting = (cfg.m, cfg.rho0, cfg.gamma, cfg.tau0, cfg.T, cfg.block)
    assert setting == (3, 0.2, 1 / math.sqrt(8), 1.0, 0.75, "transformer")  # paper Fig. 1
    plan = cfg.convergence_plan()
    assert [w for w, _, _ in plan] == [4, 8, 12, 16, 24, 32, 48, 64]
    assert all(d == 0.75 * w for w, d, _ in plan)
    assert [s for *_, s in plan] == [min(1_000_000, 6_000_000 // w) for w, _, _ in plan]
    mlp = job.resolve(["--preset", "widths", "--block", "mlp"])[0]
    assert mlp.block == "mlp" and mlp.convergence_plan() == plan


# ------------------------------------------------------------------------------- a small study

SMALL = ExperimentConfig(convergence_widths=(4, 8), convergence_samples=65536, convergence_paths=16384,
                         convergence_steps=48, convergence_slope_paths=0, chunk=65536, dtype="float32")
CHECKED = ("var_rho12", "var_log_v11")
"""The statistics the check needs resolved and shrinking: the two variances, where the
finite-width signal is; Var[log V_11] also sees the attention temperature, Var[rho_12] hardly
(docs/finite_width.md §7)."""
Z_RESOLVED, Z_SHRINK = 4.0, 2.0


def shrinks(wc: dict, names=CHECKED) -> tuple[bool, dict]:
    """The check, for each statistic in ``names``: the bias at the smallest width n0 is resolved
    (above Z_RESOLVED standard errors) and the bias at the largest width n1 is below
    sqrt(n0 / n1) times it, the slowest decay the theory allows (docs/finite_width.md §3), by
    more than Z_SHRINK standard errors (the shared SDE reference's error counted once)."""
    n0, n1 = wc["widths"][0], wc["widths"][-1]
    c, ok, info = math.sqrt(n0 / n1), True, {}
    for name in names:
        row = wc["statistics"][name]
        b0, b1 = row["bias"][0], row["bias"][-1]
        f0, f1, r = row["finite_se"][0], row["finite_se"][-1], row["sde_se"]
        s01 = math.copysign(1, b0) * math.copysign(1, b1)
        se = math.sqrt(c * c * (f0**2 + r**2) + f1**2 + r**2 - 2 * c * s01 * r**2)
        info[name] = {"bias": (round(b0, 5), round(b1, 5)), "z_resolved": round(abs(b0) / row["bias_se"][0], 2),
                      "z_shrink": round((c * abs(b0) - abs(b1)) / se, 2)}
        ok &= info[name]["z_resolved"] > Z_RESOLVED and info[name]["z_shrink"] > Z_SHRINK
    return ok, info


@functools.lru_cache(maxsize=None)
def sde_units() -> dict:
    run = runner.Runner(SMALL)
    return {u: run.conv_sde(*u[1:]) for u in units.plan(SMALL) if u[0] == "conv_sde"}


def finite_units(**attention) -> dict:
    """The finite units of SMALL; ``attention``: fields of the networks' attention config to
    change (the negative controls), e.g. ``temperature="standard"`` (``tau0 sqrt(n_k)``, the
    shaped temperature without its sqrt(n)) or ``tau0=0.5``."""

    def sampler(V0, config, **kwargs):
        def changed(width):
            c = config(width)
            return dataclasses.replace(c, attention=dataclasses.replace(c.attention, **attention))
        return sde.FiniteSampler(V0, changed, **kwargs)

    with mock.patch.object(runner, "FiniteSampler", sampler):
        run = runner.Runner(SMALL)
        return {u: run.conv_finite(*u[1:]) for u in units.plan(SMALL) if u[0] == "conv_finite"}


def test_bias_shrinks_from_the_smallest_to_the_largest_width():
    """Both variances: resolved at n = 4 and below sqrt(4/8) of it at n = 8."""
    wc = conv.width_convergence(SMALL, {**sde_units(), **finite_units()})
    ok, info = shrinks(wc)
    print("shaped temperature:", info)
    assert ok, info
    assert "NaN" not in json.dumps(wc, default=float)


def test_shrink_check_rejects_networks_with_a_wrong_temperature():
    """Negative control: finite networks whose temperature lacks its sqrt(n) (tau0 sqrt(n_k)
    instead of tau0 sqrt(n n_k), scores too large by sqrt(n)) move away from the SDE as n
    grows, and the same check fails."""
    wc = conv.width_convergence(SMALL, {**sde_units(), **finite_units(temperature="standard")})
    ok, info = shrinks(wc)
    print("temperature without sqrt(n):", info)
    assert not ok, info


# ------------------------------------------------------------------------------- resume

TINY = ["--preset", "widths", "--width", "8", "--depth", "6", "--samples", "64", "--sde-paths", "64",
        "--dt", "0.125", "--convergence-widths", "4", "8", "--convergence-samples", "256",
        "--convergence-budget", "0", "--convergence-paths", "256", "--convergence-steps", "8",
        "--convergence-slope-paths", "128", "--chunk", "64", "--dtype", "float64"]


def _run(args, out):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "sde_vs_finite.py"), *args, "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_convergence_units_resume_from_their_chunks(tmp_path):
    """An SDE unit of the study (one key for all step sizes) written chunk by chunk, one chunk
    lost as after an interruption: the rerun recomputes it and gives the same arrays."""
    cfg = dataclasses.replace(SMALL, convergence_paths=96, convergence_steps=8, chunk=32)
    run = RunDir(tmp_path, dataclasses.asdict(cfg))
    first = runner.Runner(cfg, run).conv_sde(4, 0)
    lost = tmp_path / "chunks" / "conv-sde-s4.00001.npz"
    assert lost.exists() and len(list((tmp_path / "chunks").glob("*.npz"))) == 3
    lost.unlink()
    again = runner.Runner(cfg, run).conv_sde(4, 0)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert first.V.shape == (96, 1, 3, 3) and not np.isnan(first.V).any()


@pytest.mark.slow
def test_widths_preset_resumes_after_sigkill(tmp_path):
    """The CLI killed after a few chunks and rerun: metrics.json equals that of an uninterrupted
    run (about a minute: three processes, each compiling its units)."""
    reference = tmp_path / "reference"
    assert _run(TINY, reference).wait(timeout=300) == 0
    metrics = json.loads((reference / "metrics.json").read_text())["width_convergence"]
    assert set(metrics["statistics"]) == set(conv.STATISTICS) and (reference / "width_convergence.png").exists()

    out = tmp_path / "interrupted"
    proc = _run(TINY, out)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "chunks").glob("conv-*.npz"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "metrics.json").exists()
    assert _run(TINY, out).wait(timeout=300) == 0
    assert (out / "metrics.json").read_text() == (reference / "metrics.json").read_text()
