"""One-layer estimator of the covariance-SDE coefficients of any block (docs/sde.md §9).

For a block mapping tokens ``X`` (m x n) to ``X'`` with ``V = X X^T / n``, the covariance SDE
in time ``t = l / n`` has

    b(V)     = lim_n  n E[V_1 - V_0 | V_0 = V]
    Sigma(V) = lim_n  n Cov(V_1 - V_0 | V_0 = V)      (over the upper triangle, a <= b)

:func:`estimate_coefficients` estimates both by Monte Carlo over independent initialisations
of one layer at width ``n`` (error ``O(n^{-1/2})`` in the limit, plus the sampling error it
reports), or at several widths with an extrapolation to ``n -> infinity``. This is how the
SDE of a new block is checked (docs/general_activation_sde.md uses it for general attention
activations, multi-head attention and smooth MLPs).

Blocks (:func:`one_layer`):

- a :class:`shaped_attn.config.BlockConfig` template, or a callable ``width -> BlockConfig``
  (one required positional argument, e.g. ``functools.partial(shaped_config, gamma=0.5,
  sublayers="attention")``): run by :class:`FiniteSampler` with depth 1 (sampler
  ``"gram"`` by default: exact in distribution and O(m^2 n) per sample);
- a user callable ``layer(key, X) -> X'`` (two required positional arguments), ``X`` of shape
  ``(m, n)``; it is vmapped over the sample keys exactly like the finite Monte Carlo;
- a :class:`GramTransition` ``(key, V, width) -> V_1``: a Markov kernel on Gram matrices, e.g.
  :class:`AttentionTransition`, the exact O(H m^3) sampler of an attention-only shaped block
  (cost independent of ``n``, so widths of 10^4 and 10^6 samples are cheap).

Sampling: sample ``i`` uses ``fold_in(key, i)``, chunks of ``chunk_size`` samples are vmapped
and their sample axis is sharded over local accelerators (docs/samplers.md §6), and only
running sums of the increments' first four mixed
moments are kept (float64, on the host), so 10^6 samples need memory for one chunk only.
Every chunk has the same size (the last one is padded and trimmed), so each width compiles
once; compiled samplers are cached across calls with the same block and width.

Standard errors: for the drift, the SE of a mean, ``n sqrt(Var(dV_p) / N)``; for a
covariance entry, ``n sqrt(Var(w) / N)`` with ``w = (dV_p - mean_p)(dV_q - mean_q)`` the
centred products (delta method). Both are asymptotic (large ``N``), to be used as 1-sigma
errors in z-scores.

Extrapolation (``widths=(n_1, ..., n_k)``, k >= 2): each entry is fitted by weighted least
squares with weights ``1 / SE(n_i)^2`` to the model

    est(n) = c0 + c1 n^{-bias_exponent}          (bias_exponent = 1/2 by default)

and the result's ``drift`` / ``diffusion`` are ``c0`` with the WLS standard error of ``c0``.
``bias_exponent = 1/2`` is the generic finite-width error of the limit (e.g. the shaped ReLU,
whose slopes ``1 + c/sqrt(n)`` enter at that order); for shaped attention and for the
smooth-activation MLP the leading finite-width error is ``O(1/n)`` (the odd terms of their
expansions vanish in expectation), so ``bias_exponent = 1`` is the sharper model there. The fit's chi-square and degrees
of freedom are returned so that a wrong model can be seen (chi2 >> dof).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ._helpers.symmetric import dim_from_num_upper, num_upper, upper_indices, vec_to_sym
from ._helpers.validation import check_choice, check_int, check_psd_matrix
from ._mc.sampler import SAMPLERS
from ._mc.transitions import BlockLike, one_layer
from ._theory.coefficients import diffusion_matrix, drift
from ._theory.params import SDEParams

DEFAULT_CHUNK = 4096


# --------------------------------------------------------------------------- result


@dataclasses.dataclass(frozen=True, eq=False)
class CoefficientEstimate:
    """Estimated drift and diffusion of one block at one ``V``.

    Attributes:
      drift: ``(D,)`` estimate of ``b(V)`` over the upper triangle (row-major, the order of
        ``sym_to_vec``; docs/sde.md §1).
      drift_se: ``(D,)`` its standard errors.
      diffusion: ``(D, D)`` estimate of ``Sigma(V)`` (same order as :func:`diffusion_matrix`).
      diffusion_se: ``(D, D)`` its standard errors.
      width: ``n``, or ``inf`` for a width extrapolation.
      num_samples: Monte Carlo samples (per width for an extrapolation).
      widths: the widths of an extrapolation (``()`` otherwise).
      per_width: the :class:`CoefficientEstimate` at each of ``widths``.
      drift_slope, diffusion_slope: fitted ``c1`` of ``est(n) = c0 + c1 n^{-bias_exponent}``.
      drift_chi2, diffusion_chi2: WLS chi-square of each entry's fit (``dof`` degrees of freedom).
      dof: ``len(widths) - 2`` (0 without an extrapolation).
      bias_exponent: the exponent of the extrapolation model.
    """

    drift: np.ndarray
    drift_se: np.ndarray
    diffusion: np.ndarray
    diffusion_se: np.ndarray
    width: float
    num_samples: int
    widths: tuple = ()
    per_width: tuple = ()
    drift_slope: Optional[np.ndarray] = None
    diffusion_slope: Optional[np.ndarray] = None
    drift_chi2: Optional[np.ndarray] = None
    diffusion_chi2: Optional[np.ndarray] = None
    dof: int = 0
    bias_exponent: float = 0.5

    @property
    def m(self) -> int:
        """Number of tokens."""
        return dim_from_num_upper(self.drift.shape[-1])

    @property
    def drift_matrix(self) -> np.ndarray:
        """The drift as a symmetric ``(m, m)`` matrix."""
        return np.asarray(vec_to_sym(jnp.asarray(self.drift)))

    def z_scores(self, drift_theory, diffusion_theory) -> tuple[np.ndarray, np.ndarray]:
        """``(estimate - theory) / SE`` for the drift ``(D,)`` and diffusion ``(D, D)``.

        ``drift_theory`` may be an ``(m, m)`` matrix or its ``(D,)`` upper triangle. Entries
        with zero SE and zero error give 0 (e.g. exactly deterministic entries)."""
        b = np.asarray(drift_theory, np.float64)
        if b.ndim == 2:
            b = b[upper_indices(b.shape[-1])]
        S = np.asarray(diffusion_theory, np.float64)
        return _z(self.drift, b, self.drift_se), _z(self.diffusion, S, self.diffusion_se)

    def compare(self, V, params: SDEParams) -> tuple[np.ndarray, np.ndarray]:
        """z-scores against :func:`drift` / :func:`diffusion_matrix` at ``V``."""
        V = jnp.asarray(V, jnp.float64) if jax.config.jax_enable_x64 else jnp.asarray(V)
        return self.z_scores(np.asarray(drift(V, params)), np.asarray(diffusion_matrix(V, params)))


def _z(est, theory, se):
    err = np.asarray(est, np.float64) - theory
    se = np.asarray(se, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = err / se
    return np.where((se == 0) & (err == 0), 0.0, z)


# --------------------------------------------------------------------------- moments


class _Moments:
    """Running sums of the first four mixed moments of ``d`` (samples x D), float64.

    Shifted by the first chunk's mean (so the sums stay well conditioned); the drift SE
    is that of a mean and the covariance SE is the delta-method SE of the sample covariance
    of centred products (see the module docstring).
    """

    def __init__(self, D: int):
        self.shift = None
        self.N = 0
        self.S1 = np.zeros(D)
        self.S2 = np.zeros((D, D))
        self.S3 = np.zeros((D, D))  # S3[p, q] = sum y_p^2 y_q
        self.S4 = np.zeros((D, D))  # S4[p, q] = sum y_p^2 y_q^2

    def add(self, d: np.ndarray) -> None:
        d = np.asarray(d, np.float64)
        if self.shift is None:
            self.shift = d.mean(axis=0)
        y = d - self.shift
        y2 = y * y
        self.N += d.shape[0]
        self.S1 += y.sum(axis=0)
        self.S2 += y.T @ y
        self.S3 += y2.T @ y
        self.S4 += y2.T @ y2

    def finish(self):
        """``(mean, se_mean, cov, se_cov)`` of the increments."""
        N = self.N
        if N < 2:
            raise ValueError(f"num_samples={N} must be >= 2 for a covariance")
        A = self.S1 / N
        AA = np.outer(A, A)
        cov = (self.S2 - N * AA) / (N - 1)
        se_mean = np.sqrt(np.maximum(np.diag(cov), 0.0) / N)
        d2 = np.diag(self.S2)
        # sum_i w_i^2, w = (y_p - A_p)(y_q - A_q), expanded in the running sums.
        sum_w2 = (
            self.S4
            + (A * A)[None, :] * d2[:, None]
            + (A * A)[:, None] * d2[None, :]
            - 3.0 * N * AA * AA
            - 2.0 * A[None, :] * self.S3
            - 2.0 * A[:, None] * self.S3.T
            + 4.0 * AA * self.S2
        )
        w_mean = (self.S2 - N * AA) / N
        var_w = np.maximum(sum_w2 - N * w_mean * w_mean, 0.0) / (N - 1)
        return self.shift + A, se_mean, cov, np.sqrt(var_w / N)


def _estimate_one(block, V, width, num_samples, key, sampler, key_width, chunk_size, progress):
    check_int("width", width)
    check_int("num_samples", num_samples)
    m = V.shape[-1]
    V0, chunk = one_layer(block, V, width, sampler, key_width)
    size = min(chunk_size, num_samples)
    moments = _Moments(num_upper(m))
    rows, cols = upper_indices(m)
    starts = range(0, num_samples, size)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415  (only for interactive runs)

        starts = tqdm(starts, desc=f"estimate n={width}")
    for start in starts:
        V1 = chunk(key, start, start + size)[: num_samples - start]  # same size: one compile
        d = np.asarray(V1, np.float64)[:, rows, cols] - np.asarray(V0, np.float64)[rows, cols]
        if not np.all(np.isfinite(d)):
            raise FloatingPointError(
                f"non-finite V_1 at width {width} (samples {start}..{start + size - 1})"
            )
        moments.add(d)
    mean, se_mean, cov, se_cov = moments.finish()
    return CoefficientEstimate(
        drift=width * mean, drift_se=width * se_mean, diffusion=width * cov,
        diffusion_se=width * se_cov, width=width, num_samples=num_samples,
    )


def extrapolate(estimates: Sequence[CoefficientEstimate], bias_exponent: float = 0.5) -> CoefficientEstimate:
    """WLS fit of ``est(n) = c0 + c1 n^{-bias_exponent}`` per entry over the estimates' widths.

    Returns a :class:`CoefficientEstimate` with ``width = inf``, ``drift``/``diffusion`` the
    fitted ``c0`` and ``*_se`` its WLS standard error (from the per-width SEs, assumed
    independent); the slopes and the chi-square (``len - 2`` degrees of freedom) are kept.
    """
    if len(estimates) < 2:
        raise ValueError(f"extrapolation needs >= 2 widths, got {len(estimates)}")
    widths = tuple(e.width for e in estimates)
    if len(set(widths)) != len(widths):
        raise ValueError(f"widths={widths} must be distinct")
    x = np.asarray(widths, np.float64) ** (-float(bias_exponent))

    def fit(ys, ses):
        ys, ses = np.stack(ys), np.stack(ses)
        if np.any(ses <= 0):
            raise ValueError("an estimate has a zero standard error; cannot weight the fit")
        xs = x.reshape((-1,) + (1,) * (ys.ndim - 1))
        w = 1.0 / ses**2
        S, Sx, Sxx = w.sum(0), (w * xs).sum(0), (w * xs * xs).sum(0)
        Sy, Sxy = (w * ys).sum(0), (w * xs * ys).sum(0)
        det = S * Sxx - Sx * Sx
        c0 = (Sxx * Sy - Sx * Sxy) / det
        c1 = (S * Sxy - Sx * Sy) / det
        chi2 = (w * (ys - c0 - c1 * xs) ** 2).sum(0)
        return c0, np.sqrt(Sxx / det), c1, chi2

    b0, b_se, b1, b_chi2 = fit([e.drift for e in estimates], [e.drift_se for e in estimates])
    s0, s_se, s1, s_chi2 = fit([e.diffusion for e in estimates], [e.diffusion_se for e in estimates])
    return CoefficientEstimate(
        drift=b0, drift_se=b_se, diffusion=s0, diffusion_se=s_se, width=math.inf,
        num_samples=min(e.num_samples for e in estimates), widths=widths,
        per_width=tuple(estimates), drift_slope=b1, diffusion_slope=s1, drift_chi2=b_chi2,
        diffusion_chi2=s_chi2, dof=len(widths) - 2, bias_exponent=float(bias_exponent),
    )


def estimate_coefficients(
    block: BlockLike,
    V,
    *,
    width: Optional[int] = None,
    num_samples: Union[int, Sequence[int]],
    key: jax.Array,
    widths: Optional[Sequence[int]] = None,
    chunk_size: Optional[int] = None,
    sampler: str = "gram",
    key_width: Optional[int] = None,
    bias_exponent: float = 0.5,
    progress: bool = False,
) -> CoefficientEstimate:
    """One-layer estimates ``n E[V_1 - V_0 | V]`` and ``n Cov(V_1 - V_0 | V)`` with SEs.

    Arguments:
      block: a :class:`BlockConfig` template, a callable ``width -> BlockConfig``, or a user
        layer ``layer(key, X) -> X'`` with ``X`` of shape ``(m, n)`` (see the module docstring).
      V: ``(m, m)`` symmetric PSD Gram matrix; its dtype is the computation dtype (use
        float64 for theory comparisons).
      width: ``n`` (required unless ``widths`` is given; if both, it must be one of them).
      num_samples: Monte Carlo samples per width (an int, or one per width).
      key: the run's key; sample i at width n uses ``fold_in(key, i)`` (one width) or
        ``fold_in(fold_in(key, n), i)`` (several widths, independent across widths).
      widths: several widths: estimate at each and extrapolate to ``n -> inf`` by WLS with the
        model ``est(n) = c0 + c1 n^{-bias_exponent}`` (:func:`extrapolate`).
      chunk_size: samples per compiled call (default 4096).
      sampler: ``"gram"`` (exact, fast) or ``"weights"`` (real modules) for config blocks.
      key_width: n_k per head for config blocks (default: width for one head, width / H).
      bias_exponent: exponent of the extrapolation model (1/2 by default).
      progress: tqdm bar over chunks.

    Returns:
      :class:`CoefficientEstimate` (``width = inf`` for an extrapolation, with ``per_width``).
    """
    check_choice("sampler", sampler, SAMPLERS)
    V = check_psd_matrix("V", V)
    chunk_size = check_int("chunk_size", DEFAULT_CHUNK if chunk_size is None else chunk_size)
    if widths is None:
        if width is None:
            raise ValueError("give width (or widths for an extrapolation)")
        if not isinstance(num_samples, (int, np.integer)):
            raise ValueError(f"num_samples={num_samples!r} must be an integer for one width")
        return _estimate_one(block, V, width, int(num_samples), key, sampler, key_width,
                             chunk_size, progress)
    widths = tuple(int(w) for w in widths)
    if width is not None and width not in widths:
        raise ValueError(f"width={width} is not one of widths={widths}")
    if isinstance(num_samples, (int, np.integer)):
        counts = (int(num_samples),) * len(widths)
    else:
        counts = tuple(int(c) for c in num_samples)
        if len(counts) != len(widths):
            raise ValueError(f"num_samples={num_samples!r} needs one count per width {widths}")
    estimates = [
        _estimate_one(block, V, n, c, jax.random.fold_in(key, n), sampler, key_width, chunk_size,
                      progress)
        for n, c in zip(widths, counts)
    ]
    return extrapolate(estimates, bias_exponent)
