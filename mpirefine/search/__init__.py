"""Pose search: the coarse-to-fine likelihood search, its plan per resolution,
the likelihood terms as matrix products, and symmetry relaxation."""
