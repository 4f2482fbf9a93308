"""The analysis of an experiment's ensembles: agreement of rho_12 at the last layer,
per-layer curves over the samples alive there, gamma sweeps, eigenvalue exit times and the
width sweep (docs/experiments.md §2, docs/stopping.md §4-5). Everything is NumPy on finished
ensembles and deterministic: the same ensembles give the same metrics."""

from __future__ import annotations

import math

import numpy as np

from .._compare import band, compare_samples, fit_power_law, ks_floor, QUANTILE_LEVELS
from .._helpers.ensemble import Ensemble
from .._theory.coefficients import correlation
from .config import ExperimentConfig

EIG_BOUNDS = (1e-4, 1e4)
"""Paper Fig. 5: a sample exits when an eigenvalue of ``V`` leaves this range."""

MIN_CURVE_SAMPLES = 10
"""Per-layer curves end where fewer samples are still alive."""

RESOLVED_OVER_FLOOR = 2.0
"""A width's KS distance counts as a measured bias above this multiple of its sampling floor."""


def rho12(V: np.ndarray) -> np.ndarray:
    """Correlation of tokens 1 and 2, ``V_12 / sqrt(V_11 V_22)``, over leading axes."""
    return correlation(np.asarray(V))[..., 0, 1]


def alive_mask(ens: Ensemble) -> np.ndarray:
    """``(S, K)``: sample s is alive at save k if it has not stopped by then (blow-up, loss of
    PSD) and every variance is still a normal float (not collapsed to 0 or underflowed)."""
    tiny = np.finfo(ens.V.dtype).tiny
    variances = np.diagonal(ens.V, axis1=-2, axis2=-1)
    return (ens.t[None, :] < ens.stop_time[:, None]) & np.all(variances > tiny, axis=-1)


def eigen_exit_time(ens: Ensemble) -> np.ndarray:
    """Per sample, the first time an eigenvalue of ``V`` leaves :data:`EIG_BOUNDS`, or the time
    the sample was stopped if earlier (blow-up, loss of PSD, non-finite: all outside the bounds);
    ``inf`` if neither happened by T."""
    eig = np.linalg.eigvalsh(ens.V.astype(np.float64))
    out = (eig.min(-1) < EIG_BOUNDS[0]) | (eig.max(-1) > EIG_BOUNDS[1])
    first = np.where(out.any(1), ens.t[out.argmax(1)], np.inf)
    return np.minimum(first, ens.stop_time)


def exit_summary(exit_t: np.ndarray, width: int) -> dict:
    """Fraction of samples whose eigenvalues left the bounds by T and the quartiles of the exit
    depth ``t n`` (``None`` where fewer samples than the quartile's level exited)."""
    q = np.quantile(exit_t, (0.25, 0.5, 0.75), method="inverted_cdf") * width  # no inf - inf
    return {"fraction": float(np.isfinite(exit_t).mean()),
            "depth_quartiles": [float(x) if math.isfinite(x) else None for x in q]}


_NO_COMPARISON = ("ks_rho", "ks_pvalue_rho", "w1_rho", "quantiles_rho", "quantile_se_rho", "quantile_z_rho")


def comparison_metrics(fin: Ensemble, sde: Ensemble) -> dict:
    """Agreement of rho_12 at the last layer over the samples that did not stop.

    When every sample of one side stopped there is nothing to compare: the statistics are
    ``None`` (JSON null), never NaN, and the stopped counts say why.
    """
    out = {
        "stopped_fraction": {"finite": fin.stopped_fraction, "sde": sde.stopped_fraction},
        "stopped_count": {"finite": int(fin.stopped.sum()), "sde": int(sde.stopped.sum())},
        "quantile_levels": list(QUANTILE_LEVELS),
    }
    keep_f, keep_s = ~fin.stopped, ~sde.stopped
    if not (keep_f.any() and keep_s.any()):
        return out | dict.fromkeys(_NO_COMPARISON)
    c = compare_samples(rho12(fin.V[keep_f, -1]), rho12(sde.V[keep_s, -1]))
    return out | {
        "ks_rho": c.ks, "ks_pvalue_rho": c.ks_pvalue, "w1_rho": c.w1,
        "quantiles_rho": {"finite": c.quantiles_finite, "sde": c.quantiles_sde},
        "quantile_se_rho": {"finite": c.quantile_se_finite, "sde": c.quantile_se_sde},
        "quantile_z_rho": c.quantile_z,
    }


