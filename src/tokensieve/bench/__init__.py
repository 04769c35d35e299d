"""Speed and memory benchmark: measured TTFT/TPOT against `transformers` and our dense path, and the ideal."""

from .costs import decode_bytes, ideal_decode_speedup, ideal_prefill_speedup, prefill_flops
from .report import load_accuracy, records, table
from .runner import Sample, Series, build_prompt, measure

__all__ = [
    "Sample",
    "Series",
    "build_prompt",
    "decode_bytes",
    "ideal_decode_speedup",
    "ideal_prefill_speedup",
    "load_accuracy",
    "measure",
    "prefill_flops",
    "records",
    "table",
]
