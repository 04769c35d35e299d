"""Every method on every family: keep-all settings reproduce dense, pruning settings run beyond the sliding window,
methods that must score on global layers move there, and scores see the keys the model attends with (Qwen3)."""

from __future__ import annotations

import pytest
import torch

import tokensieve
from conftest import FAMILIES, WINDOW, deep, random_prompt
from tokensieve import presets
from tokensieve.methods import H2O, METHODS, LazyLLM, OmniKV, SlimInfer, SnapKV, StreamingLLM

PROMPT = random_prompt(4 * WINDOW, seed=12)  # four windows long
NEW_TOKENS = 8

# Settings that prune hard on these 192-token prompts, so that every method really selects.
PRUNING = {
    "dense": METHODS["dense"](),
    "lazyllm": LazyLLM(budgets=(0.5, 0.3, 0.2), revive_per_step=1),  # revival on, as the hardest case
    "omnikv": OmniKV(budget=32),
    "sliminfer": SlimInfer(budgets=(96, 64, 48), block_size=16, unit_size=4, query_window=2),
    "snapkv": SnapKV(budget=40, window=8),
    "h2o": H2O(budget=40),
    "streaming_llm": StreamingLLM(sink=4, window=28),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_engine(request) -> tokensieve.Engine:
    model, tok = presets.build(deep(request.param), seed=5)
    return tokensieve.load(model, tokenizer=tok)


@pytest.fixture(scope="module")
def dense_tokens(family_engine):
    return family_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS).token_ids


def test_pruning_settings_cover_every_method():
    assert set(PRUNING) == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_keep_all_settings_reproduce_dense(family_engine, dense_tokens, name):
    gen = family_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=METHODS[name].keep_all())
    assert gen.token_ids == dense_tokens
    assert gen.stats.prefill_tokens_per_layer == [len(PROMPT)] * family_engine.model.spec.num_layers


@pytest.mark.parametrize("settings", ["default", "pruning"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_run_beyond_the_window(family_engine, name, settings):
    method = name if settings == "default" else PRUNING[name]
    gen = family_engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, method=method)
    layers = family_engine.model.spec.num_layers
    assert gen.stats.new_tokens == len(gen.token_ids) >= 1
    assert len(gen.stats.prefill_tokens_per_layer) == layers == len(gen.stats.decode_keys_per_layer)
    assert all(0 < k <= len(PROMPT) + NEW_TOKENS for k in gen.stats.decode_keys_per_layer)


def gemma_engine(name: str) -> tokensieve.Engine:
    model, tok = presets.build(deep(name), seed=5)
    return tokensieve.load(model, tokenizer=tok)


def test_omnikv_filters_and_sliminfer_prunes_on_global_layers_only():
    """Gemma 3 with 12 layers: global layers 2, 5, 8, 11. The paper's layers move to the nearest of them."""
    engine = gemma_engine("gemma3-local-rope")
    spec = engine.model.spec
    assert [i for i, w in enumerate(spec.layer_windows) if w is None] == [2, 5, 8, 11]
    omni = engine.generate(PROMPT, max_new_tokens=2, method=PRUNING["omnikv"]).stats.method_stats
    assert omni["filter_layers_asked"] == [1, 3, 7] and omni["filter_layers"] == [2, 8]  # 1 and 3 meet at 2
    slim = engine.generate(PROMPT, max_new_tokens=2, method=PRUNING["sliminfer"]).stats.method_stats
    assert slim["prune_layers_asked"] == [4, 8, 11] and slim["prune_layers"] == [5, 8, 11]
    assert all(spec.layer_windows[layer] is None for layer in omni["filter_layers"] + slim["prune_layers"])


def test_nearest_global_layer():
    spec = gemma_engine("gemma2-softcap-local-global").model.spec  # odd layers are global
    assert [spec.nearest_global_layer(layer) for layer in range(4)] == [1, 1, 1, 3]  # ties go to the earlier
    mistral = gemma_engine("mistral-sliding").model.spec  # every layer windowed: nothing to move to
    assert [mistral.nearest_global_layer(layer) for layer in range(3)] == [0, 1, 2]


# -- Qwen3: the methods score the queries and keys after the q/k norms and RoPE ----------------------------------


def selection_trace(engine: tokensieve.Engine, method, probe_layer: int) -> list[list[int]]:
    """The positions of the rows computed and of the keys attended at `probe_layer`, over a prefill and one
    teacher-forced decode step (a fixed token, so only the method's choices can differ between two runs)."""
    model, trace = engine.model, []
    qkv, attend = model.qkv, model.attend

    def recording_qkv(layer, h, pos):
        if layer == probe_layer:
            trace.append(pos.tolist())
        return qkv(layer, h, pos)

    def recording_attend(layer, q, q_pos, k, v, k_pos, hidden=None, newest=False):
        if layer == probe_layer:
            trace.append(sorted(k_pos[~hidden].tolist() if hidden is not None else k_pos.tolist()))
        return attend(layer, q, q_pos, k, v, k_pos, hidden, newest)

    model.qkv, model.attend = recording_qkv, recording_attend
    try:
        engine.next_token_logits(PROMPT, [65], method=method)
    finally:
        model.qkv, model.attend = qkv, attend
    return trace


# method -> (the layer whose q/k norms change, the layer where that layer's choice shows)
SCORING = {
    "lazyllm": (LazyLLM(prune_layers=(4,), budgets=(0.3,)), 4, 5),  # rows entering the next layer
    "sliminfer": (SlimInfer(prune_layers=(4,), budgets=(64,), block_size=16, unit_size=4), 4, 5),
    "omnikv": (OmniKV(filter_layers=(4,), budget=24, offload=False), 4, 6),  # the first sparse layer's keys
    "snapkv": (SnapKV(budget=40, window=8), 4, 4),  # the keys the layer keeps
    "h2o": (H2O(budget=40), 4, 4),
}


def test_every_scoring_method_is_in_the_qk_norm_test():
    scoring = {name for name in METHODS if name not in ("dense", "streaming_llm")}  # these two never score
    assert set(SCORING) == scoring


@pytest.mark.parametrize("name", sorted(SCORING))
def test_qwen3_qk_norm_weights_change_the_selection(name):
    """Rescaling layer 4's q/k norm weights changes nothing before layer 4, so a method that scored the
    projections before the norm (kvpress issue 76) would choose the same tokens; this one must not."""
    method, layer, probe = SCORING[name]
    model, tok = presets.build(deep("qwen3-qk-norm"), seed=5)
    engine = tokensieve.load(model, tokenizer=tok)
    before = selection_trace(engine, method, probe)
    assert selection_trace(engine, method, probe) == before  # deterministic
    rescale_qk_norms(model, 9)  # a later layer: the choice at `layer` cannot see it
    assert selection_trace(engine, method, probe) == before
    rescale_qk_norms(model, layer)
    assert selection_trace(engine, method, probe) != before


def rescale_qk_norms(model, layer: int) -> None:
    attn = model.model.layers[layer].self_attn
    gen = torch.Generator().manual_seed(layer)
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.mul_(torch.rand(norm.weight.shape, generator=gen) * 4 + 0.1)
