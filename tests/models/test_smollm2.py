"""`tokensieve.load("smollm2")`: the embedded real model, offline, equals transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

import tokensieve
from tokensieve.eval.tasks import make_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(smollm2_cache) -> tokensieve.Engine:
    return tokensieve.load("smollm2", dtype="float32", device="cpu")


def test_smollm2_is_the_135m_instruct_llama_with_a_chat_template(smollm2):
    spec = smollm2.model.spec
    assert (spec.model_type, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        "llama",
        30,
        9,
        3,
        64,
    )
    assert "<|im_start|>" in smollm2.tokenizer.chat_template
    answer = smollm2.generate("What is the capital of France?", chat=True, max_new_tokens=12).text
    assert "Paris" in answer


def test_dense_equals_transformers_on_the_same_dequantized_weights(smollm2):
    from transformers import AutoModelForCausalLM

    checkpoint = smollm2.model.hf.name_or_path  # the cached conversion: a plain Hugging Face directory
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    sample = make_sample("niah_single:numbers", smollm2.tokenizer, 500, seed=2)
    ids = smollm2.encode(sample.prompt())
    assert 490 <= len(ids) <= 510

    greedy = smollm2.generate(ids, max_new_tokens=32).token_ids
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, attention_mask=torch.ones(1, len(ids), dtype=int)
        )
        expected_logits = reference(out[:, :-1]).logits[0, len(ids) - 1 :]
    assert greedy == out[0, len(ids) :].tolist()
    torch.testing.assert_close(smollm2.next_token_logits(ids, greedy[:-1]), expected_logits, atol=1e-4, rtol=0)
