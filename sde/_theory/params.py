"""Parameters of the covariance SDE (Noci et al., arXiv 2306.17759; Li et al., arXiv 2206.02768).

:class:`SDEParams` is a frozen, validated, hashable dataclass, so it can be a static argument of
``jax.jit``. It also owns the *block coefficients*: which multiple of each building block
(``b_att``, ``b_relu``, ``Sigma_lin``, ``Acal``) a residual block contributes. Those four numbers
are the only place where the block structure enters; the drift, the diffusion and the noise
read them from here (one source of truth, docs/sde.md §5):

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
``a2 = f''(0)/f(0)`` (an :class:`ActivationExpansion`, computed from the activation function
itself; softmax: ``a1 = a2 = 1``, the paper).

:meth:`SDEParams.from_block` is the bridge from a finite block's configuration
(:class:`shaped_attn.config.BlockConfig`, read by attribute: this module never imports the
module family) to its SDE, with a ValueError saying why for blocks that have none.

Multi-head attention (``heads = H``; not in the paper; derived in
docs/general_activation_sde.md and checked with the one-layer estimator
:func:`sde.estimate_coefficients`). Both layouts keep the drift and divide the
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
import functools
import math
from typing import Callable, Optional, Union

from .._helpers.validation import check_choice, check_int, check_number, check_real
from .constants import SOFTMAX_EXPANSION, ActivationExpansion, AttentionConstants, expansion_of
from .smooth_mlp import mlp_constants

ActivationLike = Union[str, ActivationExpansion, Callable]


BLOCKS = ("attention", "mlp", "transformer")
"""Residual blocks whose covariance SDE is implemented."""

HEAD_LAYOUTS = ("sum", "concat")
"""Multi-head layouts: summed heads (``out_proj=False``) or concatenate + ``W_O`` (``out_proj=True``)."""


@dataclasses.dataclass(frozen=True)
class SDEParams:
    """Parameters of the covariance SDE of one residual block (docs/sde.md §5).

    Arguments:
      gamma: residual branch gain, in (0, 1]; the skip gain is ``lam = sqrt(1 - gamma^2)``.
      tau0: attention temperature constant, > 0; ``float('inf')`` means no attention drift and
        no ``Acal`` diffusion (zero-initialised queries).
      c_plus: shaped-ReLU slope constant for x > 0 (``s_plus = 1 + c_plus / sqrt(n)``).
      c_minus: shaped-ReLU slope constant for x < 0.
      block: one of ``"attention"``, ``"mlp"``, ``"transformer"`` (attention + MLP per layer).
      heads: number of attention heads H >= 1; divides the ``Acal`` term by H (see the
        module docstring; verified with the one-layer estimator).
      activation: the attention activation, of the row-normalised form ``f(s_j) / sum f``
        with ``f(0) != 0``: ``"softmax"`` (the paper), an :class:`ActivationExpansion`
        (``sde.expansion(name)`` for a registered name of :mod:`shaped_attn.activations`) or
        a callable ``fn(scores, mask=None)``, whose ``a1, a2`` are computed by JAX derivatives.
        Stored as its :class:`ActivationExpansion`. Activations without such an expansion
        (``f(0) = 0``, pre-normalised, not row-normalised) raise.
      head_layout: ``"sum"`` (heads summed with ``1/sqrt(H)``, ``out_proj=False``) or
        ``"concat"`` (concatenate + output projection, ``out_proj=True``); sets ``k_lin``.
      mlp_activation: ``"relu"`` (the shaped ReLU with ``c_plus``, ``c_minus``) or a smooth
        activation ``phi`` with ``phi(0) = 0``, ``phi'(0) = 1``: a name in
        :data:`SMOOTH_ACTIVATIONS` (docs/sde.md §7) or a callable (Li, Nica, Roy 2022;
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
    activation: ActivationLike = "softmax"
    head_layout: str = "sum"
    mlp_activation: object = "relu"
    mlp_scale: float = 1.0

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)  # normalised values hash equally
        set_("gamma", check_number("gamma", self.gamma, 0, 1, hi_closed=True))
        set_("tau0", check_number("tau0", self.tau0, 0, math.inf, hi_closed=True))
        set_("c_plus", check_real("c_plus", self.c_plus))
        set_("c_minus", check_real("c_minus", self.c_minus))
        check_choice("block", self.block, BLOCKS)
        set_("heads", check_int("heads", self.heads))
        check_choice("head_layout", self.head_layout, HEAD_LAYOUTS)
        set_("mlp_scale", check_number("mlp_scale", self.mlp_scale))
        set_("activation", _activation_expansion(self.activation))
        if self.smooth_mlp:
            self.mlp_constants  # noqa: B018  (ValueError for a bad activation)

    @classmethod
    def from_block(cls, cfg) -> "SDEParams":
        """The covariance SDE of a finite block ``cfg`` (a :class:`shaped_attn.config.BlockConfig`)
        at initialisation, in the limit of docs/model.md §1.

        Sub-layers ``"both"``, ``"attention"``, ``"mlp"`` give blocks ``"transformer"``,
        ``"attention"``, ``"mlp"``; zero-initialised queries give ``tau0 = inf``; ``out_proj``
        gives ``head_layout="concat"``. The paper's training initialisation (``init="paper"``,
        ``tau = tau0 sqrt(n_k)``) has the SDE of the shaped temperature with the same ``tau0``.

        Raises:
          ValueError: saying why for a block that has no such limit (LayerNorm, unshaped,
            the ablations, causal masking, standard init, ...; docs/model.md §2).
        """
        why = _no_limit(cfg)
        if why:
            raise ValueError(f"this block has no covariance SDE in this library: {why} (docs/model.md §2)")
        att = cfg.attention
        activation = "softmax"
        if cfg.has_attention and att.activation != "softmax":
            activation = expansion_of(att.activation_fn, att.activation if isinstance(att.activation, str) else "")
        return cls(
            gamma=cfg.gamma, tau0=math.inf if att.query_init == "zero" else att.tau0,
            c_plus=cfg.c_plus, c_minus=cfg.c_minus,
            block={"both": "transformer", "attention": "attention", "mlp": "mlp"}[cfg.sublayers],
            heads=att.num_heads, activation=activation,
            head_layout="concat" if att.out_proj else "sum",
        )

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
        """Weights of the attention coefficient terms from ``activation``'s ``a1, a2``."""
        return self.activation.constants

    @property
    def smooth_mlp(self) -> bool:
        """True if the MLP uses a smooth activation (``mlp_activation != "relu"``)."""
        return not (isinstance(self.mlp_activation, str) and self.mlp_activation == "relu")

    @property
    def mlp_constants(self):
        """Second and third derivatives at 0 of a smooth MLP activation (docs/sde.md §7);
        None for the shaped ReLU."""
        return mlp_constants(self.mlp_activation) if self.smooth_mlp else None

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


