"""The LeViT-like image classifier of the periodic-softmax paper, and a small ViT.

Wang, Liu, Liu (arXiv 2108.07153) compare attention activations on a LeViT-like network
(Graham et al., arXiv 2104.01136): a small convolutional stem of stride-2 convolutions
turning the image into a grid of tokens (16 tokens for 32x32 inputs), one or two attention
blocks of width 512 with 8 heads of 64, a learned relative position bias added to the
attention scores, average pooling and a linear head. :class:`LeViT` is that network, built
from the module family (:class:`shaped_attn.models.Stack` of :class:`shaped_attn.blocks.Block`),
with any registered activation (the ``norm_`` names give the pre-normalised variants) and
any depth (2 as in the paper, 8-12 for the deeper setting).

Differences from the paper's code, on purpose: the relative position bias is per layer and
per head over ``(|dx|, |dy|)`` offsets as in LeViT; the stem uses ReLU between convolutions
(LeViT: Hardswish and batch norm); blocks are the family's pre-LN blocks unless another
:class:`~shaped_attn.config.BlockConfig` is given.

The "small ViT" is the family's :class:`shaped_attn.models.ImageClassifier` with a patch
stem (:func:`vit_config`). :func:`forward` runs either model and returns the logits with the
hidden states and attention matrices of every layer; :func:`classifier_loss` and
:func:`classifier_eval` are the loss and evaluation functions of
:func:`shaped_attn.training.train`, with per-layer diagnostics computed inside the step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import diagnostics, training
from .attention import dense
from .blocks import layer_norm_module
from .config import (
    ActivationLike,
    BlockConfig,
    ImageClassifierConfig,
    StackConfig,
    pre_ln_config,
)
from .models import ImageClassifier, Stack, StackOutput

Array = jax.Array


# ---------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LeViTConfig:
    """Conv stem -> ``grid x grid`` tokens -> ``depth`` blocks with relative position bias
    -> (LayerNorm) -> mean pool -> linear head.

    Attributes:
        block: the block config (width, heads, activation, kind, ...), shared by all layers.
        depth: number of attention blocks.
        num_classes: output classes.
        image_size: input side (images ``[B, image_size, image_size, channels]``).
        channels: input channels.
        grid: tokens per side; ``image_size / grid`` must be a power of two (the number of
            stride-2 convolutions). 32x32 -> 4x4 = 16 tokens with 3 convolutions; the 8x8
            digits -> 4x4 with one.
        relative_bias: add the learned relative position bias to the scores.
        final_norm: LayerNorm after the last block.
    """

    block: BlockConfig
    depth: int = 2
    num_classes: int = 10
    image_size: int = 32
    channels: int = 3
    grid: int = 4
    relative_bias: bool = True
    final_norm: bool = True

    def __post_init__(self):
        if not isinstance(self.block, BlockConfig):
            raise ValueError(f"block={self.block!r} must be a BlockConfig")
        for name in ("depth", "num_classes", "image_size", "channels", "grid"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        ratio = self.image_size // self.grid
        if self.image_size % self.grid or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(
                f"image_size / grid = {self.image_size}/{self.grid} must be a power of two >= 2"
            )

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def stem_layers(self) -> int:
        return int(round(math.log2(self.image_size // self.grid)))


def levit_config(
    activation: ActivationLike = "softmax",
    *,
    depth: int = 2,
    width: int = 512,
    num_heads: int = 8,
    mlp_ratio: int = 2,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
    grid: int = 4,
    init: str = "standard",
    block: Optional[BlockConfig] = None,
    **kwargs: Any,
) -> LeViTConfig:
    """The paper's LeViT-like model (width 512, 8 heads of 64, MLP ratio 2, depth 2) by
    default; every size is configurable. ``block`` overrides the pre-LN block built from
    ``activation``, ``width``, ``num_heads``, ``mlp_ratio`` and ``init``."""
    if block is None:
        block = pre_ln_config(
            width, num_heads=num_heads, activation=activation,
            mlp_hidden=mlp_ratio * width, init=init,
        )
    return LeViTConfig(
        block=block, depth=depth, num_classes=num_classes, image_size=image_size,
        channels=channels, grid=grid, **kwargs,
    )


def vit_config(
    activation: ActivationLike = "softmax",
    *,
    depth: int = 2,
    width: int = 64,
    num_heads: int = 4,
    mlp_ratio: int = 2,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
    patch_size: int = 4,
    init: str = "standard",
    block: Optional[BlockConfig] = None,
) -> ImageClassifierConfig:
    """A small ViT: the family's :class:`ImageClassifier` with a patch stem, learned
    positions, pre-LN blocks and a final LayerNorm."""
    if block is None:
        block = pre_ln_config(
            width, num_heads=num_heads, activation=activation,
            mlp_hidden=mlp_ratio * width, init=init,
        )
    return ImageClassifierConfig(
        stack=StackConfig(block, depth), num_classes=num_classes, image_size=image_size,
        channels=channels, stem="patch", patch_size=patch_size, pos_embedding=True,
        final_norm=True,
    )


def relative_position_index(grid: int) -> np.ndarray:
    """``[grid^2, grid^2]`` int: ``|dy| * grid + |dx|`` between the tokens of a grid
    (row-major), LeViT's attention-bias index."""
    yy, xx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    y, x = yy.reshape(-1), xx.reshape(-1)
    return (np.abs(y[:, None] - y[None, :]) * grid + np.abs(x[:, None] - x[None, :])).astype(np.int32)


