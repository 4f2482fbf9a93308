"""The finite-width study (docs/finite_width.md): how fast finite networks approach the SDE.

Four moments of the law at ``T`` (§4): ``E[rho_12]``, ``Var[rho_12]``, ``E[log V_11]``,
``Var[log V_11]``, each estimated from all exchangeable copies (every token pair, every
token) with its influence on the samples, so that estimates on common random numbers combine
linearly with exact errors. The SDE reference is the Richardson extrapolation of Euler solves
at steps ``h`` and ``2h`` on the same Brownian paths; a third solve at ``4h`` estimates its
remaining time-step bias (§5). The finite-minus-SDE bias is fitted to ``C n^-p`` by
generalised least squares on log axes (§6), and the part of it that the theory predicts at
order ``n^{-1/2}``, the shaped ReLU's drift factor (§2-3), is measured by re-solving the SDE
with that factor on the same paths. Everything is NumPy on finished ensembles and
deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from shaped_attn.functional import relu_slopes, shaped_relu

from .._helpers.ensemble import Ensemble
from .._theory.coefficients import correlation
from .._theory.params import SDEParams
from .analysis import alive_mask
from .config import ExperimentConfig

STATISTICS = {
    "mean_rho12": "E[rho_12]",
    "var_rho12": "Var[rho_12]",
    "mean_log_v11": "E[log V_11]",
    "var_log_v11": "Var[log V_11]",
}
"""Metric key -> the moment of the law at T it estimates."""

STEP_MULTIPLES = (1, 2, 4)
"""The study's SDE steps in units of the finest, ``h = T / convergence_steps``."""

# Weights of the solves at h, 2h, 4h (Euler: E_h = E_0 + a h + b h^2 + ...; docs/finite_width.md §5).
REFERENCE = (2.0, -1.0, 0.0)
"""Richardson: ``2 E_h - E_2h = E_0 - 2 b h^2``."""
REMAINING = (-2 / 3, 1.0, -1 / 3)
"""The reference minus the quadratic extrapolation ``(8 E_h - 6 E_2h + E_4h) / 3``: the
estimated remaining time-step bias of the reference."""
EULER_BIAS = (-1.0, 1.0, 0.0)
"""``E_h - reference = E_2h - E_h``: the Euler bias of the finest solve that the
extrapolation removes."""

RESOLVED_SE = 2.0
"""A width's bias enters the rate fit if it exceeds this many standard errors (and every
smaller width's does too)."""


