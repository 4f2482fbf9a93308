"""Shaped attention, periodic and polynomial attention activations (Flax NNX)."""
