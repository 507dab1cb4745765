"""Bit packing and the kernels that run packed low-bit weights."""
