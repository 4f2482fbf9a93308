"""Parameters of the covariance SDE (Noci et al., arXiv 2306.17759; Li et al., arXiv 2206.02768).

:class:`SDEParams` is a frozen, validated, hashable dataclass, so it can be a static argument of
``jax.jit``. It also owns the *block coefficients*: which multiple of each building block
(``b_att``, ``b_relu``, ``Sigma_lin``, ``Acal``) a residual block contributes. Those four numbers
are the only place where the block structure enters; :mod:`sde.coefficients` and
:mod:`sde.noise` read them from here (one source of truth, spec/sde.md section 2):

=============  ======================  ==================  ===========================  ============================
block          attention drift coeff   ReLU drift coeff    ``Sigma_lin`` coeff ``k_lin``  ``Acal`` coeff
=============  ======================  ==================  ===========================  ============================
"attention"    gamma^2 / tau0^2        0                   gamma^2 (2 - gamma^2)        gamma^4 / (tau0^2 H)
"mlp"          0                       gamma^2             2 gamma^2                    0
"transformer"  gamma^2 / tau0^2        gamma^2             gamma^2 (4 - gamma^2)        gamma^4 / (tau0^2 H)
=============  ======================  ==================  ===========================  ============================

``tau0 = inf`` (zero-initialised queries) gives 0 for both attention coefficients.

Multi-head attention (``heads = H > 1``) is **not in the paper**. We use the leading-order
heuristic of spec/sde.md section 2 for H iid heads summed with weight ``gamma / sqrt(H)``: the
drift and the ``Sigma_lin`` coefficient are unchanged and the ``Acal`` coefficient is divided
by ``H``. This is unverified; the one-layer moment estimator (spec section 5) is the tool to
check it, and the usual concatenate-then-``W_O`` layout may change the ``Sigma_lin`` coefficient.
"""

from __future__ import annotations

import dataclasses
import math
import numbers


@dataclasses.dataclass(frozen=True)
class AttentionConstants:
    """Weights of the terms of the attention coefficients; all 1 for softmax.

    The attention drift bracket is
    ``trace_weight * V tr(V F) / m^2 + outer_weight * (diag(V) (V g)^T + (V g) diag(V)^T) / (2m)``
    and the ``Acal`` term of the diffusion is multiplied by ``acal_weight``. For softmax
    (Noci et al., Appendix C.2) all three are 1. This is the plug-in point for other attention
    activations (a later issue expresses these weights through ``a1 = f'(0)/f(0)`` and
    ``a2 = f''(0)/f(0)``); nothing but :data:`SOFTMAX` is implemented or verified here.
    """

    trace_weight: float = 1.0
    outer_weight: float = 1.0
    acal_weight: float = 1.0


SOFTMAX = AttentionConstants()
"""Attention constants of the shaped softmax (Noci et al., Appendix C.2)."""


BLOCKS = ("attention", "mlp", "transformer")
"""Residual blocks whose covariance SDE is implemented."""


def _check_finite_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} must be a real number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    return value


@dataclasses.dataclass(frozen=True)
class SDEParams:
    """Parameters of the covariance SDE of one residual block (spec/sde.md section 2).

    Arguments:
      gamma: residual branch gain, in (0, 1]; the skip gain is ``lam = sqrt(1 - gamma^2)``.
      tau0: attention temperature constant, > 0; ``float('inf')`` means no attention drift and
        no ``Acal`` diffusion (zero-initialised queries).
      c_plus: shaped-ReLU slope constant for x > 0 (``s_plus = 1 + c_plus / sqrt(n)``).
      c_minus: shaped-ReLU slope constant for x < 0.
      block: one of ``"attention"``, ``"mlp"``, ``"transformer"`` (attention + MLP per layer).
      heads: number of attention heads H >= 1. H > 1 divides the ``Acal`` term by H, an
        unverified leading-order heuristic (see the module docstring).

    Raises:
      ValueError: naming the parameter, its value and the allowed range.

    A later issue adds ``activation: str = "softmax"`` (generalised attention coefficients);
    the attention coefficients are already factored through
    :class:`AttentionConstants` (``SDEParams.attention_constants``) for that purpose.
    """

    gamma: float
    tau0: float = 1.0
    c_plus: float = 0.0
    c_minus: float = -1.0
    block: str = "transformer"
    heads: int = 1

    def __post_init__(self):
        gamma = _check_finite_real("gamma", self.gamma)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma!r} is outside (0, 1]")
        if isinstance(self.tau0, bool) or not isinstance(self.tau0, numbers.Real):
            raise ValueError(f"tau0={self.tau0!r} must be a real number in (0, inf]")
        tau0 = float(self.tau0)
        if math.isnan(tau0) or not tau0 > 0.0:
            raise ValueError(f"tau0={self.tau0!r} is outside (0, inf]")
        c_plus = _check_finite_real("c_plus", self.c_plus)
        c_minus = _check_finite_real("c_minus", self.c_minus)
        if self.block not in BLOCKS:
            raise ValueError(f"block={self.block!r} is not one of {BLOCKS}")
        if (
            isinstance(self.heads, bool)
            or not isinstance(self.heads, numbers.Integral)
            or self.heads < 1
        ):
            raise ValueError(f"heads={self.heads!r} must be an integer >= 1")
        # Normalise to Python floats / ints so that equal parameters hash equally.
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "tau0", tau0)
        object.__setattr__(self, "c_plus", c_plus)
        object.__setattr__(self, "c_minus", c_minus)
        object.__setattr__(self, "heads", int(self.heads))

    # ----------------------------------------------------------------- block coefficients

    @property
    def has_attention(self) -> bool:
        """True if the block contains an attention sub-block."""
        return self.block in ("attention", "transformer")

    @property
    def has_mlp(self) -> bool:
        """True if the block contains a shaped-ReLU MLP sub-block."""
        return self.block in ("mlp", "transformer")

    @property
    def attention_constants(self) -> AttentionConstants:
        """Weights of the attention coefficient terms (softmax: all 1; see AttentionConstants)."""
        return SOFTMAX

    @property
    def attention_scale(self) -> float:
        """``gamma^2 / tau0^2``, the prefactor of the paper's ``b_att`` (0 for tau0 = inf)."""
        if math.isinf(self.tau0):
            return 0.0
        return self.gamma**2 / self.tau0**2

    @property
    def attention_drift_coeff(self) -> float:
        """Coefficient of the attention bracket in the block drift: ``gamma^2 / tau0^2``
        for blocks with attention, else 0."""
        return self.attention_scale if self.has_attention else 0.0

    @property
    def relu_drift_coeff(self) -> float:
        """Coefficient ``gamma^2`` of ``b_relu`` in the drift (0 without an MLP)."""
        return self.gamma**2 if self.has_mlp else 0.0

    @property
    def k_lin(self) -> float:
        """Coefficient of ``Sigma_lin`` in the diffusion matrix."""
        g2 = self.gamma**2
        return {
            "attention": g2 * (2.0 - g2),
            "mlp": 2.0 * g2,
            "transformer": g2 * (4.0 - g2),
        }[self.block]

    @property
    def acal_coeff(self) -> float:
        """Coefficient ``gamma^4 / (tau0^2 H)`` of ``Acal`` (0 without attention or tau0 = inf)."""
        if not self.has_attention or math.isinf(self.tau0):
            return 0.0
        return self.attention_constants.acal_weight * self.gamma**4 / (self.tau0**2 * self.heads)
