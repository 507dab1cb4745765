"""Shipping a plan: the quantized model's tensors and its plan, in files other tools read.

``mpq export`` (:mod:`mpq.export.command`) writes one of: the mpq format and a Hugging Face
folder (:mod:`mpq.export.mpq_format`, read back by :func:`mpq.load`), GGUF
(:mod:`mpq.export.gguf_writer`), llama.cpp ``--tensor-type`` overrides
(:mod:`mpq.export.llamacpp`) and compressed-tensors (:mod:`mpq.export.compressed`).
"""
