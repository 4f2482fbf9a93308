"""Next-byte language modelling with the family's :class:`~shaped_attn.models.CausalLM` on
the shared training loop (:func:`shaped_attn.training.train`).

Batches are ``{"tokens": int32 [B, L + 1], "step": int32}`` (:func:`with_steps` adds the
step to :mod:`shaped_attn.text_data`'s batches). The step sets the scheduled knobs of the
blocks (:func:`shaped_attn.functional.scheduled_values`) inside the jitted step, so a
schedule costs no recompilation.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import diagnostics, functional, training
from .models import CausalLM

Array = jax.Array

DIAGNOSTIC_EXAMPLES = 4
"""Examples of each batch on which the training step measures attention entropy."""


def with_steps(batches: Iterable[dict], start: int = 0) -> Iterator[dict]:
    """``batches`` with ``"step": start, start + 1, ...`` added (the optimiser step index)."""
    for step, batch in enumerate(batches, start):
        yield {**batch, "step": np.int32(step)}


def schedule(model: CausalLM, step: Array) -> Optional[dict[str, Array]]:
    """Values of the model's scheduled knobs at ``step`` (``None`` when nothing is scheduled)."""
    block = model.cfg.stack.block
    return functional.scheduled_values(block, step) if block.schedule else None


def forward(model: CausalLM, batch: dict, *, return_attention: bool | str = False):
    """Logits of ``tokens[:, :-1]`` (and the stack output) at the batch's step."""
    return model(batch["tokens"][:, :-1], schedule=schedule(model, batch["step"]),
                 return_attention=return_attention)


def learned_knobs(model: CausalLM) -> dict[str, Array]:
    """``knob/<name>``: the mean over layers of each learned knob (empty when none)."""
    learned = model.stack.layers.learned
    return {} if learned is None else {f"knob/{k}": jnp.mean(p[...]) for k, p in learned.items()}


def loss(model: CausalLM, batch: dict, key: Array) -> tuple[Array, dict[str, Array]]:
    """Mean next-byte cross-entropy, with the per-layer attention entropy ``attn_entropy``
    ``[depth]`` (row entropy of the activation's weights, before any shaping, averaged over
    rows, heads and the first :data:`DIAGNOSTIC_EXAMPLES` examples) and the learned knobs as
    metrics (a :data:`shaped_attn.training.LossFn`)."""
    del key
    logits, res = forward(model, batch, return_attention="activation")
    tokens = batch["tokens"]
    probs = res.attention[:, :DIAGNOSTIC_EXAMPLES]
    mask = functional.causal_mask(probs.shape[-1])
    entropy = diagnostics.attention_entropy(probs, mask)
    metrics = {"attn_entropy": jnp.mean(entropy.reshape(entropy.shape[0], -1), axis=-1),
               **learned_knobs(model)}
    return training.cross_entropy(logits, tokens[:, 1:]), metrics


def evaluate(model: CausalLM, batch: dict) -> dict[str, Array]:
    """``{"loss": mean next-byte cross-entropy}`` (a :data:`shaped_attn.training.EvalFn`)."""
    return {"loss": training.cross_entropy(forward(model, batch), batch["tokens"][:, 1:])}


def init_gradient_norms(model: CausalLM, batch: dict, names=("query", "value")) -> dict[str, Any]:
    """Per-layer gradient norms of :func:`loss` on ``batch`` at the current parameters
    (:func:`shaped_attn.diagnostics.init_gradient_norms`): ``{name: [depth]}``."""
    return diagnostics.init_gradient_norms(model, lambda m: loss(m, batch, None)[0], names)


SAMPLE_TEMPERATURE = 0.8
"""Sampling temperature of :func:`sample_text`."""


def sample_text(
    model: CausalLM,
    prompt: bytes,
    steps: int,
    key: Array,
    *,
    temperature: float = SAMPLE_TEMPERATURE,
    step: Optional[int] = None,
) -> str:
    """``prompt`` continued by ``steps`` sampled bytes (:meth:`CausalLM.generate`, KV-cached),
    decoded as UTF-8 with invalid bytes replaced. ``step``: the training step whose scheduled
    knob values the model uses (e.g. the last one; ignored when nothing is scheduled)."""
    if not isinstance(prompt, (bytes, bytearray)) or not prompt:
        raise ValueError(f"prompt={prompt!r} must be non-empty bytes")
    tokens = jnp.asarray(np.frombuffer(bytes(prompt), np.uint8).astype(np.int32))[None]
    knobs = schedule(model, jnp.asarray(0 if step is None else step))
    out = model.generate(tokens, steps, key, temperature, schedule=knobs)
    return bytes(np.asarray(out[0], np.uint8)).decode("utf-8", errors="replace")
