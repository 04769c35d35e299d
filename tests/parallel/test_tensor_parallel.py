"""Tensor parallelism on CPU with gloo, 2 ranks: the same tokens and logits as 1 rank, the same selections
on every rank, and a clear error when a rank dies. Each engine spawns one worker process (a few seconds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokensieve
from conftest import DEEP, FAMILIES, PRUNING, random_prompt
from tokensieve import presets

# Families whose sharding differs: GQA, q/k/v biases (Qwen2), a sliding window (Mistral, trimmed KV), fused
# qkv and gate_up weights (Phi-3), sandwich norms and soft-capping (Gemma 2), per-head q/k norms (Qwen3).
TP_FAMILIES = ["llama-gqa", "qwen2-bias", "mistral-sliding", "phi3-fused-partial-longrope-sliding",
               "gemma2-softcap-local-global", "qwen3-qk-norm"]  # fmt: skip
COMPOSED = "sliminfer(budgets=(0.5, 0.25, 0.125))+omnikv(budget=32)"
# Methods whose every decision is one for the whole sequence, so every rank must hold the same selection.
# SnapKV and H2O evict per KV head: each rank decides for its own heads (see docs/distributed.md).
WHOLE_SEQUENCE = {"dense", "sliminfer", "lazyllm", "omnikv", "streaming_llm", COMPOSED}
REPO = Path(__file__).resolve().parents[2]


def pair(shape: dict, seed: int = 3) -> tuple[tokensieve.Engine, tokensieve.Engine]:
    """The same random model on 1 rank and on 2."""
    model, tokenizer = presets.build(shape, seed=seed)
    one = tokensieve.load(model, tokenizer=tokenizer)
    copy, _ = presets.build(shape, seed=seed)
    return one, tokensieve.load(copy, tokenizer=tokenizer, tensor_parallel_size=2)


@pytest.fixture(params=TP_FAMILIES)  # one tensor-parallel engine per process at a time: closed after its test
def family_pair(request):
    one, two = pair(FAMILIES[request.param])
    yield request.param, one, two
    two.close()


def test_dense_two_ranks_equal_one_rank(family_pair):
    name, one, two = family_pair
    prompt = random_prompt(120, seed=5)  # beyond the 48-token windows
    assert two.model.spec.num_kv_heads * 2 == one.model.spec.num_kv_heads  # rank 0 holds half the KV heads
    expected = one.next_token_logits(prompt, random_prompt(6, seed=6))
    got = two.next_token_logits(prompt, random_prompt(6, seed=6))
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), f"{name}: {(got - expected).abs().max()}"
    assert two.generate(prompt, max_new_tokens=12).token_ids == one.generate(prompt, max_new_tokens=12).token_ids


@pytest.fixture(scope="module")
def deep_pair():
    one, two = pair(DEEP, seed=1)
    yield one, two
    two.close()


@pytest.mark.parametrize("method", [*PRUNING.values(), COMPOSED])
def test_every_method_two_ranks_equal_one_rank(deep_pair, method):
    one, two = deep_pair
    prompt = random_prompt(300, seed=7)
    alone = one.start(prompt, method=method).generate(max_new_tokens=10)
    session = two.start(prompt, method=method)
    generation = session.generate(max_new_tokens=10)
    assert generation.token_ids == alone.token_ids
    assert generation.stats.prefill_tokens_per_layer == alone.stats.prefill_tokens_per_layer
    assert generation.stats.decode_keys_per_layer == alone.stats.decode_keys_per_layer
    name = method if method == COMPOSED else method.split("(")[0]
    if name in WHOLE_SEQUENCE:
        digests = two.executor.digests(session)
        assert len(digests) == 2 and digests[0] == digests[1], f"{method}: the ranks selected differently"


def test_sessions_and_batches_under_two_ranks(deep_pair):
    one, two = deep_pair
    turns = [random_prompt(80, seed=s) for s in (1, 2, 3)]
    expected, got = one.start(turns[0], method="omnikv(budget=32)"), two.start(turns[0], method="omnikv(budget=32)")
    for turn in turns[1:]:
        assert got.generate(max_new_tokens=4).token_ids == expected.generate(max_new_tokens=4).token_ids
        expected.extend(turn)
        got.extend(turn)
    assert got.generate(max_new_tokens=4).token_ids == expected.generate(max_new_tokens=4).token_ids
    twin = got.fork()  # every rank copies its share of the state
    assert twin.generate(max_new_tokens=4).token_ids == expected.fork().generate(max_new_tokens=4).token_ids
    digests = two.executor.digests(twin)
    assert digests[0] == digests[1]
    # prompts of 40, 90 and 150 tokens are prefilled in one pass (they fit the scheduler's 2048 tokens)
    prompts = [random_prompt(n, seed=n) for n in (40, 90, 150)]
    batch = two.generate(prompts, max_new_tokens=[5, 9, 3], method=PRUNING["lazyllm"])
    alone = [
        one.generate(p, max_new_tokens=n, method=PRUNING["lazyllm"]) for p, n in zip(prompts, [5, 9, 3], strict=True)
    ]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    dense = two.generate(prompts, max_new_tokens=[5, 9, 3])  # each rank's dense batch shares one call per layer
    assert [g.token_ids for g in dense] == [
        one.generate(p, max_new_tokens=n).token_ids for p, n in zip(prompts, [5, 9, 3], strict=True)
    ]
    assert not two.executor.pool.holding  # the batch ended: every rank freed its slots


def test_sizes_that_do_not_divide_the_heads_are_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="more than the model's 2 KV heads.*pick a size that divides 2"):
        tokensieve.load("tiny", tensor_parallel_size=4)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
        tokensieve.load("tiny", tensor_parallel_size=0)
    model, tokenizer = presets.build({**FAMILIES["llama-gqa"], "num_key_value_heads": 4, "intermediate_size": 90})
    with pytest.raises(ValueError, match="does not divide the model's 90 MLP columns: pick one of 1, 2"):
        tokensieve.load(model, tokenizer=tokenizer, tensor_parallel_size=4)


def test_the_cli_under_torchrun_prints_what_one_rank_prints():
    command = ["generate", "--model", "tiny", "--prompt", "under torchrun", "--max-new-tokens", "6", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    alone = subprocess.run([sys.executable, "-m", "tokensieve.cli", *command], env=env, capture_output=True,
                           text=True, timeout=120, check=True)  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    ranks = subprocess.run([*torchrun, "-m", "tokensieve.cli", *command, "--tensor-parallel-size", "2"], env=env,
                           capture_output=True, text=True, timeout=180)  # fmt: skip
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    assert _text(ranks.stdout) == _text(alone.stdout)


def _text(stdout: str) -> str:
    """The generated text of `tokensieve generate` (its stats lines hold timings, which differ)."""
    return stdout.split("\n\n")[0]
