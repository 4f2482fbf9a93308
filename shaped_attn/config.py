"""Frozen, validated configurations of attention layers, blocks and stacks.

Configs are plain data: every formula that uses them (temperature, residual gains, shaped
ReLU slopes) lives in :mod:`shaped_attn.functional`. They are hashable, so a config can be a
static argument of ``jax.jit``.

The paper's named variants (Noci et al., arXiv 2306.17759, Fig. 1 and Fig. 4) have small
constructors so that nobody assembles them by hand:

    shaped_config(width, gamma)                  # shaped attention + shaped ReLU, no LN
    shaped_config(width, gamma, ablation="no_centre" | "no_identity" | "no_sqrt_n")
    unshaped_config(width, gamma)                # same residual, plain softmax, ReLU
    pre_ln_config(width) / post_ln_config(width) # standard Transformers

Training options: the block scalars ``KNOBS`` (attention gains g1, g2, negative
ReLU slope s_minus, residual weights lam, gamma) are fixed by default, follow a linear
:class:`Ramp` of the training step (``BlockConfig.schedule``; :func:`recover_schedule` takes
the shaping to the vanilla values) or are trained (``BlockConfig.learn``); ``init="paper"`` is
the paper's training initialisation (``W_Q, W_K ~ N(0, n^{-3/2})`` with ``tau = sqrt(n_k)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

from sde._helpers.validation import check_choice, check_dtype, check_int, check_number, check_real

from . import activations

ActivationLike = Union[str, Callable[..., Any]]

BLOCK_KINDS = ("shaped", "unshaped", "pre_ln", "post_ln")
TEMPERATURES = ("shaped", "standard")
INITS = ("theory", "standard", "paper")
QUERY_INITS = ("default", "zero")
SUBLAYERS = ("both", "attention", "mlp")
ABLATIONS = (None, "no_centre", "no_identity", "no_sqrt_n")
STEMS = ("patch", "conv")
KNOBS = ("g1", "g2", "s_minus", "lam", "gamma")
"""Block scalars that can be fixed, scheduled or trained: ``A = g1 I + act(Y / tau) - g2 C``,
the shaped ReLU's negative slope ``s_minus``, the residual ``X' = lam X + gamma f(X)``."""
RECOVER_KNOBS = ("g1", "g2", "s_minus")
"""The shaping that :func:`recover_schedule` removes (vanilla values: all 0)."""


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Multi-head self-attention ``A = identity_gain I + act(Y / tau + bias) - centre_gain C``.

    Attributes:
        width: model width ``n`` (input and output features).
        num_heads: number of heads ``H``.
        head_dim: query/key width per head ``n_k``; ``None`` means ``width // num_heads``
            (then ``num_heads`` must divide ``width``). Resolved in ``__post_init__``.
        activation: a registered name (:func:`shaped_attn.activations.names`) or a callable
            ``fn(scores, mask=None) -> weights`` applied to scores ``[..., H, Lq, Lk]``.
        temperature: ``"shaped"``: ``tau = tau0 sqrt(width * head_dim)`` (the paper's
            shaped temperature); ``"standard"``: ``tau = tau0 sqrt(head_dim)`` (the usual
            ``1/sqrt(d_head)`` at ``tau0 = 1``; with shaping on, the "no sqrt(n)" ablation).
        tau0: temperature constant, > 0.
        identity_gain, centre_gain: gains of the shaping terms ``I`` and ``C`` (``C`` centres
            row i over its ``m_i`` visible keys). Both 0: no shaping (plain attention).
        out_proj: True: values ``n -> H * (n / H)``, concatenate heads, output projection
            ``n -> n`` (standard layout). False: each head has its own ``n -> n`` value map
            and head outputs are summed with weight ``1/sqrt(H)``, no output projection
            (with ``H = 1`` exactly the single-head block of docs/model.md §1).
        causal: apply a causal mask (row i sees keys ``j <= i``; centring uses ``1/i``).
        query_init: ``"default"`` (the block's init scheme) or ``"zero"`` (``W_Q = 0``, so
            ``Y = 0`` and, with shaping, ``A = I`` exactly).
        prenorm_order: where a pre-normalised (``norm_``) activation standardises the scores:
            ``"after_scaling"`` (on ``q.k / tau``, the authors' module file) or
            ``"before_scaling"`` (on ``q.k``, then divided by ``tau``: the authors' training
            script); see ``docs/activations.md``.
    """

    width: int
    num_heads: int = 1
    head_dim: Optional[int] = None
    activation: ActivationLike = "softmax"
    temperature: str = "standard"
    tau0: float = 1.0
    identity_gain: float = 0.0
    centre_gain: float = 0.0
    out_proj: bool = True
    causal: bool = False
    query_init: str = "default"
    prenorm_order: str = "after_scaling"

    def __post_init__(self):
        check_int("width", self.width)
        check_int("num_heads", self.num_heads)
        if self.head_dim is not None:
            check_int("head_dim", self.head_dim)
        if (self.head_dim is None or self.out_proj) and self.width % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide width={self.width}"
                + (" (out_proj=True splits the values into heads)" if self.out_proj else "")
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.width // self.num_heads)
        if not callable(self.activation):
            activations.get(self.activation)  # ValueError naming the unknown activation
        check_choice("temperature", self.temperature, TEMPERATURES)
        check_number("tau0", self.tau0)
        check_real("identity_gain", self.identity_gain)
        check_real("centre_gain", self.centre_gain)
        if not isinstance(self.out_proj, bool):
            raise ValueError(f"out_proj={self.out_proj!r} must be a bool")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal={self.causal!r} must be a bool")
        check_choice("query_init", self.query_init, QUERY_INITS)
        activations.split_prenorm(self.activation, self.prenorm_order)  # ValueError naming it
        if self.activation == "shaped_softmax" and self.shaped:
            raise ValueError(
                "activation='shaped_softmax' already adds I - C; use activation='softmax' "
                "with identity_gain/centre_gain"
            )

    @property
    def shaped(self) -> bool:
        """Whether the shaping step ``identity_gain I + . - centre_gain C`` is applied."""
        return self.identity_gain != 0 or self.centre_gain != 0

    @property
    def activation_fn(self) -> Callable[..., Any]:
        """The activation as a function ``fn(scores, mask=None)`` (a name resolved in the registry)."""
        return activations.resolve(self.activation)

    @property
    def value_dim(self) -> int:
        """Value width per head: ``width / H`` with ``out_proj``, ``width`` without."""
        return self.width // self.num_heads if self.out_proj else self.width


