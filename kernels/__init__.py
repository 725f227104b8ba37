"""Triton weight-gradient kernels, installed as ``tfz.kernels``."""
