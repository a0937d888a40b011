"""Quantization for precision scaling-law experiments (docs/precision.md).

`formats`: parse format strings (none, int<b>, e<x>m<y>) and fake-quantize tensors in float32 with a
straight-through gradient, per tensor / channel / token / block. `gptq`: post-training weight quantization
(GPTQ and the round-to-nearest baseline) with the same quantizers.
"""
