"""Invariant 1: the dense engine equals Hugging Face transformers (logits and greedy tokens), for every family.

These are the version-matrix tests: CI runs this file against the oldest and the newest `transformers`
the package supports (`make test-oldest`).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import tokensieve
from conftest import FAMILIES, STORIES, WINDOW, needs_stories, random_prompt
from tokensieve import attention, presets

WINDOWED = sorted(name for name, shape in FAMILIES.items() if shape.get("sliding_window"))


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        prompt = torch.tensor([ids])
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()


def engine_last_logits(engine: tokensieve.Engine, ids: list[int]) -> torch.Tensor:
    return engine.next_token_logits(ids, [])[0]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(name, Hugging Face model, engine) of one family with random weights."""
    model, tok = presets.build(FAMILIES[request.param], seed=3)
    return request.param, model, tokensieve.load(model, tokenizer=tok)


@pytest.mark.parametrize("prompt_len", [WINDOW // 2, 200])
@pytest.mark.parametrize("explicit_from", [attention.EXPLICIT_MIN_KEYS, 232])
def test_logits_and_greedy_tokens_match_transformers(family, prompt_len, explicit_from, monkeypatch):
    """Within and beyond the sliding window (48 tokens); 64 tokens generated. With `explicit_from` lowered to
    232 keys, the 200-token prompt's later decode steps take the explicit CPU attention (two matmuls) that
    long contexts take, the 24-token one's stay with the fused kernel."""
    monkeypatch.setattr(attention, "EXPLICIT_MIN_KEYS", explicit_from)
    _, model, engine = family
    ids = random_prompt(prompt_len, seed=4)
    assert (engine_last_logits(engine, ids) - hf_last_logits(model, ids)).abs().max().item() <= 1e-4
    expected = hf_greedy(model, ids, 64)
    assert engine.generate(ids, max_new_tokens=64).token_ids == expected  # both stop at EOS, if it comes


def quirks_off(model) -> dict:
    """Ways to switch each family quirk the adapter detected off, by name."""
    family = model.family
    spec, ways = model.spec, {}
    if any(spec.layer_windows):
        ways["sliding window"] = lambda: object.__setattr__(spec, "layer_windows", (None,) * spec.num_layers)
    if model.softcap is not None:
        ways["attention soft-cap"] = lambda: setattr(model, "softcap", None)
    if model.final_softcap is not None:
        ways["final soft-cap"] = lambda: setattr(model, "final_softcap", None)
    if family.qk_norm:
        ways["q/k norm"] = lambda: setattr(model, "family", replace(family, qk_norm=False))
    if family.sandwich_norms:
        ways["sandwich norms"] = lambda: setattr(model, "family", replace(family, sandwich_norms=False))
    if len(model._rotary) > 1:
        ways["local RoPE base"] = lambda: setattr(model, "_rope_kind", [model._rope_kind[-2]] * model.spec.num_layers)
    if model.scale != model.spec.head_dim**-0.5:
        ways["query_pre_attn_scalar"] = lambda: setattr(model, "scale", model.spec.head_dim**-0.5)
    return ways


GEMMA = {"sliding window", "sandwich norms", "query_pre_attn_scalar"}
QUIRKS = {
    "mistral-sliding": {"sliding window"},
    "qwen2-sliding": {"sliding window"},
    "qwen3-qk-norm": {"q/k norm"},
    "phi3-fused-partial-longrope-sliding": {"sliding window"},
    "gemma2-softcap-local-global": GEMMA | {"attention soft-cap", "final soft-cap"},
    "gemma3-local-rope": GEMMA | {"q/k norm", "local RoPE base"},
}


@pytest.mark.parametrize("name", sorted(QUIRKS))
def test_every_quirk_is_detected_and_changes_the_logits(name):
    """The parity test can fail: each quirk the adapter handles changes these tiny models' logits when left out."""
    model, tok = presets.build(FAMILIES[name], seed=3)
    ids = random_prompt(200, seed=4)
    reference = hf_last_logits(model, ids)
    assert set(quirks_off(tokensieve.load(model, tokenizer=tok).model)) == QUIRKS[name]
    for quirk in QUIRKS[name]:
        engine = tokensieve.load(model, tokenizer=tok)
        quirks_off(engine.model)[quirk]()
        assert (engine_last_logits(engine, ids) - reference).abs().max().item() > 1e-3, f"{name}: {quirk}"


def test_the_test_families_cover_every_supported_architecture():
    from tokensieve.model import SUPPORTED_ARCHITECTURES

    assert {shape["model_type"] for shape in FAMILIES.values()} == set(SUPPORTED_ARCHITECTURES)
    assert {"mistral", "qwen2", "phi3", "gemma2", "gemma3_text"} <= {FAMILIES[name]["model_type"] for name in WINDOWED}


def load_stories(dtype: str) -> tokensieve.Engine:
    """stories260k with its tokenizer built from tokenizer.json: its tokenizer_config.json was saved by
    transformers 5 (class TokenizersBackend), which AutoTokenizer of transformers 4.x cannot read."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(STORIES / "tokenizer.json"), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return tokensieve.load(STORIES, tokenizer=tokenizer, dtype=dtype, device="cpu")


@needs_stories()
def test_stories260k_matches_transformers():
    from transformers import AutoModelForCausalLM

    engine = load_stories("float32")
    reference = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32, attn_implementation="sdpa")
    ids = engine.encode("Once upon a time, there was a little girl named Lily. She loved to play")
    assert (engine_last_logits(engine, ids) - hf_last_logits(reference, ids)).abs().max().item() <= 1e-4
    assert engine.generate(ids, max_new_tokens=64).token_ids == hf_greedy(reference, ids, 64)
    assert "Lily" in engine.generate("Once upon a time, Lily", max_new_tokens=40).text


@needs_stories()
def test_bfloat16_stays_close_to_float32():
    """bf16 keeps the argmax on a trained model and the logits within 0.15 of fp32 (bf16 has 8 mantissa bits)."""
    fp32, bf16 = load_stories("float32"), load_stories("bfloat16")
    ids = fp32.encode("Once upon a time, there was a little dog. The dog")
    a, b = engine_last_logits(fp32, ids), engine_last_logits(bf16, ids)
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() < 0.15 * a.abs().max().item()
    assert a.argmax() == b.argmax()


# Phi-3's longrope picks its factors per call from the highest position: a first chunk or turn within
# original_max_position_embeddings takes the short ones, the rest the long ones (README, Supported models).
PER_CALL_ROPE = {"phi3-fused-partial-longrope-sliding"}


@pytest.mark.parametrize("name", sorted(set(WINDOWED) - PER_CALL_ROPE))
def test_chunked_prefill_and_a_later_turn_keep_the_window(name):
    """Chunks of 40 rows (under the 48-token window) and a second turn attend through `attend`, masked by window."""
    model, tok = presets.build(FAMILIES[name], seed=3)
    ids = random_prompt(200, seed=6)
    expected = hf_greedy(model, ids, 16)
    chunked = tokensieve.load(model, tokenizer=tok)
    chunked.prefill_chunk = 40
    assert chunked.generate(ids, max_new_tokens=16).token_ids == expected
    session = tokensieve.load(model, tokenizer=tok).start(ids[:120])
    session.extend(ids[120:])
    assert session.generate(max_new_tokens=16).token_ids == expected