# ---------------------------------------------------------------------------- model


class LeViT(nnx.Module):
    """Images ``[B, H, W, C]`` -> logits ``[B, num_classes]`` (see :class:`LeViTConfig`).

    Submodules: ``stem`` (stride-2 3x3 convolutions, channels doubling up to the width),
    ``stack`` (:class:`Stack`, parameters with a leading layer axis), ``relative_bias``
    (``nnx.Param [depth, H, grid^2]``, zero at init, so the model starts as if it had none),
    ``norm``, ``head``.
    """

    def __init__(self, cfg: LeViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        block = cfg.block
        n, dtype = block.width, jnp.dtype(block.param_dtype)
        k = cfg.stem_layers
        widths = [cfg.channels] + [max(n // 2 ** (k - 1 - i), 1) for i in range(k)]
        self.stem = nnx.List(
            [
                nnx.Conv(a, b, (3, 3), strides=2, padding="SAME", param_dtype=dtype, rngs=rngs)
                for a, b in zip(widths[:-1], widths[1:])
            ]
        )
        self.stack = Stack(block, cfg.depth, rngs=rngs)
        heads = block.attention.num_heads
        self.relative_bias = (
            nnx.Param(jnp.zeros((cfg.depth, heads, cfg.num_tokens), dtype))
            if cfg.relative_bias else None
        )
        self.norm = layer_norm_module(block, rngs=rngs) if cfg.final_norm else None
        self.head = dense(n, cfg.num_classes, init="standard", param_dtype=dtype, rngs=rngs)

    def tokens(self, images: Array) -> Array:
        """``[B, H, W, C]`` -> ``[B, grid^2, width]``."""
        h = images
        for i, conv in enumerate(self.stem):
            h = conv(h)
            if i < len(self.stem) - 1:
                h = jax.nn.relu(h)
        return h.reshape(h.shape[0], -1, h.shape[-1])

    def score_bias(self) -> Optional[Array]:
        """``[depth, H, m, m]`` relative position bias of every layer (``None`` if off)."""
        if self.relative_bias is None:
            return None
        idx = relative_position_index(self.cfg.grid)
        return self.relative_bias[...][:, :, idx]

    def features(
        self, images: Array, *, return_hidden: bool = False, return_attention: bool = False
    ) -> tuple[Array, StackOutput]:
        """Logits and a :class:`StackOutput` (hidden ``[depth+1, B, m, n]`` / attention
        ``[depth, B, H, m, m]`` when requested, else ``None``)."""
        x = self.tokens(images)
        bias = self.score_bias()
        graphdef, state = nnx.split(self.stack.layers)

        # The family's Stack shares one score_bias across layers; LeViT's bias is per
        # layer, so scan over the same layers with the bias as a scanned input.
        def step(h, inputs):
            layer_state, b = inputs
            layer = nnx.merge(graphdef, layer_state)
            h, att = layer(h, score_bias=b, return_attention=True)
            return h, (h if return_hidden else None, att if return_attention else None)

        if bias is None:
            bias = jnp.zeros((self.cfg.depth,), x.dtype)  # placeholder, scanned, unused
            step_fn = lambda h, inp: step(h, (inp[0], None))
        else:
            step_fn = step
        out, (hidden, attention) = jax.lax.scan(step_fn, x, (state, bias))
        if return_hidden:
            hidden = jnp.concatenate([x[None], hidden], axis=0)
        h = self.norm(out) if self.norm is not None else out
        logits = self.head(h.mean(axis=-2))
        return logits, StackOutput(out, hidden, attention)

    def __call__(self, images: Array) -> Array:
        return self.features(images)[0]


def build(cfg: LeViTConfig | ImageClassifierConfig, seed: int = 0) -> nnx.Module:
    """A :class:`LeViT` or :class:`ImageClassifier` from its config, initialised from ``seed``."""
    rngs = nnx.Rngs(params=seed)
    if isinstance(cfg, LeViTConfig):
        return LeViT(cfg, rngs=rngs)
    if isinstance(cfg, ImageClassifierConfig):
        return ImageClassifier(cfg, rngs=rngs)
    raise ValueError(f"cfg must be a LeViTConfig or ImageClassifierConfig, got {type(cfg).__name__}")


# ------------------------------------------------------------------- forward and losses


def forward(
    model: nnx.Module, images: Array, *, return_hidden: bool = False, return_attention: bool = False
) -> tuple[Array, StackOutput]:
    """Logits and per-layer hidden states / attention of a :class:`LeViT` or the family's
    :class:`ImageClassifier` (same arithmetic as calling the model)."""
    if isinstance(model, LeViT):
        return model.features(images, return_hidden=return_hidden, return_attention=return_attention)
    if isinstance(model, ImageClassifier):
        want = return_hidden or return_attention
        res = model.stack(
            model.tokens(images), return_hidden=return_hidden, return_attention=return_attention
        )
        out = res.output if want else res
        h = model.norm(out) if model.norm is not None else out
        logits = model.head(h.mean(axis=-2))
        return logits, (res if want else StackOutput(out))
    raise ValueError(f"forward needs a LeViT or ImageClassifier, got {type(model).__name__}")


DIAGNOSTIC_EXAMPLES = 8
"""Examples of each batch on which the training step computes its diagnostics (they are
statistics of the forward pass's own attention and hidden states; a subset keeps their
cost, mainly the eigendecompositions of the effective rank, small)."""


def layer_diagnostics(stack_out: StackOutput, n_examples: int = DIAGNOSTIC_EXAMPLES) -> dict[str, Array]:
    """Per-layer scalars from a :class:`StackOutput` with hidden states and attention, on
    the first ``n_examples`` examples: attention Frobenius norm (raw and over ``sqrt(m)``),
    attention entropy (each ``[depth]``), token correlation and effective rank of the
    hidden states (``[depth+1]``, input first)."""
    out: dict[str, Array] = {}
    if stack_out.attention is not None:
        out.update(diagnostics.attention_summary(stack_out.attention[:, :n_examples]))
    if stack_out.hidden is not None:
        out.update(diagnostics.token_summary(stack_out.hidden[:, :n_examples]))
    return out


def classifier_loss(model: nnx.Module, batch: dict, key: Array) -> tuple[Array, dict]:
    """Cross-entropy of ``batch = {"x": images, "y": labels}`` with accuracy and the
    per-layer :func:`layer_diagnostics` as metrics (a :data:`training.LossFn`)."""
    del key
    logits, res = forward(model, batch["x"], return_hidden=True, return_attention=True)
    metrics = {"accuracy": training.accuracy(logits, batch["y"]), **layer_diagnostics(res)}
    return training.cross_entropy(logits, batch["y"]), metrics


def classifier_loss_plain(model: nnx.Module, batch: dict, key: Array) -> tuple[Array, dict]:
    """Cross-entropy and accuracy only (no diagnostics)."""
    del key
    logits = forward(model, batch["x"])[0]
    return training.cross_entropy(logits, batch["y"]), {"accuracy": training.accuracy(logits, batch["y"])}


def classifier_eval(model: nnx.Module, batch: dict) -> dict:
    """Loss and accuracy of a batch (an :data:`training.EvalFn`)."""
    logits = forward(model, batch["x"])[0]
    return {
        "loss": training.cross_entropy(logits, batch["y"]),
        "accuracy": training.accuracy(logits, batch["y"]),
    }
