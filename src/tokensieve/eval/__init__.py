"""Evaluation: synthetic long-context tasks, LongBench data and metrics, fidelity vs dense, the eval runner."""

from .fidelity import Fidelity, fidelity, greedy_agreement, kl_divergence
from .haystack import Haystack
from .longbench import LongBenchSample, load_longbench
from .report import Report
from .runner import build_samples, run_eval
from .tasks import TASKS, Sample, Turn, make_sample, make_samples, string_match

__all__ = [
    "TASKS",
    "Fidelity",
    "Haystack",
    "LongBenchSample",
    "Report",
    "Sample",
    "Turn",
    "build_samples",
    "fidelity",
    "greedy_agreement",
    "kl_divergence",
    "load_longbench",
    "make_sample",
    "make_samples",
    "run_eval",
    "string_match",
]
