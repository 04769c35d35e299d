"""Sliding-window and soft-capped attention against a plain reference; the cache's window trim; unsupported models."""

from __future__ import annotations

import pytest
import torch

import tokensieve
from tokensieve import attention
from tokensieve.attention import attend, causal_attention
from tokensieve.cache import Kind, LayerKV
from tokensieve.model import SUPPORTED_ARCHITECTURES, check_supported


def reference(q, q_pos, k, v, k_pos, scale, window=None, softcap=None):
    """Each query row alone, keys repeated per head, over the keys it may see."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    rows = []
    for i, p in enumerate(q_pos.tolist()):
        seen = (k_pos <= p) & (k_pos > p - window if window else True)
        logits = q[:, i : i + 1] @ k[:, seen].transpose(1, 2) * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        rows.append(logits.softmax(-1) @ v[:, seen])
    return torch.cat(rows, 1)


def random_qkv(heads=6, kv_heads=2, n=60, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(heads, n, d, generator=gen) * 2, torch.randn(kv_heads, n, d, generator=gen) * 2,
            torch.randn(kv_heads, n, d, generator=gen))  # fmt: skip


@pytest.mark.parametrize(("window", "softcap"), [(10, None), (None, 1.5), (7, 1.5)])
def test_attend_with_window_and_softcap_matches_the_reference(window, softcap):
    q, k, v = random_qkv()
    k_pos = torch.randperm(60, generator=torch.Generator().manual_seed(1))  # keys need not be sorted
    q_pos = torch.tensor([40, 52, 59])
    out = attend(q[:, :3], q_pos, k, v, k_pos, 0.3, window=window, softcap=softcap)
    expected = reference(q[:, :3], q_pos, k, v, k_pos, 0.3, window, softcap)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_windowed_prefill_in_blocks_measures_the_window_in_positions(monkeypatch, softcap):
    """Rows left after pruning (positions with gaps), attended in blocks of a few queries."""
    monkeypatch.setattr(attention, "BLOCK_LOGITS", 6 * 20)  # blocks of 1-2 queries
    q, k, v = random_qkv()
    pos = torch.arange(0, 180, 3)  # every third position: 60 rows spanning 180 positions
    out = causal_attention(q, k, v, 0.3, pos=pos, window=25, softcap=softcap)
    torch.testing.assert_close(out, reference(q, pos, k, v, pos, 0.3, 25, softcap), atol=1e-5, rtol=1e-5)


def test_rows_within_the_window_take_the_plain_causal_path():
    q, k, v = random_qkv()
    pos = torch.arange(60)
    torch.testing.assert_close(causal_attention(q, k, v, 0.3, pos=pos, window=60), causal_attention(q, k, v, 0.3))
    with pytest.raises(ValueError, match="needs the rows' positions"):
        causal_attention(q, k, v, 0.3, window=8)


def test_keys_beyond_the_window_can_be_dropped_without_changing_decode():
    q, k, v = random_qkv()
    kv = LayerKV(2, 8, torch.float32, torch.device("cpu"))
    kv.append(k, v, torch.arange(60), Kind.PROMPT)
    newest, window = torch.tensor([59]), 16
    full = attend(q[:, -1:], newest, kv.keys, kv.values, kv.positions, 0.3, window=window)
    reserved = kv.reserved_bytes
    assert kv.drop_older_than(59 - window + 1) == 60 - window
    assert kv.positions.tolist() == list(range(44, 60)) and kv.drop_older_than(44) == 0
    assert kv.reserved_bytes < reserved  # the dropped entries' memory is freed
    trimmed = attend(q[:, -1:], newest, kv.keys, kv.values, kv.positions, 0.3, window=window)
    torch.testing.assert_close(trimmed, full)
    kv.append(k[:, :1], v[:, :1], torch.tensor([60]), Kind.GENERATED)
    assert len(kv) == window + 1


@pytest.mark.parametrize(
    ("model_type", "fields", "message"),
    [
        ("qwen3_moe", {}, "mixture-of-experts"),
        ("mixtral", {}, "mixture-of-experts"),
        ("llava", {}, "multimodal"),
        ("gemma3", {}, "Gemma3ForCausalLM"),
        ("deepseek_v3", {}, "latent attention"),
        ("gemma3_text", {"use_bidirectional_attention": True}, "bidirectional"),
    ],
)
def test_unsupported_models_are_named_with_what_is_supported(model_type, fields, message):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **fields)
    with pytest.raises(ValueError, match=message) as error:
        check_supported(config)
    if model_type != "gemma3_text":
        assert ", ".join(SUPPORTED_ARCHITECTURES) in str(error.value)


def test_loading_an_unsupported_checkpoint_names_the_directory(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("mixtral", num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"'mixtral' in {tmp_path}: mixture-of-experts"):
        tokensieve.load(tmp_path)


def test_a_gemma2_checkpoint_directory_loads(tmp_path):
    from conftest import FAMILIES
    from tokensieve import presets

    model, tok = presets.build(FAMILIES["gemma2-softcap-local-global"], seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompt = list(range(100))
    expected = tokensieve.load(model, tokenizer=tok).generate(prompt, max_new_tokens=8).token_ids
    assert tokensieve.load(tmp_path).generate(prompt, max_new_tokens=8).token_ids == expected
