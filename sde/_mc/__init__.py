"""Finite-network Monte Carlo (docs/samplers.md): the network's inputs, the map factories of
the Gram and reduced samplers, the samplers themselves, the one-layer transitions of the
estimator and the activation-name bridge. Builds on :mod:`shaped_attn` (the block equations)
and on :mod:`sde._theory` only for the activation constants."""
