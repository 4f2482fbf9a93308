"""The main job and the library experiment behind it: CLI validation, outputs, determinism,
resumption after SIGINT / SIGKILL, and the analysis helpers."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sde
from sde._experiment.analysis import alive_mask, eigen_exit_time, exit_summary

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import sde_vs_finite as job  # noqa: E402

TINY = ["--m", "3", "--width", "12", "--depth", "6", "--samples", "96", "--sde-paths", "96",
        "--chunk", "16", "--dt", "0.1", "--sweep-widths", "8", "12", "--dtype", "float64"]


def _run(args, out):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "sde_vs_finite.py"), *args, "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_flags_override_the_preset():
    cfg, out, _ = job.resolve(["--preset", "fig1", "--samples", "10", "--gamma", "0.5"])
    assert (cfg.width, cfg.depth, cfg.samples, cfg.gamma) == (200, 150, 10, 0.5)
    assert cfg.variants == ("unshaped", "pre_ln") and out == "runs/sde_vs_finite_fig1"
    cfg, out, _ = job.resolve(["--preset", "fig1", "--sweep-widths"])  # the flag alone clears a list
    assert cfg.sweep_widths == () and job.resolve([])[0] == sde.ExperimentConfig()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gamma", "1.5"], "gamma=1.5 is outside (0, 1]"),
        (["--gamma", "nan"], "gamma=nan is outside (0, 1]"),
        (["--tau0", "0"], "tau0=0.0 is outside (0, inf)"),
        (["--rho0", "1"], "rho0=1.0 is outside (-0.5, 1)"),
        (["--rho0", "-0.6"], "rho0=-0.6 is outside (-0.5, 1)"),
        (["--width", "0"], "width=0 must be an integer >= 1"),
        (["--depth", "-1"], "depth=-1 must be an integer >= 1"),
        (["--samples", "0"], "samples=0 must be an integer >= 1"),
        (["--sde-paths", "0"], "sde_paths=0 must be an integer >= 1"),
        (["--dt", "0"], "dt=0.0 is outside (0, T=0.75]"),
        (["--dt", "2"], "dt=2.0 is outside (0, T=0.75]"),
        (["--preset", "fig9"], "argument --preset: invalid choice: 'fig9'"),
        (["--sampler", "loop"], "sampler='loop' is not one of"),
        (["--block", "conv"], "block='conv' is not one of"),
        (["--m", "1"], "m=1 must be an integer >= 2"),
        (["--gammas", "0.5", "2"], "gamma=2.0 is outside (0, 1]"),
        (["--variants", "shaped", "bogus"], "variants='bogus' is not one of"),
        (["--tau0s", "2"], "tau0s needs gammas"),
        (["--activation", "sin2max"], "activation 'sin2max' has no small-score expansion"),
        (["--width", "3"], "width=3 must be an integer >= 4"),
    ],
)
def test_bad_parameters_give_one_line_and_exit_2(args, message, capsys, tmp_path):
    code = _main_exit_code([*args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists(), "no work may happen before validation"


def _main_exit_code(argv) -> int:
    """``job.main``'s return value, or argparse's exit status (it exits for unknown choices)."""
    try:
        return job.main(argv)
    except SystemExit as exit_:
        return exit_.code


def test_refuses_an_output_directory_of_another_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert job.main([*TINY, "--out", str(out)]) == 0
    code = job.main([*TINY, "--gamma", "0.3", "--out", str(out)])
    assert code == 2 and "holds a run with a different config (differs in: gamma)" in capsys.readouterr().err
    assert job.main([*TINY, "--gamma", "0.3", "--out", str(out), "--overwrite"]) == 0


def test_outputs_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert job.main([*TINY, "--out", str(a)]) == 0
    metrics = json.loads((a / "metrics.json").read_text())
    for k in ("ks_rho", "ks_pvalue_rho", "w1_rho", "quantiles_rho", "stopped_fraction", "width", "depth",
              "T", "num_samples", "sde_paths"):
        assert k in metrics
    assert len(metrics["quantiles_rho"]["finite"]) == 5 and len(metrics["quantiles_rho"]["sde"]) == 5
    assert {"ks_rate", "w1_rate", "resolved_widths"} <= set(metrics["width_sweep"])
    config = json.loads((a / "config.json").read_text())
    assert config["config"]["width"] == 12 and config["environment"]["versions"]["jax"]
    for stem in ("density_rho", "mean_rho", "width_sweep"):
        assert (a / f"{stem}.png").stat().st_size > 0 and (a / f"{stem}.pdf").stat().st_size > 0
    with np.load(a / "results.npz", allow_pickle=False) as f:
        assert np.all(np.isfinite(f["rho_finite"]))
    assert job.main([*TINY, "--out", str(b)]) == 0
    assert (b / "metrics.json").read_text() == (a / "metrics.json").read_text()


def test_library_experiment_in_memory_equals_the_main_job(tmp_path):
    """A notebook's few lines (config, run_experiment) give the main job's metrics."""
    import jax

    jax.config.update("jax_enable_x64", True)  # TINY runs in float64 (tests/conftest.py sets it too)
    cfg = job.resolve(TINY)[0]
    result = sde.run_experiment(cfg)
    assert job.main([*TINY, "--out", str(tmp_path / "a")]) == 0
    stored = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert json.loads(json.dumps(result.metrics, default=lambda x: np.asarray(x).tolist())) == stored
    finite = result.ensembles[("finite", "shaped", cfg.gamma, 12, 6, cfg.tau0)]
    assert isinstance(finite, sde.Ensemble) and finite.V.shape == (96, 7, 3, 3) and result.path is None


@pytest.mark.parametrize("v0_scale, gamma, tau0, every_sde_path_stops", [(1, 0.5, 0.2, False), (100, 1, 0.3, True)])
def test_nothing_non_finite_reaches_metrics_when_paths_stop(v0_scale, gamma, tau0, every_sde_path_stops, tmp_path):
    """Paths that blow up or leave the PSD cone (large inputs, small tau0, few big Euler steps)
    are stopped and counted; survivors are compared, and a side with none gives null (never NaN)."""
    out = tmp_path / "blow"
    args = [*TINY, "--v0-scale", str(v0_scale), "--gamma", str(gamma), "--tau0", str(tau0),
            "--stop-norm", "1e3", "--sweep-widths", "--out", str(out)]
    assert job.main(args) == 0
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    metrics = json.loads(text)
    stopped = metrics["stopped_fraction"]
    assert stopped["sde"] > 0.1 and stopped["finite"] < 1
    assert metrics["stopped_count"]["sde"] == round(stopped["sde"] * 96)
    if every_sde_path_stops:
        assert stopped["sde"] == 1 and metrics["ks_rho"] is None and metrics["w1_rho"] is None
    else:
        assert stopped["sde"] < 1 and math.isfinite(metrics["ks_rho"]) and 0 <= metrics["ks_pvalue_rho"] <= 1


RESUME_ARGS = [*TINY, "--samples", "256", "--sde-paths", "256"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run directory of an uninterrupted run of RESUME_ARGS (one for both signals)."""
    reference = tmp_path_factory.mktemp("reference") / "run"
    assert _run(RESUME_ARGS, reference).wait(timeout=300) == 0
    return reference


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_resume_after_interruption_equals_uninterrupted(sig, uninterrupted, tmp_path):
    out = tmp_path / "interrupted"
    proc = _run(RESUME_ARGS, out)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "chunks").glob("*.npz"))) < 3:
        time.sleep(0.05)
    done = len(list((out / "chunks").glob("*.npz")))
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), proc.returncode
    assert 0 < done and not (out / "metrics.json").exists()
    assert not list(out.rglob("*.tmp")) or sig == signal.SIGKILL  # SIGINT cleans up its temp file

    assert _run(RESUME_ARGS, out).wait(timeout=300) == 0
    assert (out / "metrics.json").read_text() == (uninterrupted / "metrics.json").read_text()
    ref = np.load(uninterrupted / "results.npz", allow_pickle=False)
    res = np.load(out / "results.npz", allow_pickle=False)
    for k in ref.files:
        np.testing.assert_array_equal(res[k], ref[k])


