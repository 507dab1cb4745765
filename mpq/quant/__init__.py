"""The quantizer math as pure functions: storage types and grids (:mod:`.core`), round to
nearest (:mod:`.rtn`), the error-minimizing scale search (:mod:`.mse`), activation fake
quantization (:mod:`.act_quant`). GPTQ is
:mod:`mpq.gptq`; :mod:`mpq.quantize` is the one place that dispatches on a format's method."""
