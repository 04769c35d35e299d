"""Invariant 1: the dense engine equals Hugging Face transformers (logits and greedy tokens)."""

from __future__ import annotations

import pytest
import torch

import tokensieve
from conftest import FAMILIES, STORIES, needs_stories, random_prompt
from tokensieve import presets


def prefill_logits(engine: tokensieve.Engine, ids: list[int]) -> torch.Tensor:
    return engine.next_token_logits(ids, [], method="dense")[0]


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        prompt = torch.tensor([ids])
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_greedy_tokens_match_transformers(family):
    model, tok = presets.build(FAMILIES[family], seed=3)
    engine = tokensieve.load(model, tokenizer=tok)
    ids = random_prompt(200, seed=4)
    with torch.inference_mode():
        reference = model(torch.tensor([ids])).logits[0, -1].float()
    assert (prefill_logits(engine, ids) - reference).abs().max().item() <= 1e-4

    expected = hf_greedy(model, ids, 64)
    assert engine.generate(ids, max_new_tokens=64).token_ids == expected  # both stop at EOS, if it comes


@needs_stories()
def test_stories260k_matches_transformers():
    from transformers import AutoModelForCausalLM

    engine = tokensieve.load(STORIES, dtype="float32", device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32, attn_implementation="sdpa")
    ids = engine.encode("Once upon a time, there was a little girl named Lily. She loved to play")
    with torch.inference_mode():
        ref_logits = reference(torch.tensor([ids])).logits[0, -1]
    assert (prefill_logits(engine, ids) - ref_logits).abs().max().item() <= 1e-4
    assert engine.generate(ids, max_new_tokens=64).token_ids == hf_greedy(reference, ids, 64)
    assert "Lily" in engine.generate("Once upon a time, Lily", max_new_tokens=40).text


def test_bfloat16_stays_close_to_float32():
    """bf16 keeps the argmax on a trained model and the logits within 0.15 of fp32 (bf16 has 8 mantissa bits)."""
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} not found")
    fp32 = tokensieve.load(STORIES, dtype="float32", device="cpu")
    bf16 = tokensieve.load(STORIES, dtype="bfloat16", device="cpu")
    ids = fp32.encode("Once upon a time, there was a little dog. The dog")
    a, b = prefill_logits(fp32, ids), prefill_logits(bf16, ids)
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() < 0.15 * a.abs().max().item()
    assert a.argmax() == b.argmax()