def test_eigen_exit_counts_stops_and_bounds():
    """Exit time: first save with an eigenvalue outside [1e-4, 1e4], or the stop time if earlier."""
    t = np.array([0.0, 0.1, 0.2, 0.3])
    V = np.broadcast_to(np.eye(2), (3, 4, 2, 2)).copy()
    V[0, 2:] *= 2e4          # leaves the upper bound at t = 0.2
    V[1, 3, 1, 1] = 1e-5     # leaves the lower bound at t = 0.3
    stop_t = np.array([np.inf, 0.1, np.inf])  # sample 1 was stopped (blow-up) at t = 0.1
    exit_t = eigen_exit_time(sde.Ensemble(t, V, np.isfinite(stop_t), stop_t))
    np.testing.assert_array_equal(exit_t, [0.2, 0.1, np.inf])
    s = exit_summary(exit_t, width=10)
    assert s["fraction"] == pytest.approx(2 / 3)
    assert s["depth_quartiles"][:2] == pytest.approx([1.0, 2.0]) and s["depth_quartiles"][2] is None


def test_alive_mask_ends_at_stops_and_collapse():
    t = np.array([0.0, 0.5, 1.0])
    V = np.broadcast_to(np.eye(2, dtype=np.float32), (2, 3, 2, 2)).copy()
    V[1, 2] = 0.0  # collapsed
    stop_t = np.array([0.5, np.inf])
    alive = alive_mask(sde.Ensemble(t, V, np.isfinite(stop_t), stop_t))
    np.testing.assert_array_equal(alive, [[True, False, False], [True, True, False]])


def test_stability_grid_over_gamma_and_tau0(tmp_path):
    """Large inputs (paper Fig. 5 setting, tiny sizes): one stability row per (tau0, gamma),
    stopped samples counted as exits, the stability figure written, nothing non-finite."""
    out = tmp_path / "fig5"
    args = ["--preset", "fig5", "--width", "12", "--depth", "12", "--samples", "32", "--sde-paths", "32",
            "--chunk", "16", "--dt", "0.05", "--gammas", "0.1", "1", "--tau0s", "2", "--dtype", "float64",
            "--out", str(out)]
    assert job.main(args) == 0
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rows = json.loads(text)["stability"]
    assert [(r["tau0"], r["gamma"]) for r in rows] == [(1.0, 0.1), (1.0, 1.0), (2.0, 0.1), (2.0, 1.0)]
    assert rows[0]["input_score_std"] == pytest.approx(100 / math.sqrt(12))
    assert rows[1]["sde"]["fraction"] == 1.0  # gamma = 1 with inputs ~100: the cubic drift blows up
    assert (out / "stability.png").stat().st_size > 0
