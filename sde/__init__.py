"""The covariance SDE of the shaped Transformer and finite-network Monte Carlo.

Noci et al., "The Shaped Transformer" (arXiv 2306.17759); Li, Nica, Roy, "The Neural Covariance
SDE" (arXiv 2206.02768). See spec/sde.md for the formulas.

- :mod:`sde.params`: :class:`SDEParams` (validated, frozen; owns the block coefficients).
- :mod:`sde.coefficients`: drift and diffusion matrix as pure functions of ``V``.
- :mod:`sde.noise`: structured O(m^3) noise and the generic square-root route.
- :mod:`sde.solve`: diffrax Euler integration, vmapped over paths, with stopping.
- :mod:`sde.finite`: Monte Carlo of finite networks (Gram sampler and real weights).
- :mod:`sde.compare`: agreement statistics (KS, Wasserstein-1, quantiles with errors).
- :mod:`sde.estimator`: one-layer estimates of any block's drift and diffusion, with SEs and a
  width extrapolation (:func:`estimate_coefficients`).
- :mod:`sde.activation_constants`: ``a1, a2`` of a row-normalised attention activation
  (``SDEParams(activation=...)``; docs/general_activation_sde.md).
- :mod:`sde.smooth_mlp`: shaped MLPs with a smooth activation (``SDEParams(mlp_activation=...)``).
"""

from . import compare, finite
from .finite import FiniteResult, FiniteSampler, simulate_finite

from .coefficients import (
    acal,
    arccos,
    attention_bracket,
    attention_gram,
    centre,
    correlation,
    correlation_diffusion,
    correlation_drift,
    diffusion_matrix,
    drift,
    drift_attention,
    drift_mlp,
    drift_relu,
    num_upper,
    relu_nu,
    sigma_lin,
    sym_index,
    sym_to_vec,
    symmetrize,
    upper_indices,
    vec_to_sym,
)
from .noise import (
    attention_factor,
    eigh_factor,
    factor_and_check,
    generic_noise,
    noise_dim,
    noise_from_normals,
    psd_factor,
    sample_noise,
    sample_noise_generic,
    structured_noise,
    structured_noise_sym,
)
from .params import BLOCKS, HEAD_LAYOUTS, SOFTMAX, AttentionConstants, SDEParams
from . import activation_constants, estimator, smooth_mlp
from .activation_constants import ActivationExpansion, expansion, expansion_table
from .estimator import (
    AttentionTransition,
    CoefficientEstimate,
    GramTransition,
    estimate_coefficients,
    extrapolate,
)
from .smooth_mlp import SMOOTH_ACTIVATIONS, drift_smooth, mlp_constants, smooth_mlp_layer
from .solve import (
    CorrelationSolution,
    GridBrownianPath,
    SDESolution,
    StructuredDiffusionTerm,
    brownian_grid,
    check_state,
    solve,
    solve_correlation,
    solve_drift,
    stop_test,
    time_grid,
)

__all__ = [
    "ActivationExpansion",
    "AttentionTransition",
    "CoefficientEstimate",
    "GramTransition",
    "HEAD_LAYOUTS",
    "SMOOTH_ACTIVATIONS",
    "activation_constants",
    "drift_mlp",
    "drift_smooth",
    "estimate_coefficients",
    "estimator",
    "expansion",
    "expansion_table",
    "extrapolate",
    "mlp_constants",
    "smooth_mlp",
    "smooth_mlp_layer",
    "compare",
    "finite",
    "FiniteResult",
    "FiniteSampler",
    "simulate_finite",
    "AttentionConstants",
    "BLOCKS",
    "CorrelationSolution",
    "GridBrownianPath",
    "SDEParams",
    "SDESolution",
    "SOFTMAX",
    "StructuredDiffusionTerm",
    "acal",
    "arccos",
    "attention_bracket",
    "brownian_grid",
    "check_state",
    "attention_factor",
    "attention_gram",
    "centre",
    "correlation",
    "correlation_diffusion",
    "correlation_drift",
    "diffusion_matrix",
    "drift",
    "drift_attention",
    "drift_relu",
    "eigh_factor",
    "factor_and_check",
    "generic_noise",
    "noise_dim",
    "noise_from_normals",
    "num_upper",
    "psd_factor",
    "relu_nu",
    "sample_noise",
    "sample_noise_generic",
    "sigma_lin",
    "solve",
    "solve_correlation",
    "solve_drift",
    "stop_test",
    "structured_noise",
    "structured_noise_sym",
    "sym_index",
    "sym_to_vec",
    "symmetrize",
    "time_grid",
    "upper_indices",
    "vec_to_sym",
]
