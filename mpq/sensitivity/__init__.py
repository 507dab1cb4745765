"""Sensitivity estimators: how much each layer (at each format) hurts the model when quantized."""
