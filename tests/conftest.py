"""Shared fixtures: tiny random-weight models of each supported family, and the shared data paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tokensieve
from tokensieve import presets

# The test models are tiny: one thread is fastest, and on a shared, loaded machine two threads can be
# many times slower (every op waits for the other thread).
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260k"

# Small shapes of every supported family: GQA and MHA, Llama-3.1 rope scaling, Qwen2 q/k/v bias.
FAMILIES = {
    "llama-gqa": dict(
        model_type="llama",
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "llama31-rope-scaling-mha": dict(
        model_type="llama",
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    ),
    "mistral-gqa": dict(
        model_type="mistral",
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "qwen2-bias": dict(
        model_type="qwen2",
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}

# Deep enough for every method's layer schedule (pruning and filter layers land on distinct layers).
DEEP = dict(
    model_type="llama",
    num_hidden_layers=12,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture(scope="session")
def deep_engine() -> tokensieve.Engine:
    """A 12-layer random Llama with GQA, for method tests."""
    model, tok = presets.build(DEEP, seed=1)
    return tokensieve.load(model, tokenizer=tok)


def random_prompt(n: int, seed: int = 0, vocab: int = 256) -> list[int]:
    """`n` random byte tokens (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def needs_stories():
    return pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not found (../shared is not beside the repo)")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """One cache directory for the whole session: smollm2's GGUF is converted at most once per test run."""
    from tokensieve.loading import smollm2_gguf

    pytest.importorskip("gguf", reason="smollm2 needs the optional package gguf (make install has it)")
    try:
        smollm2_gguf()
    except ValueError as missing:
        pytest.skip(str(missing))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TOKENSIEVE_CACHE", str(tmp_path_factory.mktemp("tokensieve-cache")))
        patch.setenv("HF_HUB_OFFLINE", "1")  # everything comes from the installed wheel
        yield
