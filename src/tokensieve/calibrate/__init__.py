"""Calibration on the user's own model: OmniKV's filter layers (`filters`) and the pruning schedules of
SlimInfer and LazyLLM (`pruning`, its candidate settings in `grid`). `output` is what both write with."""

from .filters import (
    PAPER_TOP_K_FRACTION,
    AttentionRecorder,
    RecordAttention,
    calibrate,
    capture_curve,
    capture_matrix,
    load_prompts,
    plot,
    recommend_filters,
    record,
)

__all__ = [
    "PAPER_TOP_K_FRACTION",
    "AttentionRecorder",
    "RecordAttention",
    "calibrate",
    "capture_curve",
    "capture_matrix",
    "load_prompts",
    "plot",
    "recommend_filters",
    "record",
]
