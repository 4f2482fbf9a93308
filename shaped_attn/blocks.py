"""Residual blocks (shaped, unshaped, pre-LN, post-LN) as Flax NNX modules.

The module holds the parameters; the equations are :func:`shaped_attn.functional.block_apply`.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from . import functional
from .attention import MultiHeadAttention, dense
from .config import BlockConfig


def layer_norm_module(cfg: BlockConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """``nnx.LayerNorm`` with the block's epsilon and the two-pass variance of
    :func:`shaped_attn.functional.layer_norm` (they agree exactly at scale 1, bias 0)."""
    return nnx.LayerNorm(
        cfg.width, epsilon=cfg.ln_eps, use_fast_variance=False,
        param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
    )


class Block(nnx.Module):
    """One Transformer layer ``[..., m, n] -> [..., m, n]`` configured by a :class:`BlockConfig`.

    Submodules (``None`` when the config leaves them out): ``attention``
    (:class:`MultiHeadAttention`), ``mlp_in`` (``n -> hidden``), ``mlp_out``
    (``hidden -> n``), ``norm_attn`` / ``norm_mlp`` (``nnx.LayerNorm``, pre_ln / post_ln),
    ``learned``: an ``nnx.Dict`` of 0-d ``nnx.Param`` s, one per knob in ``cfg.learn``,
    initialised at its configured value (:func:`functional.configured_knobs`); ``None``
    when no knob is learned.
    """

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention = (
            MultiHeadAttention(cfg.attention, init=cfg.init, param_dtype=cfg.param_dtype, rngs=rngs)
            if cfg.has_attention else None
        )
        if cfg.has_mlp:
            kw = dict(init=cfg.init, param_dtype=cfg.param_dtype, rngs=rngs)
            self.mlp_in = dense(cfg.width, cfg.mlp_hidden, **kw)
            self.mlp_out = dense(cfg.mlp_hidden, cfg.width, **kw)
        else:
            self.mlp_in = self.mlp_out = None
        norms = cfg.layer_norm
        self.norm_attn = layer_norm_module(cfg, rngs=rngs) if norms and cfg.has_attention else None
        self.norm_mlp = layer_norm_module(cfg, rngs=rngs) if norms and cfg.has_mlp else None
        start = functional.configured_knobs(cfg)._asdict()
        dtype = jnp.dtype(cfg.param_dtype)
        self.learned = (
            nnx.Dict({k: nnx.Param(jnp.asarray(start[k], dtype)) for k in cfg.learn})
            if cfg.learn else None
        )

    def knobs(self, schedule: Optional[Mapping[str, jax.Array]] = None) -> functional.Knobs:
        """g1, g2, s_minus, lam, gamma: configured floats, learned parameters and the
        ``schedule`` values (:func:`functional.scheduled_values`), which must name exactly
        the config's scheduled knobs."""
        given = tuple(sorted(schedule or {}))
        if given != tuple(sorted(self.cfg.scheduled)):
            raise ValueError(
                f"schedule gives {list(given)} but the block schedules {list(self.cfg.scheduled)}; "
                "pass schedule=functional.scheduled_values(cfg, step)"
            )
        dtype = jnp.dtype(self.cfg.param_dtype)
        values = functional.configured_knobs(self.cfg)._asdict()
        values.update({k: jnp.asarray(v, dtype) for k, v in (schedule or {}).items()})
        values.update({k: p[...] for k, p in (self.learned or {}).items()})
        return functional.Knobs(**values)

    def maps(self) -> functional.BlockMaps:
        """The block's linear maps and norms, as :func:`functional.block_apply` takes them."""
        att = self.attention
        attention_maps = (
            {} if att is None
            else dict(query=att.query, key=att.key, value=att.value, output=att.output)
        )
        return functional.BlockMaps(
            **attention_maps, mlp_in=self.mlp_in, mlp_out=self.mlp_out,
            norm_attn=self.norm_attn, norm_mlp=self.norm_mlp,
        )

    def __call__(
        self,
        x: jax.Array,
        mask: Optional[jax.Array] = None,
        *,
        score_bias: Optional[jax.Array] = None,
        schedule: Optional[Mapping[str, jax.Array]] = None,
        return_attention: bool | str = False,
    ):
        """``x: [..., m, n]`` -> ``x'`` (and the attention ``[..., H, m, m]`` or ``None``;
        ``return_attention="activation"``: the weights before the shaping step).
        ``schedule``: values of the scheduled knobs (see :meth:`knobs`)."""
        return functional.block_apply(
            self.cfg, x, maps=self.maps(), mask=mask, score_bias=score_bias,
            knobs=self.knobs(schedule), return_attention=return_attention,
        )
