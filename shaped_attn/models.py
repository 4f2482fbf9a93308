"""Stacks of blocks (a scan over layers) and two model heads: an image classifier and a
causal language model (Flax NNX).

``Stack`` creates its ``depth`` blocks with ``nnx.vmap`` over split keys, so every parameter
carries a leading layer axis, and applies them with ``jax.lax.scan`` over the split
graphdef/state: compile time does not grow with depth.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from . import functional
from .attention import dense
from .blocks import Block, layer_norm_module
from .config import BlockConfig, CausalLMConfig, ImageClassifierConfig


class StackOutput(NamedTuple):
    """``output``: ``[..., m, n]``; ``hidden``: ``[depth + 1, ..., m, n]`` (input first) or
    ``None``; ``attention``: ``[depth, ..., H, m, m]`` or ``None``."""

    output: jax.Array
    hidden: Optional[jax.Array] = None
    attention: Optional[jax.Array] = None


class Stack(nnx.Module):
    """``depth`` independently initialised blocks of one config, applied in sequence.

    Arguments:
        cfg: the block config.
        depth: number of blocks.
        rngs: ``nnx.Rngs``; one ``params`` key is drawn and split into ``depth`` keys.

    Attributes:
        layers: a :class:`Block` whose parameters have a leading axis of size ``depth``.
    """

    def __init__(self, cfg: BlockConfig, depth: int, *, rngs: nnx.Rngs):
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth={depth!r} must be an integer >= 1")
        self.cfg = cfg
        self.depth = depth
        keys = jax.random.split(rngs.params(), depth)
        self.layers = nnx.vmap(lambda k: Block(cfg, rngs=nnx.Rngs(params=k)))(keys)

    def __call__(
        self,
        x: jax.Array,
        mask: Optional[jax.Array] = None,
        *,
        score_bias: Optional[jax.Array] = None,
        schedule: Optional[Mapping[str, jax.Array]] = None,
        return_hidden: bool = False,
        return_attention: bool | str = False,
    ):
        """Apply the blocks to ``x: [..., m, n]``.

        ``mask`` / ``score_bias`` / ``schedule`` (scheduled knob values,
        :func:`functional.scheduled_values`) are shared by all layers. Returns ``x_depth``
        when no ``return_*`` flag is set, otherwise a :class:`StackOutput`
        (``return_attention="activation"``: attention weights before the shaping step).

        The scan reads the layers' state and does not write it back: fine for parameters;
        a block with mutable state (dropout RNG counters, running statistics) would need the
        updated state returned from the scan.
        """
        graphdef, state = nnx.split(self.layers)

        def step(h, layer_state):
            layer = nnx.merge(graphdef, layer_state)
            h, att = layer(h, mask, score_bias=score_bias, schedule=schedule,
                           return_attention=return_attention or True)
            return h, (h if return_hidden else None, att if return_attention else None)

        out, (hidden, attention) = jax.lax.scan(step, x, state)
        if not (return_hidden or return_attention):
            return out
        if return_hidden:
            hidden = jnp.concatenate([x[None], hidden], axis=0)
        return StackOutput(out, hidden, attention)


class ImageClassifier(nnx.Module):
    """Images ``[B, H, W, C]`` -> logits ``[B, num_classes]``.

    Stem (patches or stride-2 convs) -> tokens ``[B, m, n]`` -> (+ learned positions) ->
    :class:`Stack` -> (LayerNorm) -> mean over tokens -> linear head.
    """

    def __init__(self, cfg: ImageClassifierConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        block = cfg.stack.block
        n, dtype = block.width, jnp.dtype(block.param_dtype)
        conv = lambda c_in, c_out, k, s, pad: nnx.Conv(
            c_in, c_out, k, strides=s, padding=pad, param_dtype=dtype, rngs=rngs
        )
        if cfg.stem == "patch":
            p = cfg.patch_size
            self.stem = nnx.List([conv(cfg.channels, n, (p, p), p, "VALID")])
        else:
            widths = [cfg.channels] + [
                max(n // 2 ** (cfg.conv_layers - 1 - i), 1) for i in range(cfg.conv_layers)
            ]
            self.stem = nnx.List(
                [conv(a, b, (3, 3), 2, "SAME") for a, b in zip(widths[:-1], widths[1:])]
            )
        self.pos = (
            nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.num_tokens, n), dtype))
            if cfg.pos_embedding else None
        )
        self.stack = Stack(block, cfg.stack.depth, rngs=rngs)
        self.norm = layer_norm_module(block, rngs=rngs) if cfg.final_norm else None
        self.head = dense(n, cfg.num_classes, init="standard", param_dtype=dtype, rngs=rngs)

    def tokens(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, m, n]`` (stem and position embedding)."""
        h = images
        for i, conv in enumerate(self.stem):
            h = conv(h)
            if i < len(self.stem) - 1:
                h = jax.nn.relu(h)
        h = h.reshape(h.shape[0], -1, h.shape[-1])
        if self.pos is not None:
            h = h + jnp.broadcast_to(self.pos[...], h.shape)
        return h

    def __call__(self, images: jax.Array) -> jax.Array:
        h = self.stack(self.tokens(images))
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h.mean(axis=-2))


class CausalLM(nnx.Module):
    """Tokens ``[B, L]`` (ints < vocab_size, ``L <= max_len``) -> logits ``[B, L, vocab]``.

    Embedding (+ learned positions) -> causally masked :class:`Stack` -> (LayerNorm) ->
    linear head. The causal mask is always applied; shaped attention centres row i over its
    i visible keys (``C_ij = 1/i``, :func:`shaped_attn.activations.centring_matrix`).
    """

    def __init__(self, cfg: CausalLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        block = cfg.stack.block
        n, dtype = block.width, jnp.dtype(block.param_dtype)
        self.embed = nnx.Embed(cfg.vocab_size, n, param_dtype=dtype, rngs=rngs)
        self.pos = (
            nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.max_len, n), dtype))
            if cfg.pos_embedding else None
        )
        self.stack = Stack(block, cfg.stack.depth, rngs=rngs)
        self.norm = layer_norm_module(block, rngs=rngs) if cfg.final_norm else None
        self.head = dense(n, cfg.vocab_size, init="standard", param_dtype=dtype, rngs=rngs)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        schedule: Optional[Mapping[str, jax.Array]] = None,
        return_attention: bool | str = False,
    ):
        """Logits ``[B, L, vocab]``; with ``return_attention`` also the :class:`StackOutput`
        (attention ``[depth, B, H, L, L]``). ``schedule``: see :meth:`Stack.__call__`."""
        length = tokens.shape[-1]
        if length > self.cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.cfg.max_len}")
        h = self.embed(tokens)
        if self.pos is not None:
            h = h + jnp.broadcast_to(self.pos[:length], h.shape)
        res = self.stack(h, functional.causal_mask(length), schedule=schedule,
                         return_attention=return_attention)
        h = res.output if return_attention else res
        if self.norm is not None:
            h = self.norm(h)
        logits = self.head(h)
        return (logits, res) if return_attention else logits
