"""Shaped attention, periodic and polynomial attention activations (Flax NNX)."""

from . import activations, flax_interop, functional
from .attention import MultiHeadAttention
from .blocks import Block
from .config import (
    AttentionConfig,
    BlockConfig,
    CausalLMConfig,
    ImageClassifierConfig,
    Ramp,
    StackConfig,
    post_ln_config,
    pre_ln_config,
    recover_schedule,
    shaped_config,
    unshaped_config,
)
from .flax_interop import attention_fn
from .functional import BlockMaps, KVCache
from .models import CausalLM, ImageClassifier, Stack, StackOutput

__all__ = [
    "activations",
    "functional",
    "flax_interop",
    "attention_fn",
    "KVCache",
    "AttentionConfig",
    "BlockConfig",
    "StackConfig",
    "ImageClassifierConfig",
    "CausalLMConfig",
    "Ramp",
    "recover_schedule",
    "shaped_config",
    "unshaped_config",
    "pre_ln_config",
    "post_ln_config",
    "BlockMaps",
    "MultiHeadAttention",
    "Block",
    "Stack",
    "StackOutput",
    "ImageClassifier",
    "CausalLM",
]
