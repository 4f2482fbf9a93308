"""Multi-head self-attention with a pluggable activation, temperature and shaping (Flax NNX).

The module holds the parameters; the equations are :func:`shaped_attn.functional.attention_apply`.
This is not ``nnx.MultiHeadAttention``: that one's fast path is softmax-only.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from . import functional
from .config import INITS, AttentionConfig

THEORY_KERNEL_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
"""``N(0, 1/fan_in)`` (untruncated): ``X @ kernel = X W / sqrt(n)`` with ``W`` iid ``N(0, 1)``."""


def dense(
    n_in: int,
    n_out: int,
    *,
    init: str,
    param_dtype: Any,
    rngs: nnx.Rngs,
    zero: bool = False,
    variance: float = 1.0,
) -> nnx.Linear:
    """An ``nnx.Linear`` under an init scheme.

    ``"theory"`` and ``"paper"``: kernel ``N(0, variance/n_in)``, no bias. ``"standard"``:
    Flax defaults (truncated normal fan-in kernel, zero bias). ``zero=True``
    zero-initialises the kernel.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}")
    kwargs: dict[str, Any] = {"param_dtype": jnp.dtype(param_dtype), "rngs": rngs}
    if init in ("theory", "paper"):
        kernel_init = (
            THEORY_KERNEL_INIT if variance == 1.0
            else nnx.initializers.variance_scaling(variance, "fan_in", "normal")
        )
        kwargs.update(use_bias=False, kernel_init=kernel_init)
    if zero:
        kwargs["kernel_init"] = nnx.initializers.zeros
    return nnx.Linear(n_in, n_out, **kwargs)


class MultiHeadAttention(nnx.Module):
    """Self-attention ``[..., m, n] -> [..., m, n]`` configured by an :class:`AttentionConfig`.

    Parameters: ``query``, ``key`` (``n -> H n_k``), ``value`` (``n -> H d_v``) and, with
    ``cfg.out_proj``, ``output`` (``H d_v -> n``), all ``nnx.Linear``.

    Arguments:
        cfg: the attention config.
        init: ``"theory"`` (kernels ``N(0, 1/fan_in)``, no biases), ``"paper"`` (the same,
            but ``W_Q, W_K ~ N(0, n^{-3/2})``: the paper's training initialisation) or
            ``"standard"``.
        param_dtype: parameter dtype.
        rngs: ``nnx.Rngs`` providing ``params``.
    """

    def __init__(
        self,
        cfg: AttentionConfig,
        *,
        init: str = "theory",
        param_dtype: Any = "float32",
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        n, h = cfg.width, cfg.num_heads
        make = lambda n_in, n_out, zero=False, variance=1.0: dense(
            n_in, n_out, init=init, param_dtype=param_dtype, rngs=rngs, zero=zero,
            variance=variance,
        )
        qk_variance = n**-0.5 if init == "paper" else 1.0  # N(0, n^{-1/2} / n)
        self.query = make(n, h * cfg.head_dim, zero=cfg.query_init == "zero", variance=qk_variance)
        self.key = make(n, h * cfg.head_dim, variance=qk_variance)
        self.value = make(n, h * cfg.value_dim)
        self.output = make(h * cfg.value_dim, n) if cfg.out_proj else None

    def __call__(
        self,
        x: jax.Array,
        mask: Optional[jax.Array] = None,
        *,
        score_bias: Optional[jax.Array] = None,
        return_weights: bool = False,
    ):
        """``x: [..., m, n]`` -> ``[..., m, n]`` (and weights ``[..., H, m, m]``)."""
        return functional.attention_apply(
            self.cfg, x, query=self.query, key=self.key, value=self.value,
            output=self.output, mask=mask, score_bias=score_bias, return_weights=return_weights,
        )
