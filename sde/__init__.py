"""The covariance SDE of the shaped Transformer and the finite networks it describes.

Noci et al., "The Shaped Transformer" (arXiv 2306.17759); Li, Nica, Roy, "The Neural Covariance
SDE" (arXiv 2206.02768). The theory is in ``docs/`` (start at docs/README.md).

Layers, each importing only from those before it (private sub-packages):

- ``_helpers``: symmetric-index maps, PSD factors, the Wishart/Bartlett sampler, keys, chunks
  and sharding, runs over several processes, validation, the :class:`Ensemble` result;
- ``_theory``: activation constants, :class:`SDEParams`, drift and diffusion, noise, the
  diffrax solve, the correlation SDE (never imports :mod:`shaped_attn`);
- ``_mc``: finite-network Monte Carlo (Gram, reduced and weight samplers, one-layer
  transitions);
- ``_estimator``, ``_compare``: one-layer coefficient estimates, agreement statistics;
- ``_experiment``: the finite-vs-SDE experiment behind ``scripts/sde_vs_finite.py``.

The public API is the names below, loaded on first use (``import sde`` is cheap).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    # theory
    "SDEParams": "._theory.params",
    "ActivationExpansion": "._theory.constants",
    "drift": "._theory.coefficients",
    "diffusion_matrix": "._theory.coefficients",
    "correlation": "._theory.coefficients",
    "sample_noise": "._theory.noise",
    "solve": "._theory.solve",
    "solve_correlation": "._theory.correlation",
    "GridBrownianPath": "._theory.diffrax_terms",
    "StructuredDiffusionTerm": "._theory.diffrax_terms",
    # results and layouts
    "Ensemble": "._helpers.ensemble",
    "sym_to_vec": "._helpers.symmetric",
    "vec_to_sym": "._helpers.symmetric",
    "join_processes": "._helpers.processes",
    # finite networks
    "expansion": "._mc.activations",
    "FiniteSampler": "._mc.sampler",
    "simulate_finite": "._mc.sampler",
    "GramTransition": "._mc.transitions",
    "AttentionTransition": "._mc.transitions",
    "smooth_mlp_layer": "._mc.transitions",
    # estimates and comparisons
    "estimate_coefficients": "._estimator",
    "CoefficientEstimate": "._estimator",
    "compare_samples": "._compare",
    "compare_moments": "._compare",
    "band": "._compare",
    # the experiment
    "ExperimentConfig": "._experiment.config",
    "ExperimentResult": "._experiment.run",
    "run_experiment": "._experiment.run",
    "check_resources": "._experiment.resources",
    "ResourcePlan": "._experiment.resources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sde' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # static analysers see the names; at run time they load lazily
    from ._compare import band, compare_moments, compare_samples
    from ._estimator import CoefficientEstimate, estimate_coefficients
    from ._experiment.config import ExperimentConfig
    from ._experiment.resources import ResourcePlan, check_resources
    from ._experiment.run import ExperimentResult, run_experiment
    from ._helpers.ensemble import Ensemble
    from ._helpers.processes import join_processes
    from ._helpers.symmetric import sym_to_vec, vec_to_sym
    from ._mc.activations import expansion
    from ._mc.sampler import FiniteSampler, simulate_finite
    from ._mc.transitions import AttentionTransition, GramTransition, smooth_mlp_layer
    from ._theory.coefficients import correlation, diffusion_matrix, drift
    from ._theory.constants import ActivationExpansion
    from ._theory.correlation import solve_correlation
    from ._theory.diffrax_terms import GridBrownianPath, StructuredDiffusionTerm
    from ._theory.noise import sample_noise
    from ._theory.params import SDEParams
    from ._theory.solve import solve
