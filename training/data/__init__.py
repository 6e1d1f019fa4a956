"""Datasets, samplers, SARE noise and synthetic scenes for training."""
