"""Bit packing and the kernels that run packed low-bit weights.

- :mod:`.packing`: the storage layout (row-wise 32-bit words, little-endian bit stream, stored
  fields ``code XOR 2**(b-1)``), pack/unpack, bit-exact for widths 1..8.
- :mod:`.modules`: ``PackedWeight`` (the stored tensors), ``QuantLinear`` (explicit backend),
  ``QuantConv2d``, ``QuantEmbedding``.
- :mod:`.backends`: the backend names, availability, which backend can run which layer.
- :mod:`.cpu`: torch's fused int8 / int4 CPU matmul ops.
- :mod:`.triton_kernels`: Triton GEMV / GEMM / dequantize kernels (imports triton).
- :mod:`.cupy_backend`: the CuPy RawKernel dequantize-GEMV and its NVRTC compile.
- :mod:`.checks`: what every Triton / CuPy launch is checked against (``KernelOperands``:
  layout, device, int32 offsets) and the float error bound kernels are tested against.

Importing this package imports neither triton nor cupy.
"""
