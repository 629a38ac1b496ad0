"""LLM-FP4 (Liu et al., EMNLP 2023): floating-point post-training quantization with a searched
format and exponent bias per layer, and per-channel activation quantization through pre-shifted
exponent biases folded into the weights. Pure torch (+ kernels/)."""

from compression.fp4.formats import (
    FPFormat,
    bias_for_max,
    decode,
    encode,
    fake_quant,
    formats_for_bits,
    max_value,
    parse_format,
    representable_values,
)
from compression.fp4.search import METHODS, LayerQuant, QuantSetting, SearchGrid, quantize_layer

__all__ = [
    "FPFormat",
    "bias_for_max",
    "decode",
    "encode",
    "fake_quant",
    "formats_for_bits",
    "max_value",
    "parse_format",
    "representable_values",
    "METHODS",
    "LayerQuant",
    "QuantSetting",
    "SearchGrid",
    "quantize_layer",
]