def _activation_expansion(activation: ActivationLike) -> ActivationExpansion:
    """``activation`` as an :class:`ActivationExpansion` (see :class:`SDEParams`)."""
    if isinstance(activation, ActivationExpansion):
        return activation
    if isinstance(activation, str):
        if activation == "softmax":
            return SOFTMAX_EXPANSION
        raise ValueError(
            f"activation={activation!r}: the theory knows only 'softmax' by name; pass "
            f"sde.expansion({activation!r}) for a registered activation, a callable, or build the "
            "parameters with SDEParams.from_block(config)"
        )
    if callable(activation):
        return expansion_of(activation, "")
    raise ValueError(f"activation={activation!r} must be 'softmax', an ActivationExpansion or a callable")


def _no_limit(cfg) -> Optional[str]:
    """Why the block ``cfg`` has no covariance SDE here, or None (see :meth:`SDEParams.from_block`)."""
    att = cfg.attention
    if cfg.layer_norm:
        return f"kind={cfg.kind!r} has LayerNorm"
    if cfg.kind != "shaped":
        return (f"kind={cfg.kind!r}: plain attention and the standard ReLU do not approach the "
                "identity, so the covariance degenerates (rank collapse) instead of diffusing")
    if cfg.init == "standard":
        return "init='standard' (truncated-normal kernels and biases) is not the theory's Gaussian init"
    lam = math.sqrt(1.0 - cfg.gamma**2)
    if cfg.lam is not None and not math.isclose(cfg.lam, lam, rel_tol=1e-12, abs_tol=1e-15):
        return f"lam={cfg.lam!r} is not sqrt(1 - gamma^2) = {lam!r}"
    if cfg.has_mlp and cfg.mlp_hidden != cfg.width:
        return f"mlp_hidden={cfg.mlp_hidden} differs from width={cfg.width}"
    if not cfg.has_attention:
        return None
    if (att.identity_gain, att.centre_gain) != (1.0, 1.0):
        return (f"identity_gain={att.identity_gain!r}, centre_gain={att.centre_gain!r}: the SDE needs "
                "A = I + act(Y / tau) - 11^T/m (the no_identity / no_centre ablations have none)")
    if att.temperature != ("standard" if cfg.init == "paper" else "shaped"):
        return (f"temperature={att.temperature!r} with init={cfg.init!r}: the scores are O(1), not "
                "O(1/sqrt(n)) (the no_sqrt_n ablation)")
    if att.causal:
        return "causal attention: the SDE here is that of bidirectional attention"
    return None
