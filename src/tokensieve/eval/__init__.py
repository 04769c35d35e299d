"""Evaluation: synthetic long-context tasks, LongBench data and metrics, fidelity vs dense, the eval runner."""