# ------------------------------------------------------------------------------- estimates


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A statistic of ``N`` Monte Carlo samples with its influence on them: to first order
    ``value - truth = mean(influence)``, so ``se = sqrt(sum(influence^2)) / N`` and estimates
    on the same samples (common random numbers) add and subtract with exact errors
    (docs/finite_width.md §4)."""

    value: float
    influence: np.ndarray

    @property
    def se(self) -> float:
        return float(math.sqrt(np.sum(self.influence**2)) / self.influence.size)

    def __add__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.value + other.value, self.influence + other.influence)

    def __sub__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.value - other.value, self.influence - other.influence)

    def __rmul__(self, c: float) -> "Estimate":
        return Estimate(c * self.value, c * self.influence)

    def padded(self, size: int) -> "Estimate":
        """The same estimate on the first of ``size`` samples (its influence scaled by
        ``size / N`` and zero on the others), to combine with estimates on all of them."""
        n = self.influence.size
        return Estimate(self.value, np.concatenate([self.influence * (size / n), np.zeros(size - n)]))


def covariance(a: Estimate, b: Estimate) -> float:
    """Covariance of two estimates on the same samples."""
    return float(np.dot(a.influence, b.influence) / a.influence.size**2)


def combine(weights: Sequence[float], estimates: Sequence[Optional[Estimate]]) -> Optional[Estimate]:
    """``sum_k w_k E_k`` of estimates on the same samples (None if any is None)."""
    if any(e is None for e in estimates):
        return None
    total = 0.0 * estimates[0]
    for w, e in zip(weights, estimates):
        total = total + w * e
    return total


def moments(x: np.ndarray, keep: np.ndarray) -> tuple[Optional[Estimate], Optional[Estimate]]:
    """Mean and variance of one of the exchangeable columns of ``x (S, k)`` (for ``k = 1``
    the usual unbiased estimators), over the samples where ``keep``; (None, None) if fewer
    than two are kept.

    With per-sample means ``xbar_i`` and ``q_i = mean_j (x_ij - mu)^2``: ``mu = mean(xbar)``,
    ``var = mean(q) + s^2(xbar) / S'`` (``S'`` kept samples; the second term removes the bias
    from estimating ``mu``); influences ``(xbar_i - mu) S / S'`` and ``(q_i - mean(q)) S / S'``
    on kept samples, 0 on the others (docs/finite_width.md §4)."""
    keep = np.asarray(keep, bool)
    kept = int(keep.sum())
    if kept < 2:
        return None, None
    xk = np.asarray(x, np.float64)[keep]
    xbar = xk.mean(axis=1)
    mu = float(xbar.mean())
    q = ((xk - mu) ** 2).mean(axis=1)
    q_mean = float(q.mean())
    scale = x.shape[0] / kept
    infl_mean, infl_var = np.zeros(x.shape[0]), np.zeros(x.shape[0])
    infl_mean[keep], infl_var[keep] = (xbar - mu) * scale, (q - q_mean) * scale
    var = q_mean + float(xbar.var(ddof=1)) / kept
    return Estimate(mu, infl_mean), Estimate(var, infl_var)


def statistics(ens: Ensemble, count: Optional[int] = None) -> dict[str, Optional[Estimate]]:
    """The four moments of the last state of ``ens`` (its first ``count`` samples), over the
    samples alive there (docs/stopping.md §5), from every pair ``a < b`` (``rho_ab``) and every
    token (``log V_aa``): the tokens are exchangeable (docs/finite_width.md §4)."""
    count = ens.num_samples if count is None else count
    V = np.asarray(ens.V[:count, -1], np.float64)
    keep = alive_mask(Ensemble(ens.t[-1:], ens.V[:count, -1:], ens.stopped[:count], ens.stop_time[:count]))[:, 0]
    a, b = np.triu_indices(V.shape[-1], 1)
    diag = np.diagonal(V, axis1=-2, axis2=-1)
    log_v = np.log(np.where(keep[:, None], diag, 1.0))
    out = {}
    for name, x in (("rho12", correlation(V)[:, a, b]), ("log_v11", log_v)):
        out[f"mean_{name}"], out[f"var_{name}"] = moments(x, keep)
    return out


# ------------------------------------------------------------------------------- the ReLU factor


def relu_drift_factor(cfg: ExperimentConfig, width: int) -> float:
    """``c_n``: the shaped ReLU's normalisation ``c = 2 / (s_+^2 + s_-^2)`` at width ``n``
    (read off :func:`shaped_attn.functional.shaped_relu`). One layer of the finite network
    has exactly ``c_n`` times the SDE's ReLU drift, ``c_n = 1 - (c_+ + c_-) / sqrt(n) + O(1/n)``
    (docs/finite_width.md §3)."""
    s_plus, s_minus = relu_slopes(width, cfg.c_plus, cfg.c_minus)
    x, s = (1.0, s_plus) if s_plus else (-1.0, s_minus)
    return (float(shaped_relu(x, s_plus, s_minus)) / (x * s)) ** 2


def slope_width(cfg: ExperimentConfig) -> Optional[int]:
    """The width whose ReLU drift factor the SDE is re-solved with (the smallest, where the
    factor is largest), or None where there is no such term to measure: no shaped-ReLU MLP,
    ``convergence_slope_paths = 0``, or a factor of 1."""
    if cfg.block == "attention" or not cfg.convergence_slope_paths or not cfg.convergence_widths:
        return None
    width = min(cfg.convergence_widths)
    return None if relu_drift_factor(cfg, width) == 1.0 else width


def relu_scaled_params(params: SDEParams, factor: float) -> SDEParams:
    """``params`` with the ReLU drift multiplied by ``factor``: ``b_relu`` is proportional to
    ``(c_+ - c_-)^2`` and the diffusion does not depend on ``c_pm`` (docs/sde.md §3), so
    ``c_-`` moves to ``c_+ - (c_+ - c_-) sqrt(factor)``."""
    c_minus = params.c_plus - (params.c_plus - params.c_minus) * math.sqrt(factor)
    return dataclasses.replace(params, c_minus=c_minus)


# ------------------------------------------------------------------------------- the rate fit


def fit_rate(widths: Sequence[int], bias: Sequence[float], cov: np.ndarray) -> dict:
    """``|bias(n)| = C n^-p`` by generalised least squares on ``log |bias|`` (docs/finite_width.md §6).

    Fitted over the widths whose bias exceeds :data:`RESOLVED_SE` standard errors, from the
    smallest up to the first that does not (``resolved_widths``; ``fit_widths`` when a rate is
    fitted). ``cov``: the biases' covariance (the shared SDE reference correlates them); on log
    axes ``cov_ij / (b_i b_j)``. The standard error of ``p`` is scaled by ``sqrt(chi2 / dof)``
    where that exceeds 1. No rate (``rate`` None and the reason in ``no_rate``) with fewer than
    two such widths or when their biases change sign.
    """
    bias, cov = np.asarray(bias, np.float64), np.asarray(cov, np.float64)
    se = np.sqrt(np.diag(cov))
    k = 0
    while k < len(bias) and abs(bias[k]) > RESOLVED_SE * se[k]:
        k += 1
    out = {"resolved_widths": [int(w) for w in widths[:k]], "fit_widths": [], "rate": None, "rate_se": None,
           "prefactor": None, "chi2": None, "dof": None, "no_rate": None}
    if k < 2:
        out["no_rate"] = (f"fewer than two widths, from the smallest on, with |bias| above "
                          f"{RESOLVED_SE:g} standard errors")
        return out
    b = bias[:k]
    if np.any(np.sign(b) != np.sign(b[0])):
        out["no_rate"] = "the resolved biases change sign: no single power law"
        return out
    x = np.log(np.asarray(widths[:k], np.float64))
    design = np.stack([np.ones(k), -x], axis=1)  # log|b| = log C - p log n
    inv = np.linalg.inv(cov[:k, :k] / np.outer(b, b))
    normal = design.T @ inv @ design
    coef = np.linalg.solve(normal, design.T @ inv @ np.log(np.abs(b)))
    resid = np.log(np.abs(b)) - design @ coef
    chi2, dof = float(resid @ inv @ resid), k - 2
    scale = max(1.0, chi2 / dof) if dof else 1.0
    out |= {"fit_widths": out["resolved_widths"], "rate": float(coef[1]),
            "rate_se": float(math.sqrt(np.linalg.inv(normal)[1, 1] * scale)),
            "prefactor": float(math.exp(coef[0])), "chi2": chi2, "dof": dof}
    return out


# ------------------------------------------------------------------------------- the study


def _bias_rows(finite: list, sde: list) -> tuple[list, list, np.ndarray]:
    """Biases ``F_i - S_i`` of independent finite estimates against SDE estimates on shared
    paths: values, standard errors and covariance (None rows where either side is None)."""
    rows = [i for i, (f, s) in enumerate(zip(finite, sde)) if f is not None and s is not None]
    values = [None] * len(finite)
    ses = [None] * len(finite)
    cov = np.zeros((len(rows), len(rows)))
    for a, i in enumerate(rows):
        values[i] = finite[i].value - sde[i].value
        for c, j in enumerate(rows):
            cov[a, c] = covariance(sde[i], sde[j]) + (finite[i].se ** 2 if i == j else 0.0)
        ses[i] = math.sqrt(cov[a, a])
    return values, ses, cov


def _fit(widths: list, values: list, cov: np.ndarray) -> dict:
    """:func:`fit_rate` over the widths that have a bias."""
    rows = [i for i, v in enumerate(values) if v is not None]
    return fit_rate([widths[i] for i in rows], [values[i] for i in rows], cov)


def _value(e: Optional[Estimate]) -> tuple[Optional[float], Optional[float]]:
    return (None, None) if e is None else (e.value, e.se)


def _statistic(widths: list, finite: list, levels: list, response: Optional[Estimate],
               factors: Optional[list], paths: int) -> dict:
    """One statistic's row: finite values, the extrapolated SDE reference and its time-step
    biases, the biases and their rate, and with a ReLU ``response`` the ``n^{-1/2}`` term
    and the rate of what remains (docs/finite_width.md §5-6)."""
    ref = combine(REFERENCE, levels)
    remaining = combine(REMAINING, levels)
    row = {"finite": [_value(f)[0] for f in finite], "finite_se": [_value(f)[1] for f in finite]}
    row["sde"], row["sde_se"] = _value(ref)
    row["sde_dt_bias"], row["sde_dt_bias_se"] = _value(remaining)
    row["sde_euler_bias"], row["sde_euler_bias_se"] = _value(combine(EULER_BIAS, levels))
    bias, bias_se, cov = _bias_rows(finite, [ref] * len(widths))
    row |= {"bias": bias, "bias_se": bias_se, **_fit(widths, bias, cov)}
    fitted = [abs(bias[widths.index(w)]) for w in row["fit_widths"]]
    row["dt_bias_over_fitted"] = abs(remaining.value) / min(fitted) if fitted else None
    if factors is not None and response is not None:
        row["relu_response"], row["relu_response_se"] = _value(response)
        terms = [(c - 1) * response.padded(paths) for c in factors]
        row["relu_slope_term"] = [t.value for t in terms]
        row["relu_slope_term_se"] = [t.se for t in terms]
        rest, rest_se, rest_cov = _bias_rows(finite, [None if ref is None else ref + t for t in terms])
        row["without_slope_term"] = {"bias": rest, "bias_se": rest_se, **_fit(widths, rest, rest_cov)}
    return row


def width_convergence(cfg: ExperimentConfig, out: dict) -> dict:
    """``metrics["width_convergence"]`` from the finished units ``out`` (docs/finite_width.md §7)."""
    plan = cfg.convergence_plan()
    widths = [w for w, _, _ in plan]
    steps = [cfg.convergence_steps // k for k in STEP_MULTIPLES]
    levels = [out[("conv_sde", s, 0)] for s in steps]
    level_stats = [statistics(ens) for ens in levels]
    finite_ens = [out[("conv_finite", w, d, s)] for w, d, s in plan]
    finite = [statistics(ens) for ens in finite_ens]
    w0 = slope_width(cfg)
    factors = None if w0 is None else [relu_drift_factor(cfg, w) for w in widths]
    if w0 is not None:  # linear response: the ReLU factor's effect per unit of (factor - 1)
        base = statistics(levels[0], cfg.convergence_slope_paths)
        scaled = statistics(out[("conv_sde", steps[0], w0)])
        per_unit = 1 / (relu_drift_factor(cfg, w0) - 1)
    metrics = {
        "widths": widths, "depths": [d for _, d, _ in plan], "samples_per_width": [s for _, _, s in plan],
        "T": cfg.T, "sde_paths": cfg.convergence_paths, "sde_steps": steps, "sde_dt": [cfg.T / s for s in steps],
        "slope_paths": 0 if w0 is None else cfg.convergence_slope_paths, "relu_drift_factor": factors,
        "stopped_fraction": {"finite": [e.stopped_fraction for e in finite_ens],
                             "sde": [e.stopped_fraction for e in levels]},
        "resolved_se": RESOLVED_SE, "statistics": {},
    }
    for name in STATISTICS:
        response = None if w0 is None else combine((per_unit, -per_unit), (scaled[name], base[name]))
        metrics["statistics"][name] = _statistic(widths, [f[name] for f in finite], [s[name] for s in level_stats],
                                                 response, factors, cfg.convergence_paths)
    return metrics
