"""Stacks of blocks (a scan over layers) and two model heads: an image classifier and a
causal language model (Flax NNX).

``Stack`` creates its ``depth`` blocks with ``nnx.vmap`` over split keys, so every parameter
carries a leading layer axis, and applies them with ``jax.lax.scan`` over the split
graphdef/state: compile time does not grow with depth. With a KV cache (``Stack.init_cache``,
``CausalLM.init_cache``) the same scan decodes new tokens against the cached keys and values of
every layer: ``CausalLM.decode`` and ``CausalLM.generate``.
"""

from __future__ import annotations

import functools
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

    def init_cache(self, batch_shape: tuple, max_len: int, dtype=None) -> functional.KVCache:
        """An empty KV cache for ``max_len`` positions of inputs ``[*batch_shape, L, n]``: a
        :class:`functional.KVCache` whose arrays have a leading layer axis of size ``depth``."""
        if not self.cfg.has_attention:
            raise ValueError(f"sublayers={self.cfg.sublayers!r} has no attention to cache")
        dtype = jnp.dtype(self.cfg.param_dtype) if dtype is None else dtype
        one = functional.init_kv_cache(self.cfg.attention, tuple(batch_shape), max_len, dtype)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.depth, *a.shape)), one)

    def __call__(
        self,
        x: jax.Array,
        mask: Optional[jax.Array] = None,
        *,
        score_bias: Optional[jax.Array] = None,
        schedule: Optional[Mapping[str, jax.Array]] = None,
        return_hidden: bool = False,
        return_attention: bool | str = False,
        cache: Optional[functional.KVCache] = None,
    ):
        """Apply the blocks to ``x: [..., m, n]``.

        ``mask`` / ``score_bias`` / ``schedule`` (scheduled knob values,
        :func:`functional.scheduled_values`) are shared by all layers. Returns ``x_depth``
        when no ``return_*`` flag is set, otherwise a :class:`StackOutput`
        (``return_attention="activation"``: attention weights before the shaping step).

        ``cache`` (from :meth:`init_cache`): causal decoding, ``x`` holds the tokens at
        positions ``cache.index ..`` (see :func:`functional.attention_apply`); the result is
        then ``(that, new_cache)``.

        The scan reads the layers' state and does not write it back: fine for parameters;
        a block with mutable state (dropout RNG counters, running statistics) would need the
        updated state returned from the scan.
        """
        graphdef, state = nnx.split(self.layers)

        def step(h, xs):
            layer_state, layer_cache = xs
            layer = nnx.merge(graphdef, layer_state)
            if layer_cache is None:
                h, att = layer(h, mask, score_bias=score_bias, schedule=schedule,
                               return_attention=return_attention or True)
            else:  # the block's own equations, with its maps and knobs, and the cache
                (h, att), layer_cache = functional.block_apply(
                    layer.cfg, h, maps=layer.maps(), mask=mask, score_bias=score_bias,
                    knobs=layer.knobs(schedule), return_attention=return_attention or True,
                    cache=layer_cache,
                )
            ys = (h if return_hidden else None, att if return_attention else None)
            return h, (ys, layer_cache)

        out, ((hidden, attention), new_cache) = jax.lax.scan(step, x, (state, cache))
        if not (return_hidden or return_attention):
            result = out
        else:
            if return_hidden:
                hidden = jnp.concatenate([x[None], hidden], axis=0)
            result = StackOutput(out, hidden, attention)
        return result if cache is None else (result, new_cache)


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

    def init_cache(self, batch_size: int, max_len: Optional[int] = None) -> functional.KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` tokens
        (default and maximum: ``cfg.max_len``), for :meth:`decode`."""
        max_len = self.cfg.max_len if max_len is None else max_len
        if not isinstance(max_len, int) or isinstance(max_len, bool) or not 1 <= max_len <= self.cfg.max_len:
            raise ValueError(f"max_len={max_len!r} must be an integer in [1, {self.cfg.max_len}]")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
        return self.stack.init_cache((batch_size,), max_len)

    def decode(
        self,
        tokens: jax.Array,
        cache: functional.KVCache,
        *,
        schedule: Optional[Mapping[str, jax.Array]] = None,
    ) -> tuple[jax.Array, functional.KVCache]:
        """Logits ``[B, L, vocab]`` of ``tokens [B, L]`` placed at positions ``cache.index ..
        cache.index + L - 1`` after the cached ones, and the updated cache.

        Decoding a sequence in pieces (a prompt, then one token at a time) gives the logits of
        the full causal forward pass, shaped attention included: each query's ``I`` and ``C``
        rows use its absolute position (``docs/activations.md``, "Shaped attention with a KV
        cache"). The caller keeps ``cache.index + L <= max_len`` of the cache.
        """
        length = tokens.shape[-1]
        start = cache.index[0]  # the same in every layer
        h = self.embed(tokens)
        if self.pos is not None:
            pos = jax.lax.dynamic_slice_in_dim(self.pos[...], start, length, axis=0)
            h = h + jnp.broadcast_to(pos, h.shape)
        h, cache = self.stack(h, schedule=schedule, cache=cache)
        if self.norm is not None:
            h = self.norm(h)
        return self.head(h), cache

    def generate(
        self,
        prompt: jax.Array,
        steps: int,
        key: jax.Array,
        temperature: float = 1.0,
        *,
        schedule: Optional[Mapping[str, jax.Array]] = None,
    ) -> jax.Array:
        """``[B, P + steps]``: ``prompt [B, P]`` followed by ``steps`` sampled tokens.

        The prompt is decoded in one piece into a KV cache, then each new token is drawn from
        ``softmax(logits / temperature)`` (``temperature = 0``: the most likely token) with
        the key ``fold_in(key, i)`` and decoded against the cache. One compiled program
        (``jax.jit``) per model structure, prompt shape, ``steps`` and ``temperature``.
        ``schedule``: scheduled knob values, e.g. those at the end of training.
        """
        prompt = jnp.asarray(prompt)
        if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
            raise ValueError(f"prompt must be an integer array [batch, length >= 1], got {prompt.dtype} {prompt.shape}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"steps={steps!r} must be an integer >= 0")
        if prompt.shape[1] + steps > self.cfg.max_len:
            raise ValueError(
                f"steps={steps} plus the prompt length {prompt.shape[1]} exceeds max_len={self.cfg.max_len}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not 0 <= temperature < float("inf"):
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0")
        graphdef, state = nnx.split(self)
        return _generate(graphdef, state, prompt, key, schedule, steps=steps, temperature=float(temperature))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "temperature"))
def _generate(graphdef, state, prompt, key, schedule, *, steps: int, temperature: float):
    """The body of :meth:`CausalLM.generate` (arguments checked there)."""
    model = nnx.merge(graphdef, state)
    batch, length = prompt.shape
    cache = model.init_cache(batch, length + steps) if steps else None
    if cache is None:
        return prompt
    logits, cache = model.decode(prompt, cache, schedule=schedule)

    def sample(i, last):
        if temperature == 0:
            return jnp.argmax(last, axis=-1).astype(prompt.dtype)
        k = jax.random.fold_in(key, i)
        return jax.random.categorical(k, last / temperature, axis=-1).astype(prompt.dtype)

    def step(carry, i):
        cache, last = carry
        token = sample(i, last)
        logits, cache = model.decode(token[:, None], cache, schedule=schedule)
        return (cache, logits[:, -1]), token

    _, tokens = jax.lax.scan(step, (cache, logits[:, -1]), jnp.arange(steps))
    return jnp.concatenate([prompt, tokens.T], axis=1)
