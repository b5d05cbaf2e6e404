"""Synthetic data and scoring against the truth: test volumes from atomic
models, particle simulation, map and pose errors."""
