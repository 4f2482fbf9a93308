"""Shaped attention, periodic and polynomial attention activations (Flax NNX)."""

from . import activations, functional
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
from .functional import BlockMaps
from .models import CausalLM, ImageClassifier, Stack, StackOutput

__all__ = [
    "activations",
    "functional",
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