def _curves(cfg: ExperimentConfig, out: dict, head_sde: Ensemble) -> tuple[dict, dict]:
    """Per-layer mean rho and median |V| of the variants at the headline size and of the SDE."""
    runs = {u[1]: ens for u, ens in out.items()
            if u[0] == "finite" and u[2:] == (cfg.gamma, cfg.width, cfg.depth, cfg.tau0)}
    runs["sde"] = head_sde
    metrics, arrays = {}, {}
    for name, ens in runs.items():
        alive = alive_mask(ens)
        counts = alive.sum(axis=0)
        short = np.flatnonzero(counts < min(MIN_CURVE_SAMPLES, alive.shape[0]))
        end = int(short[0]) if short.size else counts.size
        info = {"stopped_fraction": float((~alive[:, -1]).mean()), "curve_end_t": None}
        metrics[name] = info
        if end < 2:
            continue
        rho = band(rho12(ens.V[:, :end]), alive[:, :end])
        absv = band(np.abs(ens.V[:, :end]).mean(axis=(-2, -1)), alive[:, :end])
        info["curve_end_t"] = float(ens.t[end - 1])
        if end == alive.shape[1]:
            info |= {"final_mean_rho": rho.mean[-1], "final_median_abs_V": absv.median[-1]}
        arrays |= {f"curve_{name}_t": ens.t[:end], f"curve_{name}_rho_mean": rho.mean,
                   f"curve_{name}_rho_se": rho.se, f"curve_{name}_rho_lo": rho.lo,
                   f"curve_{name}_rho_hi": rho.hi, f"curve_{name}_absV_median": absv.median,
                   f"curve_{name}_absV_lo": absv.lo, f"curve_{name}_absV_hi": absv.hi}
    return metrics, arrays


def _gamma_sweep(cfg: ExperimentConfig, out: dict) -> tuple[list, list, dict]:
    """Paper Fig. 3 (densities and 95th percentiles of |rho| over gamma) and Fig. 5 (exit
    times over gamma x tau0)."""
    rows, arrays, tau = [], {}, cfg.tau0
    for g in cfg.gammas:
        f, s = out[("finite", "shaped", g, cfg.width, cfg.depth, tau)], out[("sde", g, cfg.T, tau)]
        row = {"gamma": g, **comparison_metrics(f, s)}
        if row["ks_rho"] is not None:
            rho_f, rho_s = rho12(f.V[~f.stopped, -1]), rho12(s.V[~s.stopped, -1])
            row["p95_abs_rho"] = {"finite": float(np.quantile(np.abs(rho_f), 0.95)),
                                  "sde": float(np.quantile(np.abs(rho_s), 0.95))}
            arrays[f"rho_finite_g{g:.6g}"], arrays[f"rho_sde_g{g:.6g}"] = rho_f, rho_s
        rows.append(row)
    stability = [
        {"gamma": g, "tau0": t,
         "input_score_std": float(np.diag(cfg.V0).max()) / (t * math.sqrt(cfg.width)),
         **{src: exit_summary(eigen_exit_time(out[unit]), cfg.width) for src, unit in
            (("finite", ("finite", "shaped", g, cfg.width, cfg.depth, t)), ("sde", ("sde", g, cfg.T, t)))}}
        for t in cfg.stability_tau0s for g in cfg.gammas
    ]
    return rows, stability, arrays


def _width_sweep(cfg: ExperimentConfig, out: dict, head_sde: Ensemble) -> dict:
    """KS and W1 of rho_12 at T against the width; a rate only over widths above the floor."""
    rows = []
    for w in cfg.sweep_widths:
        d = max(1, round(cfg.T * w))
        c = comparison_metrics(out[("finite", "shaped", cfg.gamma, w, d, cfg.tau0)], head_sde)
        if c["ks_rho"] is not None:
            rows.append({"width": w, "depth": d, "T": d / w, "ks_rho": c["ks_rho"], "w1_rho": c["w1_rho"],
                         "stopped_fraction": c["stopped_fraction"]["finite"]})
    floor = ks_floor(cfg.samples, cfg.sde_paths)
    resolved = [r for r in rows if r["ks_rho"] > RESOLVED_OVER_FLOOR * floor]
    sweep = {"rows": rows, "ks_noise_floor": floor, "resolved_widths": [r["width"] for r in resolved],
             "ks_rate": None, "w1_rate": None}
    if len(resolved) >= 2:  # a rate fitted to sampling noise would mean nothing
        widths = np.array([r["width"] for r in resolved], float)
        sweep["ks_rate"], _ = fit_power_law(widths, np.array([r["ks_rho"] for r in resolved]))
        sweep["w1_rate"], _ = fit_power_law(widths, np.array([r["w1_rho"] for r in resolved]))
    return sweep


def analyse(cfg: ExperimentConfig, out: dict) -> tuple[dict, dict]:
    """``(metrics, arrays)`` from the finished units ``out`` (unit -> :class:`Ensemble`)."""
    head_f = out[("finite", "shaped", cfg.gamma, cfg.width, cfg.depth, cfg.tau0)]
    head_s = out[("sde", cfg.gamma, cfg.T, cfg.tau0)]
    metrics = {"width": cfg.width, "depth": cfg.depth, "T": cfg.T, "num_samples": cfg.samples,
               "sde_paths": cfg.sde_paths, "dt": cfg.sde_grid(cfg.T)[0], "m": cfg.m,
               **comparison_metrics(head_f, head_s)}
    arrays = {"rho_finite": rho12(head_f.V[:, -1]), "rho_sde": rho12(head_s.V[:, -1]),
              "stopped_finite": head_f.stopped, "stopped_sde": head_s.stopped}
    metrics["curves"], curve_arrays = _curves(cfg, out, head_s)
    arrays |= curve_arrays
    if cfg.gammas:
        metrics["gamma_sweep"], metrics["stability"], sweep_arrays = _gamma_sweep(cfg, out)
        arrays |= sweep_arrays
    if cfg.sweep_widths:
        metrics["width_sweep"] = _width_sweep(cfg, out, head_s)
    return metrics, arrays
