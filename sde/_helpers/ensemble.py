"""The one result type of every Monte Carlo ensemble: SDE paths and finite networks alike."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Ensemble(NamedTuple):
    """Samples of a state over time, with stopping (docs/stopping.md §2-3); a pytree.

    Attributes:
      t: ``(K,)`` save times (``l / n`` for the layers of a finite network).
      V: ``(S, K, m, m)`` states at those times (``(S, K)`` for the scalar correlation SDE);
        a stopped sample keeps its last good state from its stop on, so nothing is NaN.
      stopped: ``(S,)`` bool, True for samples that were stopped.
      stop_time: ``(S,)`` the first time at which the sample failed the stopping test;
        ``inf`` for samples that never stopped.
    """

    t: object
    V: object
    stopped: object
    stop_time: object

    @property
    def stopped_fraction(self) -> float:
        """Fraction of samples that were stopped (0 for an empty ensemble)."""
        s = np.asarray(self.stopped, dtype=bool)
        return float(s.mean()) if s.size else 0.0

    @property
    def num_samples(self) -> int:
        return int(np.shape(self.stopped)[0])

    def to_numpy(self) -> "Ensemble":
        """The same ensemble with host (NumPy) arrays."""
        return Ensemble(*(np.asarray(x) for x in self))
