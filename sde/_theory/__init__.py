"""The covariance SDE (docs/sde.md, docs/noise.md): activation constants, :class:`SDEParams`,
drift and diffusion, structured noise, the diffrax solve and the correlation SDE. Imports only
:mod:`sde._helpers`, never :mod:`shaped_attn` or the Monte Carlo."""
