"""Agreement statistics between finite-network samples and SDE paths (docs/experiments.md §2-3).

The paper shows only pictures; we quantify agreement with the two-sample Kolmogorov-Smirnov
statistic and Wasserstein-1 distance (scipy.stats), quantiles with bootstrap standard errors,
moment differences with standard errors from both Monte Carlo sides, and per-layer means with
standard-error bands. Stopped samples are excluded from every statistic and counted
separately, so no statistic ever sees NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

QUANTILE_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)


def _finite_1d(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"{name} is empty: every sample was stopped or none was drawn")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds {np.sum(~np.isfinite(x))} non-finite values")
    return x


def quantiles_with_se(
    x, levels=QUANTILE_LEVELS, *, num_bootstrap: int = 200, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Sample quantiles at ``levels`` and their bootstrap standard errors."""
    x = _finite_1d("x", x)
    q = np.quantile(x, levels)
    rng = np.random.default_rng(seed)
    boot = np.quantile(rng.choice(x, size=(num_bootstrap, x.size), replace=True), levels, axis=1)
    return q, boot.std(axis=1, ddof=1)


@dataclass(frozen=True)
class SampleComparison:
    """Two-sample agreement of one scalar (e.g. rho_12 at the last layer)."""

    ks: float
    ks_pvalue: float
    w1: float
    quantiles_finite: np.ndarray
    quantiles_sde: np.ndarray
    quantile_se_finite: np.ndarray
    quantile_se_sde: np.ndarray
    n_finite: int
    n_sde: int

    @property
    def quantile_z(self) -> np.ndarray:
        """Quantile differences in units of their combined bootstrap standard error."""
        se = np.hypot(self.quantile_se_finite, self.quantile_se_sde)
        return (self.quantiles_finite - self.quantiles_sde) / np.where(se > 0, se, np.inf)


def compare_samples(finite, sde, *, num_bootstrap: int = 200, seed: int = 0) -> SampleComparison:
    """KS statistic and p-value, Wasserstein-1, and quantiles with bootstrap errors."""
    a, b = _finite_1d("finite", finite), _finite_1d("sde", sde)
    from scipy import stats  # noqa: PLC0415  (scipy only where statistics are computed)

    ks = stats.ks_2samp(a, b)
    qa, sa = quantiles_with_se(a, num_bootstrap=num_bootstrap, seed=seed)
    qb, sb = quantiles_with_se(b, num_bootstrap=num_bootstrap, seed=seed + 1)
    return SampleComparison(
        ks=float(ks.statistic),
        ks_pvalue=float(ks.pvalue),
        w1=float(stats.wasserstein_distance(a, b)),
        quantiles_finite=qa,
        quantiles_sde=qb,
        quantile_se_finite=sa,
        quantile_se_sde=sb,
        n_finite=a.size,
        n_sde=b.size,
    )


@dataclass(frozen=True)
class Band:
    """Per-layer mean with its standard error, the median and the 5-95 % spread."""

    mean: np.ndarray
    se: np.ndarray
    median: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def band(values, keep=None) -> Band:
    """Band over the sample axis of ``values`` ``(S, K)`` using only the entries where ``keep``:
    ``(S,)`` selects samples, ``(S, K)`` selects samples per column (e.g. alive at that layer).
    Every column needs at least one kept entry, and kept entries must be finite."""
    v = np.asarray(values, dtype=np.float64)
    keep = np.ones(v.shape, bool) if keep is None else np.asarray(keep, dtype=bool)
    if keep.ndim == 1:
        keep = np.broadcast_to(keep[:, None], v.shape)
    count = keep.sum(axis=0)
    if np.any(count == 0):
        raise ValueError("a column of values has no kept entry: every sample was stopped there")
    if not np.all(np.isfinite(v[keep])):
        raise ValueError("values holds non-finite entries; exclude stopped samples first")
    v = np.where(keep, v, np.nan)
    mean = np.nansum(v, axis=0) / count
    var = np.nansum((v - mean) ** 2, axis=0) / np.maximum(count - 1, 1)
    se = np.where(count > 1, np.sqrt(var / count), 0.0)
    lo, median, hi = np.nanquantile(v, [0.05, 0.5, 0.95], axis=0)
    return Band(mean=mean, se=se, median=median, lo=lo, hi=hi)


def ks_floor(n1: int, n2: int) -> float:
    """Mean two-sample KS statistic of two samples of one law, ``0.8687 sqrt(1/n1 + 1/n2)``
    (asymptotic; docs/experiments.md §2): distances near it are sampling noise."""
    return 0.8687 * math.sqrt(1 / n1 + 1 / n2)


@dataclass(frozen=True)
class MomentDifference:
    """``a - b`` of one moment of two independent samples, with its standard error."""

    diff: float
    se: float

    @property
    def z(self) -> float:
        """The difference in standard errors (0 for an exact zero difference)."""
        return 0.0 if self.diff == 0 else self.diff / self.se if self.se > 0 else math.copysign(math.inf, self.diff)


def _mean_var_se(x: np.ndarray) -> tuple[float, float, float, float]:
    n = x.size
    mean, var = x.mean(), x.var(ddof=1)
    m4 = np.mean((x - mean) ** 4)
    return float(mean), math.sqrt(var / n), float(var), math.sqrt(max(m4 - var * var, 0.0) / n)


def compare_moments(a, b) -> dict[str, MomentDifference]:
    """Differences of the mean and of the variance of two independent samples ``a``, ``b``
    (e.g. finite networks and SDE paths), each with the standard error from both sides:
    ``SE(mean) = sqrt(var / n)``, ``SE(var) = sqrt((m4 - var^2) / n)`` (docs/experiments.md §3)."""
    ma, sa, va, sva = _mean_var_se(_finite_1d("a", a))
    mb, sb, vb, svb = _mean_var_se(_finite_1d("b", b))
    return {"mean": MomentDifference(ma - mb, math.hypot(sa, sb)),
            "var": MomentDifference(va - vb, math.hypot(sva, svb))}


def fit_power_law(x, y) -> tuple[float, float]:
    """Least-squares fit ``y = C x^p`` on log-log axes; returns ``(p, C)``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("fit_power_law needs at least two points with x > 0 and y > 0")
    p, log_c = np.polyfit(np.log(x), np.log(y), 1)
    return float(p), float(np.exp(log_c))
