"""The covariance SDE of the shaped Transformer and finite-network Monte Carlo."""
