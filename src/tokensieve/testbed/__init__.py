"""The testbed: a small Llama-architecture model trained in-project for long-context retrieval.

It is embedded in the package (`MODEL_DIR`, a standard Hugging Face directory) so that every command has
a model that actually answers long-context tasks, offline. `python -m tokensieve.testbed.train` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"


def model_path() -> Path:
    """The embedded model's directory; a clear error when it is not installed."""
    if not (MODEL_DIR / "config.json").is_file() or not (MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the embedded testbed model is missing from {MODEL_DIR}: reinstall tokensieve with its package data, "
            "or rebuild it with `python -m tokensieve.testbed.train --out DIR` and pass --model DIR"
        )
    return MODEL_DIR


__all__ = ["MODEL_DIR", "model_path"]
