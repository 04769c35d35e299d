"""The batch pool: a decode step's dense sequences write and attend from slots of one tensor per layer, and
each generates exactly what it generates alone."""

from __future__ import annotations

import copy

import pytest
import torch

import tokensieve
from conftest import FAMILIES, PRUNING, random_prompt
from tokensieve import presets
from tokensieve.attention import attend, attend_slots
from tokensieve.cache import Kind, LayerKV
from tokensieve.engine.pool import _pays
from tokensieve.engine.scheduler import Scheduler

PROMPTS = [random_prompt(n, seed=80 + n) for n in (120, 128, 100, 135)]  # even enough to share one call
NEW = [10, 4, 8, 6]


def run_watching_the_pool(engine, specs, max_batch=4) -> tuple[list, list[int]]:
    """Generations of PROMPTS with `specs`, and how many sequences held a slot at each step."""
    scheduler = Scheduler(engine, max_batch=max_batch)
    for prompt, new, spec in zip(PROMPTS, NEW, specs, strict=True):
        scheduler.submit(prompt, max_new_tokens=new, method=spec)
    pooled = []
    while not scheduler.finished:
        scheduler.step()
        pooled.append(len(engine.executor.pool.slots))
    return [scheduler.done[i] for i in sorted(scheduler.done)], pooled


def alone(engine, spec, i):
    return engine.generate(PROMPTS[i], max_new_tokens=NEW[i], method=spec).token_ids


def test_dense_sequences_decode_from_slots_exactly_as_alone(deep_engine):
    generations, pooled = run_watching_the_pool(deep_engine, ["dense"] * 4)
    assert [g.token_ids for g in generations] == [alone(deep_engine, "dense", i) for i in range(4)]
    assert max(pooled) == 4 and 2 in pooled  # all four, then the two that run longest, share the call
    assert pooled[-1] == 0 and not deep_engine.executor.pool.holding  # the batch ended: the slots are freed
    counts = [g.stats.decode_keys_per_layer for g in generations]
    assert counts == [
        deep_engine.generate(p, max_new_tokens=n).stats.decode_keys_per_layer for p, n in zip(PROMPTS, NEW, strict=True)
    ]


@pytest.mark.parametrize("other", [PRUNING["omnikv"], PRUNING["lazyllm"], PRUNING["snapkv"]])
def test_methods_decode_beside_the_pooled_dense_sequences(deep_engine, other):
    """Dense sequences share the call while a method's sequence attends alone in the same step."""
    specs = ["dense", other, "dense", "dense"]
    generations, pooled = run_watching_the_pool(deep_engine, specs)
    assert [g.token_ids for g in generations] == [alone(deep_engine, spec, i) for i, spec in enumerate(specs)]
    assert max(pooled) == 3


def test_a_ragged_batch_or_long_contexts_attend_alone():
    assert _pays([300, 310, 290]) and _pays([40, 64, 25, 50])  # within a quarter, or 256 keys a sequence
    assert not _pays([100]) and not _pays([]) and not _pays([50, 2000])
    assert _pays([2048, 2048]) and not _pays([2049, 2049])  # long contexts: calls of their own cost little


def test_a_session_leaves_the_pool_with_its_own_buffers(deep_engine):
    """A caller's sessions run in a batch, then go on alone: their KV is theirs again, and it is what they
    would hold had they run alone all along."""
    sessions = [deep_engine.start(p) for p in PROMPTS[:3]]
    scheduler = Scheduler(deep_engine, max_batch=3)
    for session in sessions:
        scheduler.add(session, max_new_tokens=5)
    scheduler.step()
    scheduler.step()
    pool = deep_engine.executor.pool
    lent = sessions[0].kv[3]
    assert lent.lender is pool.layers[3]
    held = sum(2 * store.k.numel() * store.k.element_size() for store in pool.layers)
    entries = sum(layer.nbytes for session in sessions for layer in session.kv)
    assert pool.padding_bytes == held - entries > 0  # what memory admission adds to the sessions' own
    twin = copy.deepcopy(lent)  # what a fork copies: the entries, never the whole pool
    assert twin.lender is None and twin.keys.untyped_storage().nbytes() < lent.keys.untyped_storage().nbytes() / 2
    torch.testing.assert_close(twin.keys, lent.keys, rtol=0, atol=0)
    scheduler.run()
    for session, prompt in zip(sessions, PROMPTS, strict=False):
        assert all(layer.lender is None for layer in session.kv)
        more = session.generate(max_new_tokens=3).token_ids
        reference = deep_engine.start(prompt)
        reference.generate(max_new_tokens=5)
        assert more == reference.generate(max_new_tokens=3).token_ids
        for mine, theirs in zip(session.kv, reference.kv, strict=True):
            assert mine.runs() == theirs.runs()
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2-softcap-local-global", "mistral-sliding", "qwen2-sliding"])
def test_windowed_and_soft_capped_layers_decode_from_slots_as_alone(family):
    """Sliding windows (the dense policy trims them: the layer leaves its slot and is lent it again) and
    Gemma 2's soft-capped logits, in the pooled call."""
    model, tokenizer = presets.build(FAMILIES[family], seed=2)
    engine = tokensieve.load(model, tokenizer=tokenizer)
    prompts = [random_prompt(n, seed=n) for n in (60, 70, 66)]
    batched = engine.generate(prompts, max_new_tokens=40, stop=None)
    assert [g.token_ids for g in batched] == [
        engine.generate(p, max_new_tokens=40, stop=None).token_ids for p in prompts
    ]


