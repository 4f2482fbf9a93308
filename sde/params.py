"""Parameters of the covariance SDE (Noci et al., arXiv 2306.17759; Li et al., arXiv 2206.02768).

:class:`SDEParams` is a frozen, validated, hashable dataclass, so it can be a static argument of
``jax.jit``. It also owns the *block coefficients*: which multiple of each building block
(``b_att``, ``b_relu``, ``Sigma_lin``, ``Acal``) a residual block contributes. Those four numbers
are the only place where the block structure enters; :mod:`sde.coefficients` and
:mod:`sde.noise` read them from here (one source of truth, spec/sde.md section 2):

=============  ======================  ==================  ===========================  ============================
block          attention drift coeff   ReLU drift coeff    ``Sigma_lin`` coeff ``k_lin``  ``Acal`` coeff
=============  ======================  ==================  ===========================  ============================
"attention"    gamma^2 / tau0^2        0                   gamma^2 (2 - gamma^2)        a1^2 gamma^4 / (tau0^2 H)
"mlp"          0                       gamma^2             2 gamma^2                    0
"transformer"  gamma^2 / tau0^2        gamma^2             gamma^2 (4 - gamma^2)        a1^2 gamma^4 / (tau0^2 H)
=============  ======================  ==================  ===========================  ============================

(``k_lin`` for ``head_layout="sum"``; ``head_layout="concat"`` has ``2 gamma^2`` for the
attention block and ``4 gamma^2`` for the transformer block.) ``tau0 = inf`` (zero-initialised
queries) gives 0 for both attention coefficients.

Attention activation (``activation``, docs/general_activation_sde.md): a row-normalised
``w_j = f(s_j) / sum_k f(s_k)`` enters only through ``a1 = f'(0)/f(0)`` and
``a2 = f''(0)/f(0)``, computed from the registered activation by
:mod:`sde.activation_constants` and carried by :class:`AttentionConstants` (softmax:
``a1 = a2 = 1``, the paper).

Multi-head attention (``heads = H``; not in the paper; derived in
docs/general_activation_sde.md and checked with the one-layer estimator
:func:`sde.estimator.estimate_coefficients`). Both layouts keep the drift and divide the
``Acal`` coefficient by ``H``. ``head_layout="sum"`` (``out_proj=False``: each head has its
own ``n x n`` value map, outputs summed with weight ``1/sqrt(H)``) keeps the single-head
``Sigma_lin`` coefficient ``gamma^2 (2 - gamma^2)``: the summed value maps act like one
Gaussian matrix. ``head_layout="concat"`` (``out_proj=True``: values ``n -> n/H`` per head,
concatenated, output projection ``W_O``) has two Gaussian matrices on the value path and
``Sigma_lin`` coefficient ``2 lam^2 gamma^2 + 2 gamma^4 = 2 gamma^2`` (for any H, H = 1
included).
"""

from __future__ import annotations

import dataclasses
import math

from .validation import check_choice, check_interval, check_positive_int, check_positive_real, check_real


@dataclasses.dataclass(frozen=True)
class AttentionConstants:
    """Weights of the terms of the attention coefficients (softmax: 1, 1, 1 and shift 0).

    The attention drift bracket is
    ``trace_weight * V tr(V F) / m^2 + outer_weight * (diag(V) (V g)^T + (V g) diag(V)^T) / (2m)
    + shift_weight * (diag(V) (V u)^T + (V u) diag(V)^T) / m`` with ``u = P V 1 / m``,
    and the ``Acal`` term of the diffusion is multiplied by ``acal_weight``. For a
    row-normalised activation with ``a1 = f'(0)/f(0)``, ``a2 = f''(0)/f(0)``
    (:meth:`from_expansion`, docs/general_activation_sde.md): ``trace_weight = acal_weight =
    a1^2``, ``outer_weight = a2``, ``shift_weight = a2 - a1^2``. Softmax (``a1 = a2 = 1``,
    Noci et al., Appendix C.2) gives :data:`SOFTMAX`.
    """

    trace_weight: float = 1.0
    outer_weight: float = 1.0
    acal_weight: float = 1.0
    shift_weight: float = 0.0

    @classmethod
    def from_expansion(cls, a1: float, a2: float) -> "AttentionConstants":
        """The weights of an activation with ``f(s) = f(0) (1 + a1 s + a2 s^2 / 2 + ...)``."""
        a1, a2 = float(a1), float(a2)
        return cls(trace_weight=a1 * a1, outer_weight=a2, acal_weight=a1 * a1,
                   shift_weight=a2 - a1 * a1)


SOFTMAX = AttentionConstants()
"""Attention constants of the shaped softmax (Noci et al., Appendix C.2)."""


BLOCKS = ("attention", "mlp", "transformer")
"""Residual blocks whose covariance SDE is implemented."""

