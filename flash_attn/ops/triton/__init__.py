"""Triton kernels of the fused operations (our own; Triton compiles them at first use)."""
