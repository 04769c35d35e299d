"""The CUDA paths, run by `make gpu-check` (skipped without CUDA): parity with `transformers` in fp32 and bf16,
offload (pinned host memory, side-stream copies) equal to no offload, SlimInfer's prefetched swaps equal to
synchronous ones, every method's keep-all settings equal to dense on the device, and a batch (the dense
sequences in the batch pool's slots) equal to each sequence alone.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import tokensieve
from conftest import DEEP, FAMILIES, random_prompt
from tokensieve import offload, presets
from tokensieve.methods import METHODS, OmniKV, SlimInfer
from tokensieve.testbed import MODEL_DIR

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = random_prompt(1000, seed=5)
NEW_TOKENS = 16
FRACTIONS = (0.5, 0.25, 0.125)  # SlimInfer budgets that prune and swap on the 12-layer model


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    prompt = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids], device=model.device)).logits[0, -1].float()


@pytest.fixture(scope="module")
def deep_cuda() -> tokensieve.Engine:
    model, tok = presets.build(DEEP, seed=1, device="cuda")
    return tokensieve.load(model, tokenizer=tok, device="cuda", dtype="float32")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_dense_matches_transformers_on_cuda(family):
    model, tok = presets.build(FAMILIES[family], seed=3, device="cuda")
    engine = tokensieve.load(model, tokenizer=tok, device="cuda", dtype="float32")
    ids = random_prompt(200, seed=4)
    ours = engine.next_token_logits(ids, [])[0]
    assert (ours - hf_last_logits(model, ids)).abs().max().item() <= 1e-3
    assert engine.generate(ids, max_new_tokens=32).token_ids == hf_greedy(model, ids, 32)


@pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason="the testbed model is not embedded")
def test_bf16_dense_matches_transformers_on_cuda():
    """On the trained testbed model (decisive argmaxes): close logits and the same greedy tokens in bf16."""
    engine = tokensieve.load("testbed", device="cuda", dtype="bfloat16")
    model = engine.model.hf
    ids = random_prompt(400, seed=6)
    ours, reference = engine.next_token_logits(ids, [])[0], hf_last_logits(model, ids)
    assert (ours - reference).abs().max().item() <= 0.02 * reference.abs().max().item()
    assert ours.argmax() == reference.argmax()
    assert engine.generate(ids, max_new_tokens=16).token_ids == hf_greedy(model, ids, 16)


@pytest.fixture(scope="module")
def dense_tokens(deep_cuda) -> list[int]:
    return deep_cuda.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids


@pytest.mark.parametrize("name", sorted(METHODS))
def test_keep_all_equals_dense_on_cuda(deep_cuda, dense_tokens, name):
    gen = deep_cuda.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=METHODS[name].keep_all())
    assert gen.token_ids == dense_tokens
    assert gen.stats.prefill_tokens_per_layer == [len(PROMPT)] * deep_cuda.model.spec.num_layers


@pytest.mark.parametrize("method", [OmniKV(budget=96), SlimInfer(budgets=FRACTIONS, gamma=1.0)], ids=["omnikv", "slim"])
def test_offload_with_pinned_memory_and_side_streams_equals_no_offload(deep_cuda, method):
    runs = [
        deep_cuda.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=replace(method, offload=o)) for o in (True, False)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].stats.kv_bytes_host > 0 and runs[1].stats.kv_bytes_host == 0
    assert runs[0].stats.host_bytes_loaded_per_step > 0  # copies did run


def test_sliminfer_prefetched_swaps_equal_synchronous_swaps(deep_cuda, monkeypatch):
    method = SlimInfer(budgets=FRACTIONS, gamma=1.0)
    prefetched = deep_cuda.next_token_logits(PROMPT, list(range(40, 40 + NEW_TOKENS)), method=method)
    swaps = deep_cuda.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=method).stats.host_loads_per_step

    prefetching_load = offload.Transfers.load

    def synchronous_load(self, host, index=None):
        """The same copy, waited for at once: nothing overlaps it."""
        tensor = prefetching_load(self, host, index).wait()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return offload.Pending(tensor, None)

    monkeypatch.setattr(offload.Transfers, "load", synchronous_load)
    synchronous = deep_cuda.next_token_logits(PROMPT, list(range(40, 40 + NEW_TOKENS)), method=method)
    assert swaps > 0
    assert torch.equal(prefetched, synchronous)


def test_a_batch_on_cuda_decodes_each_sequence_as_alone(deep_cuda):
    """The dense sequences share the pooled call (`engine/pool.py`) beside a method's sequence attending alone."""
    prompts = [random_prompt(n, seed=n) for n in (300, 340, 280, 320)]
    specs = ["dense", "omnikv(budget=96)", "dense", "dense"]
    scheduler = tokensieve.Scheduler(deep_cuda, max_batch=4)
    for prompt, spec in zip(prompts, specs, strict=True):
        scheduler.submit(prompt, max_new_tokens=NEW_TOKENS, method=spec, stop=None)
    pooled = []
    while not scheduler.finished:
        scheduler.step()
        pooled.append(len(deep_cuda.executor.pool.slots))
    batched = [scheduler.done[i].token_ids for i in sorted(scheduler.done)]
    alone = [
        deep_cuda.generate(p, max_new_tokens=NEW_TOKENS, method=s, stop=None).token_ids
        for p, s in zip(prompts, specs, strict=True)
    ]
    assert batched == alone and max(pooled) == 3 and not deep_cuda.executor.pool.holding