def test_attend_slots_equals_each_sequence_attending_alone():
    torch.manual_seed(0)
    lengths, heads, kv_heads, d = [7, 12, 3], 4, 2, 8
    k, v = torch.randn(3, kv_heads, 16, d), torch.randn(3, kv_heads, 16, d)
    positions = torch.stack([torch.arange(16) + 5 * i for i in range(3)])
    q = torch.randn(3, heads, d)
    q_pos = torch.tensor([positions[i, n - 1] for i, n in enumerate(lengths)])
    for window, softcap in [(None, None), (5, None), (None, 1.5), (4, 2.0)]:
        out = attend_slots(q, q_pos, k, v, positions, torch.tensor(lengths), 0.3, window=window, softcap=softcap)
        for i, n in enumerate(lengths):
            each = attend(q[i][:, None], q_pos[i : i + 1], k[i, :, :n], v[i, :, :n], positions[i, :n], 0.3,
                          window=window, softcap=softcap, newest=True)  # fmt: skip
            torch.testing.assert_close(out[i], each[:, 0], rtol=0, atol=1e-6)
        full = attend_slots(q, q_pos, k, v, positions, None, 0.3, window=window, softcap=softcap)  # 16 each
        for i in range(3):
            each = attend(q[i][:, None], q_pos[i : i + 1], k[i], v[i], positions[i], 0.3, window=window,
                          softcap=softcap, newest=True)  # fmt: skip
            torch.testing.assert_close(full[i], each[:, 0], rtol=0, atol=1e-6)


def test_a_layer_works_in_lent_buffers_until_it_needs_others():
    kv = LayerKV(2, 4, torch.float32, torch.device("cpu"))
    kv.append(torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.arange(3), Kind.PROMPT)
    pool = torch.zeros(2, 2, 5, 4)
    pos, kinds = torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.uint8)
    kv.borrow(pool[1], pool[1].clone(), pos[1], kinds[1], lender="pool")
    assert kv.lender == "pool" and pool[1, :, :3].eq(1).all() and pos[1, :3].tolist() == [0, 1, 2]
    kv.append(2 * torch.ones(2, 1, 4), torch.ones(2, 1, 4), torch.tensor([3]), Kind.GENERATED)
    assert pool[1, :, 3].eq(2).all()  # written in the lent buffer
    kv.append(torch.ones(2, 2, 4), torch.ones(2, 2, 4), torch.tensor([4, 5]), Kind.GENERATED)  # past its capacity
    assert kv.lender is None and kv.positions.tolist() == [0, 1, 2, 3, 4, 5]
    assert kv.runs() == [(Kind.PROMPT, 3), (Kind.GENERATED, 3)]
    with pytest.raises(ValueError, match="fewer than this layer's 6"):
        kv.borrow(pool[0], pool[0], pos[0], kinds[0], lender="pool")


def test_slots_never_read_what_they_were_not_given(deep_engine, monkeypatch):
    """Fresh slots hold whatever memory held (here NaN): a ragged group's masked tails, zeroed when a slot is
    lent, and idle slots, whose outputs are dropped, leave every sequence's tokens as alone."""
    from tokensieve.engine import pool

    made = pool.LayerSlots.__init__

    def poisoned(self, *args):
        made(self, *args)
        self.k.fill_(float("nan"))
        self.v.fill_(float("nan"))

    monkeypatch.setattr(pool.LayerSlots, "__init__", poisoned)
    generations, pooled = run_watching_the_pool(deep_engine, ["dense"] * 4)
    assert max(pooled) == 4
    assert [g.token_ids for g in generations] == [alone(deep_engine, "dense", i) for i in range(4)]