@dataclasses.dataclass(frozen=True)
class Ramp:
    """Linear schedule of one knob: ``(1 - t) start + t end``, ``t = min(step / steps, 1)``.

    ``start`` is the knob's configured (fixed) value; see
    :func:`shaped_attn.functional.scheduled_values`.

    Attributes:
        knob: one of :data:`KNOBS`.
        end: value from step ``steps`` on.
        steps: length of the ramp in training steps (e.g. the warmup).
    """

    knob: str
    end: float
    steps: int

    def __post_init__(self):
        check_choice("knob", self.knob, KNOBS)
        check_real("end", self.end)
        check_int("steps", self.steps)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One Transformer layer: attention and MLP sub-blocks with a residual and optional LN.

    Attributes:
        attention: the attention sub-block.
        kind: ``"shaped"`` / ``"unshaped"``: ``Z = lam X + gamma Att(X)``,
            ``X' = lam Z + gamma MLP(Z)``, ``lam = sqrt(1 - gamma^2)``, no LayerNorm (the two
            differ only in their attention and ReLU settings, see the constructors);
            ``"pre_ln"``: ``Z = X + gamma Att(LN(X))``, ``X' = Z + gamma MLP(LN(Z))``;
            ``"post_ln"``: ``Z = LN(X + gamma Att(X))``, ``X' = LN(Z + gamma MLP(Z))``.
        gamma: residual branch gain in ``(0, 1]`` (1 for the standard LN Transformers).
        shaped_relu: MLP nonlinearity ``sigma_s`` with slopes ``s_pm = 1 + c_pm/sqrt(n)``;
            False: the standard ReLU (``s_plus = 1, s_minus = 0``). Either way the output is
            multiplied by ``sqrt(c)``, ``c = 2 / (s_plus^2 + s_minus^2)``.
        c_plus, c_minus: shaped ReLU constants (used only when ``shaped_relu``).
        mlp_hidden: MLP hidden width; ``None`` means ``width``. Resolved in ``__post_init__``.
        sublayers: ``"both"``, ``"attention"`` (attention-only block) or ``"mlp"``.
        init: ``"theory"``: every kernel ``N(0, 1/fan_in)``, no biases; ``"standard"``:
            Flax defaults (truncated-normal fan-in kernels, zero-initialised biases);
            ``"paper"``: the paper's training initialisation, theory init except
            ``W_Q, W_K ~ N(0, n^{-3/2})``; needs ``temperature="standard"`` (``tau = tau0
            sqrt(n_k)``), which then equals the shaped temperature at ``W ~ N(0, 1/n)``.
        ln_eps: LayerNorm epsilon, shared by the module LayerNorm and
            :func:`shaped_attn.functional.layer_norm`.
        param_dtype: dtype of the parameters (``"float64"`` for theory comparisons).
        lam: residual weight of the skip path of the shaped / unshaped kinds; ``None``:
            ``sqrt(1 - gamma^2)``.
        learn: knobs (:data:`KNOBS`) that are ``nnx.Param`` s, one per layer, initialised at
            their configured value and trained with the other weights.
        schedule: :class:`Ramp` s of knobs that follow the training step; the modules take
            their values as ``schedule=scheduled_values(cfg, step)``.
    """

    attention: AttentionConfig
    kind: str = "pre_ln"
    gamma: float = 1.0
    shaped_relu: bool = False
    c_plus: float = 0.0
    c_minus: float = -1.0
    mlp_hidden: Optional[int] = None
    sublayers: str = "both"
    init: str = "theory"
    ln_eps: float = 1e-6
    param_dtype: Any = "float32"
    lam: Optional[float] = None
    learn: tuple[str, ...] = ()
    schedule: tuple[Ramp, ...] = ()

    def __post_init__(self):
        if not isinstance(self.attention, AttentionConfig):
            raise ValueError(f"attention={self.attention!r} must be an AttentionConfig")
        check_choice("kind", self.kind, BLOCK_KINDS)
        check_number("gamma", self.gamma, 0, 1, hi_closed=True)
        if not isinstance(self.shaped_relu, bool):
            raise ValueError(f"shaped_relu={self.shaped_relu!r} must be a bool")
        check_real("c_plus", self.c_plus)
        check_real("c_minus", self.c_minus)
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", self.attention.width)
        check_int("mlp_hidden", self.mlp_hidden)
        check_choice("sublayers", self.sublayers, SUBLAYERS)
        check_choice("init", self.init, INITS)
        check_number("ln_eps", self.ln_eps)
        check_dtype("param_dtype", self.param_dtype)
        if self.init == "paper" and self.attention.temperature != "standard":
            raise ValueError(
                "init='paper' draws W_Q, W_K with variance n^{-3/2} and needs "
                f"temperature='standard' (got {self.attention.temperature!r})"
            )
        if self.lam is not None:
            check_real("lam", self.lam)
        self._check_knobs()

    def _check_knobs(self) -> None:
        object.__setattr__(self, "learn", tuple(self.learn))
        object.__setattr__(self, "schedule", tuple(self.schedule))
        for name in self.learn:
            check_choice("learn", name, KNOBS)
        for ramp in self.schedule:
            if not isinstance(ramp, Ramp):
                raise ValueError(f"schedule entry {ramp!r} must be a Ramp")
        varied = self.learn + self.scheduled
        twice = sorted({k for k in varied if varied.count(k) > 1})
        if twice:
            raise ValueError(f"knobs {twice} are learned or scheduled more than once")
        needs = {"g1": self.has_attention, "g2": self.has_attention, "s_minus": self.has_mlp,
                 "lam": not self.layer_norm}
        bad = [k for k in varied if not needs.get(k, True)]
        if self.lam is not None and self.layer_norm:
            bad.append("lam")
        if bad:
            raise ValueError(
                f"knobs {sorted(set(bad))} do not exist in this block (kind={self.kind!r}, "
                f"sublayers={self.sublayers!r}): g1, g2 need attention, s_minus an MLP, lam no LN"
            )
        if self.attention.activation == "shaped_softmax" and {"g1", "g2"} & set(varied):
            raise ValueError("activation='shaped_softmax' has fixed gains; use 'softmax' to vary g1, g2")

    @property
    def scheduled(self) -> tuple[str, ...]:
        """Names of the scheduled knobs, in ``schedule`` order."""
        return tuple(r.knob for r in self.schedule)

    @property
    def width(self) -> int:
        return self.attention.width

    @property
    def has_attention(self) -> bool:
        return self.sublayers in ("both", "attention")

    @property
    def has_mlp(self) -> bool:
        return self.sublayers in ("both", "mlp")

    @property
    def layer_norm(self) -> bool:
        """Whether the block has LayerNorms (pre_ln, post_ln)."""
        return self.kind in ("pre_ln", "post_ln")


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """``depth`` identical (independently initialised) blocks."""

    block: BlockConfig
    depth: int

    def __post_init__(self):
        if not isinstance(self.block, BlockConfig):
            raise ValueError(f"block={self.block!r} must be a BlockConfig")
        check_int("depth", self.depth)


@dataclasses.dataclass(frozen=True)
class ImageClassifierConfig:
    """Image -> tokens (patches or a stride-2 conv stem) -> Stack -> mean pool -> logits.

    Attributes:
        stack: the Transformer stack.
        num_classes: output classes.
        image_size: input height = width (images are ``[B, H, W, C]``).
        channels: input channels.
        stem: ``"patch"``: non-overlapping ``patch_size`` patches, one linear map each;
            ``"conv"``: ``conv_layers`` 3x3 stride-2 convolutions with ReLU in between
            (LeViT-like; 32x32 images give 64 tokens with 2 layers, 16 with 3).
        patch_size: patch side for the patch stem; must divide ``image_size``.
        conv_layers: number of stride-2 convolutions of the conv stem.
        pos_embedding: add a learned position embedding (initialised ``N(0, 0.02^2)``).
        final_norm: LayerNorm after the stack, before pooling.
    """

    stack: StackConfig
    num_classes: int
    image_size: int = 32
    channels: int = 3
    stem: str = "patch"
    patch_size: int = 4
    conv_layers: int = 2
    pos_embedding: bool = True
    final_norm: bool = False

    def __post_init__(self):
        if not isinstance(self.stack, StackConfig):
            raise ValueError(f"stack={self.stack!r} must be a StackConfig")
        for name in ("num_classes", "image_size", "channels", "patch_size", "conv_layers"):
            check_int(name, getattr(self, name))
        check_choice("stem", self.stem, STEMS)
        if self.stem == "patch" and self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size={self.patch_size} must divide image_size={self.image_size}"
            )

    @property
    def num_tokens(self) -> int:
        if self.stem == "patch":
            return (self.image_size // self.patch_size) ** 2
        side = self.image_size
        for _ in range(self.conv_layers):
            side = -(-side // 2)  # SAME padding, stride 2
        return side * side


@dataclasses.dataclass(frozen=True)
class CausalLMConfig:
    """Token embedding (+ learned positions) -> causally masked Stack -> [LN] -> vocab logits.

    The model always applies a causal mask, whatever ``stack.block.attention.causal`` says.
    """

    stack: StackConfig
    vocab_size: int = 256
    max_len: int = 128
    pos_embedding: bool = True
    final_norm: bool = True

    def __post_init__(self):
        if not isinstance(self.stack, StackConfig):
            raise ValueError(f"stack={self.stack!r} must be a StackConfig")
        check_int("vocab_size", self.vocab_size)
        check_int("max_len", self.max_len)


# ----------------------------------------------------------------------- named variants


def shaped_config(
    width: int,
    gamma: float,
    *,
    tau0: float = 1.0,
    c_plus: float = 0.0,
    c_minus: float = -1.0,
    num_heads: int = 1,
    head_dim: Optional[int] = None,
    out_proj: bool = False,
    activation: ActivationLike = "softmax",
    ablation: Optional[str] = None,
    **block_kwargs: Any,
) -> BlockConfig:
    """The shaped Transformer layer of Noci et al. (docs/model.md §1).

    ``A = I + softmax(Y / tau) - C`` with ``tau = tau0 sqrt(n n_k)``, shaped ReLU, residual
    ``lam = sqrt(1 - gamma^2)``, no LayerNorm, theory init, single head without an output
    projection by default. ``ablation`` removes one ingredient (paper Fig. 4):
    ``"no_centre"`` (centre gain 0), ``"no_identity"`` (identity gain 0) or ``"no_sqrt_n"``
    (``tau = tau0 sqrt(n_k)``). Other keyword arguments go to :class:`BlockConfig`
    (``causal``, ``query_init`` are accepted here and go to the attention config).
    With ``init="paper"`` the temperature is ``tau0 sqrt(n_k)`` (the paper's training form).
    """
    check_choice("ablation", ablation, ABLATIONS)
    standard_tau = ablation == "no_sqrt_n" or block_kwargs.get("init") == "paper"
    attention_kwargs = {k: block_kwargs.pop(k) for k in ("causal", "query_init") if k in block_kwargs}
    attention = AttentionConfig(
        width=width,
        num_heads=num_heads,
        head_dim=head_dim,
        activation=activation,
        temperature="standard" if standard_tau else "shaped",
        tau0=tau0,
        identity_gain=0.0 if ablation == "no_identity" else 1.0,
        centre_gain=0.0 if ablation == "no_centre" else 1.0,
        out_proj=out_proj,
        **attention_kwargs,
    )
    return BlockConfig(
        attention=attention, kind="shaped", gamma=gamma, shaped_relu=True,
        c_plus=c_plus, c_minus=c_minus, **block_kwargs,
    )


def _plain_attention(width, num_heads, head_dim, out_proj, activation, tau0, block_kwargs):
    attention_kwargs = {k: block_kwargs.pop(k) for k in ("causal", "query_init") if k in block_kwargs}
    return AttentionConfig(
        width=width, num_heads=num_heads, head_dim=head_dim, activation=activation,
        temperature="standard", tau0=tau0, out_proj=out_proj, **attention_kwargs,
    )


def unshaped_config(
    width: int,
    gamma: float,
    *,
    tau0: float = 1.0,
    num_heads: int = 1,
    head_dim: Optional[int] = None,
    out_proj: bool = False,
    activation: ActivationLike = "softmax",
    **block_kwargs: Any,
) -> BlockConfig:
    """Paper Fig. 1 baseline: the shaped block's residual, plain softmax at temperature
    ``tau0 sqrt(n_k)``, standard ReLU, no LayerNorm."""
    attention = _plain_attention(width, num_heads, head_dim, out_proj, activation, tau0, block_kwargs)
    return BlockConfig(attention=attention, kind="unshaped", gamma=gamma, shaped_relu=False, **block_kwargs)


def pre_ln_config(
    width: int,
    *,
    num_heads: int = 1,
    head_dim: Optional[int] = None,
    out_proj: bool = True,
    activation: ActivationLike = "softmax",
    tau0: float = 1.0,
    **block_kwargs: Any,
) -> BlockConfig:
    """Pre-LN Transformer layer: ``x + Att(LN(x))``, then ``+ MLP(LN(.))``, standard ReLU."""
    attention = _plain_attention(width, num_heads, head_dim, out_proj, activation, tau0, block_kwargs)
    return BlockConfig(attention=attention, kind="pre_ln", shaped_relu=False, **block_kwargs)


def post_ln_config(
    width: int,
    *,
    num_heads: int = 1,
    head_dim: Optional[int] = None,
    out_proj: bool = True,
    activation: ActivationLike = "softmax",
    tau0: float = 1.0,
    **block_kwargs: Any,
) -> BlockConfig:
    """Post-LN Transformer layer: ``LN(x + Att(x))``, then ``LN(. + MLP(.))``."""
    attention = _plain_attention(width, num_heads, head_dim, out_proj, activation, tau0, block_kwargs)
    return BlockConfig(attention=attention, kind="post_ln", shaped_relu=False, **block_kwargs)


def recover_schedule(steps: int) -> tuple[Ramp, ...]:
    """The paper's "recover" shaping: g1, g2 and s_minus go linearly to 0 over ``steps``.

    On a :func:`shaped_config` block with ``c_plus = 0`` (``s_plus = 1``) the block is then
    exactly the :func:`unshaped_config` one (plain attention, standard ReLU, the same
    residual ``lam, gamma``): a Transformer without LayerNorm.
    """
    return tuple(Ramp(knob, 0.0, steps) for knob in RECOVER_KNOBS)
