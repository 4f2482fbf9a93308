"""Shaped attention, periodic and polynomial attention activations (Flax NNX).

The names below load on first use (``import shaped_attn`` is cheap; flax is imported only
where modules are built).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_SUBMODULES = ("activations", "functional", "flax_interop")
_EXPORTS = {
    "attention_fn": ".flax_interop",
    "KVCache": ".functional",
    "BlockMaps": ".functional",
    **{name: ".config" for name in (
        "AttentionConfig", "BlockConfig", "StackConfig", "ImageClassifierConfig", "CausalLMConfig", "Ramp",
        "recover_schedule", "shaped_config", "unshaped_config", "pre_ln_config", "post_ln_config")},
    "MultiHeadAttention": ".attention",
    "Block": ".blocks",
    **{name: ".models" for name in ("Stack", "StackOutput", "ImageClassifier", "CausalLM")},
}

__all__ = [*_SUBMODULES, *_EXPORTS]


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    else:
        raise AttributeError(f"module 'shaped_attn' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # static analysers see the names; at run time they load lazily
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
