"""The FLOP/byte model against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from tokensieve.bench import costs
from tokensieve.generation import Stats
from tokensieve.model import ModelSpec

# hidden 8, 2 heads of 4 (d = 8), 1 KV head, MLP 16, vocab 10: attention params 2*8*8 + 2*8*4 = 192,
# MLP params 3*8*16 = 384, P = 576.
SMALL = ModelSpec(2, 8, 2, 1, 4, 16, 10, 128, "llama")
LLAMA3_8B = ModelSpec(32, 4096, 32, 8, 128, 14336, 128256, 131072, "llama")


def stats(prompt: int, new: int, prefill: list[int], keys: list[float], **counted) -> Stats:
    return Stats(
        method={"name": "x"},
        prompt_tokens=prompt,
        new_tokens=new,
        prefill_tokens_per_layer=prefill,
        decode_keys_per_layer=keys,
        **counted,
    )


def test_parameters_of_a_layer():
    assert costs.attention_params(SMALL) == 192
    assert costs.mlp_params(SMALL) == 384
    assert costs.layer_params(SMALL) == 576
    assert costs.layer_params(LLAMA3_8B) == 218_103_808  # 32 of them + embeddings and head: ~8.0B


def test_prefill_flops_small():
    # LM head 2*8*10 = 160; layer with n tokens: 2*n*576 + 2*8*n^2.
    assert costs.prefill_flops(SMALL, [4, 2]) == 160 + (4608 + 256) + (2304 + 64)
    assert costs.prefill_flops(SMALL, [4, 4]) == 9888
    # MLP on 1 token at layer 0 (attention still on 4): 2*4*192 + 2*1*384 + 2*8*16.
    assert costs.prefill_flops(SMALL, [4, 2], [1, 2]) == 160 + (1536 + 768 + 256) + 2368


def test_decode_bytes_small():
    # weights (2*576 + 10*8 + 8) params; one token's KV at a layer: 2 * 1 head * 4 dims.
    assert costs.weight_bytes(SMALL, torch.float32) == 1240 * 4
    assert costs.decode_bytes(SMALL, torch.float32, [5, 3]) == 4960 + 8 * 32
    assert costs.decode_bytes(SMALL, torch.bfloat16, [5, 3], host_bytes_loaded=100) == 2480 + 8 * 16 + 100


def test_ideal_speedups_small():
    s = stats(4, 3, [4, 2], [5.0, 3.0])
    assert costs.ideal_prefill_speedup(SMALL, s) == pytest.approx(9888 / 7392)
    # dense attends prompt + new/2 = 5.5 keys per layer on average over the 2 decode steps
    dense = 4960 + 2 * 5.5 * 32
    assert costs.ideal_decode_speedup(SMALL, torch.float32, s) == pytest.approx(dense / (4960 + 256))
    assert costs.ideal_decode_speedup(SMALL, torch.float32, stats(4, 1, [4, 4], [0.0, 0.0])) is None


def test_dense_stats_have_an_ideal_of_one():
    s = stats(4, 5, [4, 4], [6.5, 6.5])
    assert costs.ideal_prefill_speedup(SMALL, s) == 1.0
    assert costs.ideal_decode_speedup(SMALL, torch.float32, s) == pytest.approx(1.0)


def slim(n: int, m: int | None = None) -> int:
    """Llama-3-8B layer FLOPs by hand: attention params 41,943,040, MLP params 176,160,768, d 4096."""
    return 2 * n * 41_943_040 + 2 * (n if m is None else m) * 176_160_768 + 2 * 4096 * n * n


def test_sliminfer_schedule_on_llama3_8b_at_32k():
    """SlimInfer's default: keep 8192, 4096, 2048 after layers 10, 20, 30 of 32, for a 32K prompt."""
    entering = [32768] * 11 + [8192] * 10 + [4096] * 10 + [2048]
    head = 2 * 4096 * 128256
    assert costs.prefill_flops(LLAMA3_8B, entering) == head + 11 * slim(32768) + 10 * slim(8192) + 10 * slim(
        4096
    ) + slim(2048)
    s = stats(32768, 1, entering, [0.0] * 32)
    assert costs.ideal_prefill_speedup(LLAMA3_8B, s) == pytest.approx(2.3427, abs=1e-4)
    # with the pruning layers' MLP counted on the kept tokens only, the ceiling is a little higher
    mlp = list(entering)
    mlp[10], mlp[20], mlp[30] = 8192, 4096, 2048
    exact = stats(32768, 1, entering, [0.0] * 32, prefill_mlp_tokens_per_layer=mlp)
    assert costs.ideal_prefill_speedup(LLAMA3_8B, exact) == pytest.approx(2.4260, abs=1e-4)


