"""Shipping a plan: the quantized model's tensors and its plan, in files other tools read."""
