"""The quantizer math as pure functions: storage types and grids (:mod:`.core`), round to
nearest (:mod:`.rtn`), the error-minimizing scale search (:mod:`.mse`; :mod:`.mse_dq` on
double-quantized scales), double-quantized scales (:mod:`.dq`), GPTQ (:mod:`.gptq`), activation
fake quantization (:mod:`.act_quant`); :mod:`.quantize` is the one place that dispatches on a
format's method."""
