"""Specs: what a person writes (experiments, sweeps, datasets, params.yaml), validated with clear errors."""