def test_lazyllm_like_schedule_prunes_30_percent_per_stage():
    entering = [8192] * 9 + [5734] * 10 + [4014] * 9 + [2810] * 4
    head = 2 * 4096 * 128256
    dense = head + 32 * slim(8192)
    method = head + 9 * slim(8192) + 10 * slim(5734) + 9 * slim(4014) + 4 * slim(2810)
    s = stats(8192, 1, entering, [0.0] * 32)
    assert costs.ideal_prefill_speedup(LLAMA3_8B, s) == pytest.approx(dense / method)


def test_omnikv_like_decode_on_llama3_8b_at_128k():
    """8 dense layers attend all 131,072 prompt keys + 1; 24 sparse layers attend 2048 + 1 and load them
    from the host (4096 bytes of bf16 KV per token per layer)."""
    n, kv = 131072, 4096
    weights = (32 * 218_103_808 + 128256 * 4096 + 4096) * 2
    keys = [n + 1.0] * 8 + [2049.0] * 24
    s = stats(n, 2, [n] * 32, keys, host_bytes_loaded_per_step=24 * 2048 * kv)
    dense = weights + 32 * (n + 1) * kv
    method = weights + (8 * (n + 1) + 24 * 2049) * kv + 24 * 2048 * kv
    assert costs.ideal_decode_speedup(LLAMA3_8B, torch.bfloat16, s) == pytest.approx(dense / method)
    assert dense / method == pytest.approx(1.633, abs=1e-3)


def test_a_schedule_of_the_wrong_depth_is_an_error():
    with pytest.raises(ValueError, match="3 entries for a 2-layer model"):
        costs.prefill_flops(SMALL, [4, 4, 4])
    with pytest.raises(ValueError, match="1 entries for a 2-layer model"):
        costs.decode_bytes(SMALL, torch.float32, [4])


def test_extend_flops_by_hand_and_from_an_empty_session():
    # 3 new tokens after 5: per layer 2*3*576 projections/MLP + 2*8*3*(2*5+3) attention = 3456 + 624;
    # two layers and the LM head (2*8*10).
    assert costs.extend_flops(SMALL, 5, 3) == 2 * (3456 + 624) + 160
    assert costs.extend_flops(SMALL, 0, 7) == costs.prefill_flops(SMALL, [7, 7])


def test_end_to_end_ideal_combines_the_phases():
    # 1 s prefill at an ideal 2x, 3 s decode at an ideal 1.5x: 0.5 + 2 = 2.5 s of 4 s.
    assert costs.ideal_e2e_speedup(1.0, 3.0, 2.0, 1.5) == pytest.approx(4 / 2.5)
    assert costs.ideal_e2e_speedup(1.0, 3.0, 2.0, None) == pytest.approx(4 / 3.5)  # no decode ideal: as measured


def test_dense_decode_keys_of_a_later_call_count_the_session():
    later = Stats(method={}, prompt_tokens=0, context_tokens=100, new_tokens=8)
    assert costs.dense_decode_keys(later) == 103.5  # 8 steps attending 100 .. 107 keys
