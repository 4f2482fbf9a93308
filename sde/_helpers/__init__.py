"""Helpers shared by every layer of :mod:`sde`: symmetric-index maps, PSD factors, the
Wishart/Bartlett sampler, chunked and sharded mapping over samples, input validation and the
ensemble result type. Nothing here imports the theory, the samplers or :mod:`shaped_attn`."""
