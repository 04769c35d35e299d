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

# Small shapes of every supported family and its quirks: GQA and MHA, Llama-3.1 rope scaling, Qwen2 q/k/v bias,
# sliding windows (48 tokens: the test prompts are longer), Qwen3's q/k norms, Phi-3's fused projections with
# partial rotary and longrope, Gemma's scaled embeddings, sandwich norms, soft-capping, query_pre_attn_scalar and
# local/global layers (Gemma 3: a local RoPE base of its own). Gemma's weights are drawn larger
# (initializer_range) so that soft-capping and the norms change the logits measurably.
WINDOW = 48
_SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "llama-gqa": dict(model_type="llama", num_hidden_layers=4, **_SMALL),
    "llama31-rope-scaling-mha": dict(
        model_type="llama",
        num_hidden_layers=3,
        **{**_SMALL, "num_key_value_heads": 4},
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    ),
    "mistral-gqa": dict(model_type="mistral", num_hidden_layers=3, **_SMALL),
    "mistral-sliding": dict(model_type="mistral", num_hidden_layers=3, sliding_window=WINDOW, **_SMALL),
    "qwen2-bias": dict(model_type="qwen2", num_hidden_layers=3, **_SMALL),
    "qwen2-sliding": dict(
        model_type="qwen2",
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,  # layers 1 and up are windowed, layer 0 is global
        **_SMALL,
    ),
    "qwen3-qk-norm": dict(model_type="qwen3", num_hidden_layers=3, head_dim=16, **_SMALL),
    "phi3-fused-partial-longrope-sliding": dict(
        model_type="phi3",
        num_hidden_layers=3,
        **_SMALL,
        partial_rotary_factor=0.75,  # 12 of 16 head dimensions rotate
        original_max_position_embeddings=128,  # prompts beyond it take the long factors
        max_position_embeddings=4096,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1, 2, 4, 8, 12, 16],
        },
        sliding_window=WINDOW,
        pad_token_id=0,
    ),
    "gemma2-softcap-local-global": dict(
        model_type="gemma2",
        num_hidden_layers=4,  # local, global, local, global
        head_dim=16,
        **_SMALL,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        initializer_range=0.2,
    ),
    "gemma3-local-rope": dict(
        model_type="gemma3_text",
        num_hidden_layers=4,
        head_dim=16,
        **_SMALL,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        sliding_window_pattern=3,  # local, local, global, local
        rope_theta=1000000.0,
        rope_local_base_freq=100.0,
        initializer_range=0.2,
    ),
}


def deep(family: str, layers: int = 12) -> dict:
    """A family's shape with `layers` layers: deep enough for every method's default layer schedule."""
    return {**FAMILIES[family], "num_hidden_layers": layers}


# Deep enough for every method's layer schedule (pruning and filter layers land on distinct layers).
DEEP = dict(
    model_type="llama",
    num_hidden_layers=12,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
)


# Settings under which each method really prunes or drops at a few hundred tokens (the defaults are for long prompts).
PRUNING = {
    "dense": "dense",
    "sliminfer": "sliminfer(budgets=(0.5, 0.25, 0.125))",
    "lazyllm": "lazyllm(revive_per_step=1)",  # revival on: the default (0) decodes as static pruning
    "omnikv": "omnikv(budget=32)",
    "snapkv": "snapkv(budget=64)",
    "h2o": "h2o(budget=64)",
    "streaming_llm": "streaming_llm(window=60)",
}


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