HEAD_LAYOUTS = ("sum", "concat")
"""Multi-head layouts: summed heads (``out_proj=False``) or concatenate + ``W_O`` (``out_proj=True``)."""


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
      heads: number of attention heads H >= 1; divides the ``Acal`` term by H (see the
        module docstring; verified with the one-layer estimator).
      activation: registered attention activation (:func:`shaped_attn.activations.names`)
        of the row-normalised form ``f(s_j) / sum f`` with ``f(0) != 0``; its ``a1, a2``
        (:mod:`sde.activation_constants`) set the attention coefficients. ``"softmax"`` is
        the paper. Others (``f(0) = 0``, pre-normalised, not row-normalised) raise.
      head_layout: ``"sum"`` (heads summed with ``1/sqrt(H)``, ``out_proj=False``) or
        ``"concat"`` (concatenate + output projection, ``out_proj=True``); sets ``k_lin``.
      mlp_activation: ``"relu"`` (the shaped ReLU with ``c_plus``, ``c_minus``) or a smooth
        activation ``phi`` with ``phi(0) = 0``, ``phi'(0) = 1``: a name in
        :data:`sde.smooth_mlp.SMOOTH_ACTIVATIONS` or a callable (Li, Nica, Roy 2022;
        ``phi_s(x) = s phi(x / s)``, ``s = mlp_scale sqrt(n)``). Same diffusion as the ReLU.
      mlp_scale: ``a`` of the smooth activation's ``s = a sqrt(n)``, > 0.

    Raises:
      ValueError: naming the parameter, its value and the allowed range.
    """

    gamma: float
    tau0: float = 1.0
    c_plus: float = 0.0
    c_minus: float = -1.0
    block: str = "transformer"
    heads: int = 1
    activation: str = "softmax"
    head_layout: str = "sum"
    mlp_activation: object = "relu"
    mlp_scale: float = 1.0

    def __post_init__(self):
        gamma = check_interval("gamma", self.gamma, 0, 1)
        tau0 = check_interval("tau0", self.tau0, 0, math.inf)
        c_plus = check_real("c_plus", self.c_plus)
        c_minus = check_real("c_minus", self.c_minus)
        check_choice("block", self.block, BLOCKS)
        check_positive_int("heads", self.heads)
        check_choice("head_layout", self.head_layout, HEAD_LAYOUTS)
        if not isinstance(self.activation, str):
            raise ValueError(f"activation={self.activation!r} must be a registered name (a str)")
        from shaped_attn import activations  # noqa: PLC0415

        activations.get(self.activation)  # unknown name: ValueError listing the known ones
        # Normalise to Python floats / ints so that equal parameters hash equally.
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "tau0", tau0)
        object.__setattr__(self, "c_plus", c_plus)
        object.__setattr__(self, "c_minus", c_minus)
        object.__setattr__(self, "heads", int(self.heads))
        mlp_scale = check_positive_real("mlp_scale", self.mlp_scale)
        object.__setattr__(self, "mlp_scale", mlp_scale)
        if self.smooth_mlp:
            self.mlp_constants  # noqa: B018  (ValueError for a bad activation)
        if self.has_attention:
            self.attention_constants  # noqa: B018  (ValueError if no small-score expansion)

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
        """Weights of the attention coefficient terms from ``activation``'s ``a1, a2``
        (:func:`sde.activation_constants.attention_constants`; softmax: :data:`SOFTMAX`)."""
        from .activation_constants import attention_constants  # noqa: PLC0415

        return attention_constants(self.activation)

    @property
    def smooth_mlp(self) -> bool:
        """True if the MLP uses a smooth activation (``mlp_activation != "relu"``)."""
        return not (isinstance(self.mlp_activation, str) and self.mlp_activation == "relu")

    @property
    def mlp_constants(self):
        """Second and third derivatives at 0 of a smooth MLP activation
        (:func:`sde.smooth_mlp.mlp_constants`); None for the shaped ReLU."""
        if not self.smooth_mlp:
            return None
        from .smooth_mlp import mlp_constants  # noqa: PLC0415

        return mlp_constants(self.mlp_activation)

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
        """Coefficient ``gamma^2`` of the MLP drift (``b_relu``, or ``b_smooth`` for a smooth
        ``mlp_activation``) in the block drift (0 without an MLP)."""
        return self.gamma**2 if self.has_mlp else 0.0

    @property
    def k_lin(self) -> float:
        """Coefficient of ``Sigma_lin`` in the diffusion matrix (see the module docstring)."""
        g2 = self.gamma**2
        if self.head_layout == "concat":
            return {"attention": 2.0 * g2, "mlp": 2.0 * g2, "transformer": 4.0 * g2}[self.block]
        return {
            "attention": g2 * (2.0 - g2),
            "mlp": 2.0 * g2,
            "transformer": g2 * (4.0 - g2),
        }[self.block]

    @property
    def acal_coeff(self) -> float:
        """Coefficient ``a1^2 gamma^4 / (tau0^2 H)`` of ``Acal`` (0 without attention or tau0 = inf)."""
        if not self.has_attention or math.isinf(self.tau0):
            return 0.0
        return self.attention_constants.acal_weight * self.gamma**4 / (self.tau0**2 * self.heads)
