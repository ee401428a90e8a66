"""Triton kernels of the GPU path."""
