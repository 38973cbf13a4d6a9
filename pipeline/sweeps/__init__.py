"""Sweeps: Optuna studies across architectures, their trials and their report."""
