"""The main job in plain NumPy: the baseline that ``scripts/sde_vs_finite.py`` is timed against.

Written as a competent researcher would write it by hand from the repository's docs (the block
of docs/model.md §1, the Gram sampler of docs/samplers.md §1, the drift and diffusion of
docs/sde.md §2-5), vectorised over samples, with no JAX:

* **Finite network, Gram chain** (docs/samplers.md §1). The m x n features of every sample are
  kept; each fresh weight product ``X W / sqrt(n)`` is drawn as ``chol(X X^T / n) @ G`` with
  ``G`` iid N(0, 1) of shape m x n_out from ``np.random.default_rng``. One layer (docs/model.md
  §1):

      Q, K, V_ = R G_q, R G_k, R G_v              R = chol(X X^T / n)
      A  = I + softmax_rows(Q K^T / tau) - 11^T/m   tau = tau0 sqrt(n n_k), n_k = n
      Z  = lam X + gamma A V_
      H  = chol(Z Z^T / n) G_pre
      S  = s_plus max(H, 0) + s_minus min(H, 0)      s_pm = 1 + c_pm / sqrt(n)
      X' = lam Z + gamma sqrt(c) chol(S S^T / n) G_post,   c = 2 / (s_plus^2 + s_minus^2)

  with ``lam = sqrt(1 - gamma^2)``. ``X0 = sqrt(n) chol(V0) Q^T`` with ``Q`` (n x m) orthonormal
  columns orthogonal to the all-ones vector (any such ``X0`` gives the same law: the chain
  depends on ``X0`` only through ``V0``). A sample is frozen (stopped) once its ``V`` is
  non-finite or exceeds ``stop_norm``, as in ``sde.simulate_finite``.
* **SDE**: the vectorised Euler-Maruyama of :mod:`numpy_baselines` (``numpy_euler_sde``: the
  ``D x D`` diffusion matrix and its square root by ``numpy.linalg.eigh`` at every step), or its
  structured O(m^3) variant (docs/noise.md §1) with ``--sde-noise structured``.
* **dtype**: float32 by default, the dtype of the JAX job (``--dtype float64`` is available;
  NumPy's float32 ``standard_normal`` and matmuls are the faster choice, so the default is the
  conservative baseline for the speed ratio).
* **Agreement**: two-sample KS statistic (``scipy.stats.ks_2samp``) and Wasserstein-1 of
  ``rho_12`` at the last layer / at ``T = depth / width``, over samples that did not stop.

Usage (the fig1 target settings of issue 4)::

    python benchmarks/numpy_main_job.py --m 3 --rho0 0.2 --width 200 --depth 150 \\
        --gamma 0.35355 --tau0 1 --c-plus 0 --c-minus -1 --samples 4096 --sde-paths 16384 \\
        --dt 0.005 --json out.json --npz out.npz

Prints one line of results; ``--json`` writes timings and metrics, ``--npz`` the ``rho_12``
samples (for a cross-check against the JAX job's ``results.npz``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from numpy_baselines import numpy_euler_sde, numpy_euler_sde_structured  # noqa: E402


def initial_tokens(V0: np.ndarray, width: int) -> np.ndarray:
    """``X0`` (m x n) with ``X0 X0^T / n = V0`` and zero feature mean per token."""
    m = V0.shape[0]
    j = np.arange(width)
    k = np.arange(1, m + 1)[:, None]
    q = np.sqrt(2.0 / width) * np.cos(np.pi * (j + 0.5) * k / width)  # orthonormal DCT-II rows
    return (math.sqrt(width) * np.linalg.cholesky(V0) @ q).astype(V0.dtype)


def _chol_gram(X: np.ndarray) -> np.ndarray:
    """``chol(X X^T / n)`` per sample; the clipped-``eigh`` root where Cholesky fails."""
    S = X @ X.transpose(0, 2, 1) / X.shape[-1]
    try:
        return np.linalg.cholesky(S)
    except np.linalg.LinAlgError:  # a singular Gram matrix somewhere in the batch
        w, U = np.linalg.eigh(S)
        return U * np.sqrt(np.maximum(w, 0))[:, None, :]


def numpy_finite(V0, *, width, depth, gamma, tau0, c_plus, c_minus, num_samples, seed,
                 stop_norm=1e4):
    """``V_l = X_l X_l^T / n`` of the finite shaped Transformer, ``(S, depth + 1, m, m)``, and
    the stopped flags ``(S,)``. The dtype of ``V0`` is the dtype of the computation."""
    rng = np.random.default_rng(seed)
    V0 = np.asarray(V0)
    dtype = V0.dtype
    m, n, n_k = V0.shape[0], width, width
    lam = math.sqrt(1.0 - gamma**2)
    tau = tau0 * math.sqrt(n * n_k)
    s_plus, s_minus = 1 + c_plus / math.sqrt(n), 1 + c_minus / math.sqrt(n)
    c = 2.0 / (s_plus**2 + s_minus**2)
    eye_centre = (np.eye(m) - 1.0 / m).astype(dtype)

    def normal(cols):
        return rng.standard_normal((num_samples, m, cols), dtype=dtype)

    X = np.broadcast_to(initial_tokens(V0, n), (num_samples, m, n)).copy()
    V = np.empty((num_samples, depth + 1, m, m), dtype)
    V[:, 0] = X @ X.transpose(0, 2, 1) / n
    alive = np.ones(num_samples, dtype=bool)
    for layer in range(depth):
        R = _chol_gram(X)
        Q, K, Vv = R @ normal(n_k), R @ normal(n_k), R @ normal(n)
        Y = Q @ K.transpose(0, 2, 1) / tau
        P = np.exp(Y - Y.max(axis=-1, keepdims=True))
        P /= P.sum(axis=-1, keepdims=True)
        Z = lam * X + gamma * ((P + eye_centre) @ Vv)
        H = _chol_gram(Z) @ normal(n)
        Sg = s_plus * np.maximum(H, 0) + s_minus * np.minimum(H, 0)
        X_new = lam * Z + (gamma * math.sqrt(c)) * (_chol_gram(Sg) @ normal(n))
        V_new = X_new @ X_new.transpose(0, 2, 1) / n
        ok = np.all(np.isfinite(V_new), axis=(1, 2)) & (np.abs(V_new).max(axis=(1, 2)) <= stop_norm)
        alive &= ok
        X = np.where(alive[:, None, None], X_new, X)
        V[:, layer + 1] = np.where(alive[:, None, None], V_new, V[:, layer])
    return V, ~alive


def rho12(V: np.ndarray) -> np.ndarray:
    return V[..., 0, 1] / np.sqrt(V[..., 0, 0] * V[..., 1, 1])


def run(args) -> dict:
    dtype = np.dtype(args.dtype)
    V0 = ((1 - args.rho0) * np.eye(args.m) + args.rho0 * np.ones((args.m, args.m))).astype(dtype)
    T = args.depth / args.width
    timings = {}
    start = time.perf_counter()
    V, stopped_f = numpy_finite(V0, width=args.width, depth=args.depth, gamma=args.gamma,
                                tau0=args.tau0, c_plus=args.c_plus, c_minus=args.c_minus,
                                num_samples=args.samples, seed=args.seed)
    timings["finite_s"] = time.perf_counter() - start
    t0 = time.perf_counter()
    steps = max(1, round(T / args.dt))
    sde = numpy_euler_sde if args.sde_noise == "generic" else numpy_euler_sde_structured
    VT = sde(V0, args.gamma, args.tau0, args.c_plus, args.c_minus, T, T / steps, args.sde_paths,
             args.seed + 1)
    # numpy_euler_sde freezes stopped paths at their last good state and does not report them
    # (0.05 % of paths at the fig1 settings), so every path enters the statistics.
    stopped_s = np.zeros(len(VT), dtype=bool)
    timings["sde_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rho_f = rho12(V[:, -1])[~stopped_f].astype(np.float64)
    rho_s = rho12(VT)[~stopped_s].astype(np.float64)
    ks = stats.ks_2samp(rho_f, rho_s)
    w1 = stats.wasserstein_distance(rho_f, rho_s)
    mean_rho = np.nanmean(rho12(V), axis=0)  # the mean-rho-over-layers curve of Fig. 1
    timings["stats_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - start
    return {
        "ks_rho": float(ks.statistic), "ks_pvalue_rho": float(ks.pvalue), "w1_rho": float(w1),
        "stopped_fraction": {"finite": float(stopped_f.mean()), "sde": None},
        "final_mean_rho_finite": float(mean_rho[-1]),
        "timings": timings,
        "config": {k: getattr(args, k) for k in ("m", "rho0", "width", "depth", "gamma", "tau0", "c_plus",
                                                 "c_minus", "samples", "sde_paths", "dt", "seed",
                                                 "dtype", "sde_noise")} | {"T": T, "sde_steps": steps},
        "_rho": (rho12(V[:, -1]), rho12(VT), stopped_f, stopped_s),
    }


# ------------------------------------------------------------------ timed against the JAX job

FIG1_TARGET = dict(m=3, rho0=0.2, width=200, depth=150, gamma=0.35355, tau0=1.0, c_plus=0.0,
                   c_minus=-1.0, samples=4096, sde_paths=16384, dt=0.005)
"""The fig1 target command of issue 4 (``scripts/sde_vs_finite.py`` with no width sweep: the
flag ``--sweep-widths`` given with no values)."""


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def _median_wall(cmd_of, repeats: int, timeout: float) -> tuple[list[float], dict]:
    """Wall times of ``repeats`` fresh processes ``cmd_of(i)`` (and the last one's stats)."""
    from common import run_process

    walls, last = [], {}
    for i in range(repeats):
        _, last = run_process(cmd_of(i), timeout=timeout)
        walls.append(last["wall_s"])
    return walls, last


def startup_time(repeats: int = 3) -> dict:
    """Wall time of ``scripts/sde_vs_finite.py --help`` in a fresh process (start-up and imports
    up to the first work), median of ``repeats``."""
    from common import ROOT

    walls, _ = _median_wall(lambda i: [sys.executable, str(ROOT / "scripts" / "sde_vs_finite.py"), "--help"],
                            repeats, 300)
    return {"command": "scripts/sde_vs_finite.py --help", "wall_s": float(np.median(walls)), "walls_s": walls}


def compare_at(settings: dict, tmp: Path, repeats: int, log=print) -> dict:
    """Wall time of the JAX main job and of this NumPy job at ``settings``, each the median of
    ``repeats`` fresh processes. The JAX job runs once more first, untimed, so that the timed
    runs find a warm compile cache (as a user's second run does); each timed run writes to a
    fresh ``--out``. Also each job's KS(rho) and the NumPy-vs-JAX cross-check KS statistics
    (finite vs finite, SDE vs SDE), which should be at the sampling level."""
    from common import ROOT

    def jax_cmd(i):
        return [sys.executable, str(ROOT / "scripts" / "sde_vs_finite.py"), *_flags(settings),
                "--sweep-widths", "--out", str(tmp / f"jax{i}"), "--overwrite"]

    _median_wall(lambda i: jax_cmd("warm"), 1, 1800)
    jw, pj = _median_wall(jax_cmd, repeats, 1800)
    log(f"  main job (JAX), {settings['samples']} samples + {settings['sde_paths']} paths: "
        + ", ".join(f"{w:.1f}" for w in jw) + " s")
    np_cmd = [sys.executable, str(Path(__file__).resolve()), *_flags(settings),
              "--json", str(tmp / "numpy.json"), "--npz", str(tmp / "numpy.npz")]
    nw, pn = _median_wall(lambda i: np_cmd, repeats, 3600)
    log("  main job (NumPy): " + ", ".join(f"{w:.1f}" for w in nw) + " s")
    last = tmp / f"jax{repeats - 1}"
    jm = json.loads((last / "metrics.json").read_text())
    jt = json.loads((last / "timings.json").read_text())
    nm = json.loads((tmp / "numpy.json").read_text())
    a, b = np.load(tmp / "numpy.npz"), np.load(last / "results.npz")
    cross = {}
    for side in ("finite", "sde"):
        x = a[f"rho_{side}"][~a[f"stopped_{side}"]]
        y = b[f"rho_{side}"][~b[f"stopped_{side}"]]
        r = stats.ks_2samp(x, y)
        cross[side] = {"ks": float(r.statistic), "pvalue": float(r.pvalue),
                       "ks_noise_floor": 0.8687 * math.sqrt(1 / len(x) + 1 / len(y))}
    return {
        "settings": settings,
        "repeats": repeats,
        "jax_command": " ".join(jax_cmd("N")[1:]),
        "numpy_command": " ".join(np_cmd[1:]),
        "jax": {"wall_s": float(np.median(jw)), "walls_s": jw, "max_rss_mb": pj["max_rss_mb"], "timings": jt,
                "ks_rho": jm.get("ks_rho"), "w1_rho": jm.get("w1_rho")},
        "numpy": {"wall_s": float(np.median(nw)), "walls_s": nw, "max_rss_mb": pn["max_rss_mb"],
                  "timings": nm["timings"], "ks_rho": nm["ks_rho"], "w1_rho": nm["w1_rho"],
                  "dtype": nm["config"]["dtype"], "sde_noise": nm["config"]["sde_noise"]},
        "cross_check_numpy_vs_jax": cross,
        "numpy_over_jax": float(np.median(nw)) / float(np.median(jw)),
        "numpy_over_jax_compute_only": nm["timings"]["total_s"] / jt["total_s"],
    }


def compare_with_main_job(quick: bool = False, log=print, smoke: bool = False) -> dict:
    """The main job against this NumPy job at the fig1 target and at 4x its samples and paths
    (:func:`compare_at`), and the main job's start-up time (:func:`startup_time`).

    ``quick`` halves ``samples`` and ``sde_paths`` at both sizes and times one run of each
    job (full: the median of 3); ``smoke`` uses tiny sizes (the ratios mean nothing)."""
    import tempfile

    settings = dict(FIG1_TARGET)
    if quick:
        settings["samples"] //= 2
        settings["sde_paths"] //= 2
    if smoke:  # tiny: exercises the code only
        settings.update(width=16, depth=8, samples=64, sde_paths=128, dt=0.05)
    large = dict(settings, samples=4 * settings["samples"], sde_paths=4 * settings["sde_paths"])
    repeats = 1 if quick or smoke else 3
    tmp = Path(tempfile.mkdtemp(prefix="bench_main_job_"))
    out = {"reduced": quick or smoke,
           "note": ("smoke test: tiny sizes, the ratios mean nothing" if smoke
                    else "quick mode: samples and sde_paths halved for both jobs, one timed run each" if quick
                    else "the fig1 target settings of issue 4, and 4x its samples and paths; medians of 3 runs"),
           "startup": startup_time(1 if smoke else 3)}
    log(f"  start-up (--help): {out['startup']['wall_s']:.2f} s")
    out["fig1"] = compare_at(settings, tmp / "fig1", repeats, log)
    out["x4"] = compare_at(large, tmp / "x4", repeats, log)
    out["ratios"] = {"main_job_numpy_over_jax": out["fig1"]["numpy_over_jax"],
                     "main_job_numpy_over_jax_compute_only": out["fig1"]["numpy_over_jax_compute_only"],
                     "main_job_numpy_over_jax_4x": out["x4"]["numpy_over_jax"]}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The main job (finite Gram chain + Euler SDE + KS) in NumPy.")
    p.add_argument("--m", type=int, default=3)
    p.add_argument("--rho0", type=float, default=0.2)
    p.add_argument("--width", type=int, default=200)
    p.add_argument("--depth", type=int, default=150)
    p.add_argument("--gamma", type=float, default=1 / math.sqrt(8))
    p.add_argument("--tau0", type=float, default=1.0)
    p.add_argument("--c-plus", type=float, default=0.0)
    p.add_argument("--c-minus", type=float, default=-1.0)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--sde-paths", type=int, default=16384)
    p.add_argument("--dt", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--sde-noise", choices=("generic", "structured"), default="generic")
    p.add_argument("--json", type=Path, default=None, help="write timings and metrics here")
    p.add_argument("--npz", type=Path, default=None, help="write the rho_12 samples here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = run(args)
    rho_f, rho_s, stopped_f, stopped_s = out.pop("_rho")
    t = out["timings"]
    print(f"numpy main job: KS(rho) = {out['ks_rho']:.4f} (p = {out['ks_pvalue_rho']:.3g}), "
          f"W1 = {out['w1_rho']:.4f}; finite {t['finite_s']:.1f} s, SDE {t['sde_s']:.1f} s, "
          f"total {t['total_s']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if args.npz:
        args.npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, rho_finite=rho_f, rho_sde=rho_s, stopped_finite=stopped_f, stopped_sde=stopped_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
