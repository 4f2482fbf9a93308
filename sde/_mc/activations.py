"""The attention activations of :mod:`shaped_attn.activations` as the theory sees them: their
small-score expansion constants ``a1, a2`` (docs/general_activation_sde.md), looked up by
registered name. The theory (:mod:`sde._theory.constants`) takes the functions; this is the
one place where names are resolved."""

from __future__ import annotations

from typing import Callable, Union

from shaped_attn import activations

from .._theory.constants import ActivationExpansion, expansion_of


def expansion(activation: Union[str, Callable]) -> ActivationExpansion:
    """``a1, a2`` of a registered activation name or a callable ``fn(scores, mask=None)``
    (cached); pass it as ``SDEParams(activation=...)``.

    Raises:
      ValueError: for an unknown name (listing the registered ones) or an activation without
        a small-score expansion of the row-normalised form, saying why.
    """
    if isinstance(activation, str):
        return expansion_of(activations.get(activation), activation)
    return expansion_of(activation, "")


def expansion_table() -> dict[str, Union[ActivationExpansion, str]]:
    """For every registered activation: its :class:`ActivationExpansion`, or why it has none."""
    out: dict[str, Union[ActivationExpansion, str]] = {}
    for name in activations.names():
        try:
            out[name] = expansion(name)
        except ValueError as err:
            out[name] = str(err)
    return out
