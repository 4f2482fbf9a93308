"""The covariance SDE of the shaped Transformer and finite-network Monte Carlo.

Noci et al., "The Shaped Transformer" (arXiv 2306.17759); Li, Nica, Roy, "The Neural Covariance
SDE" (arXiv 2206.02768). See spec/sde.md for the formulas.

- :mod:`sde.params`: :class:`SDEParams` (validated, frozen; owns the block coefficients).
- :mod:`sde.coefficients`: drift and diffusion matrix as pure functions of ``V``.
- :mod:`sde.noise`: structured O(m^3) noise and the generic square-root route.
- :mod:`sde.solve`: diffrax Euler integration, vmapped over paths, with stopping.
- :mod:`sde.finite`: Monte Carlo of finite networks (Gram sampler and real weights).
- :mod:`sde.compare`: agreement statistics (KS, Wasserstein-1, quantiles with errors).
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
from .params import BLOCKS, SOFTMAX, AttentionConstants, SDEParams
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
