"""Generation API: sampling, stop strings, streaming, teacher-forced logits, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch

import tokensieve
from conftest import random_prompt
from tokensieve import presets
from tokensieve.cli import main as cli_main
from tokensieve.generation import TextStream


@pytest.fixture(scope="module")
def engine() -> tokensieve.Engine:
    model, tok = presets.build("tiny", seed=5, max_positions=1024)
    return tokensieve.load(model, tokenizer=tok)


def test_sampling_with_a_seed_is_reproducible_and_differs_from_greedy(engine):
    prompt = random_prompt(50, seed=1)
    a = engine.generate(prompt, max_new_tokens=24, temperature=1.5, top_p=0.95, seed=7)
    b = engine.generate(prompt, max_new_tokens=24, temperature=1.5, top_p=0.95, seed=7)
    c = engine.generate(prompt, max_new_tokens=24, temperature=1.5, top_p=0.95, seed=8)
    greedy = engine.generate(prompt, max_new_tokens=24)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert a.token_ids != greedy.token_ids


def test_tiny_top_p_is_greedy(engine):
    prompt = random_prompt(50, seed=2)
    nucleus = engine.generate(prompt, max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=0)
    assert nucleus.token_ids == engine.generate(prompt, max_new_tokens=16).token_ids


def test_stop_string_cuts_the_text(engine):
    prompt = random_prompt(40, seed=3)
    full = engine.generate(prompt, max_new_tokens=30)
    stop = next(full.text[i : i + 2] for i in range(5, len(full.text)) if full.text[i : i + 2].isascii())
    cut = engine.generate(prompt, max_new_tokens=30, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text
    assert len(cut.token_ids) < len(full.token_ids)


def test_stream_yields_the_same_text_as_generate(engine):
    prompt = random_prompt(40, seed=7)  # a seed whose (random-weight) output has ASCII runs to stop on
    text = engine.generate(prompt, max_new_tokens=30).text
    start = next(i for i in range(8, len(text)) if text[i].isascii() and text[i + 1].isascii())
    for stop in (None, text[start : start + 2]):
        expected = engine.generate(prompt, max_new_tokens=30, stop=stop)
        stream = engine.stream(prompt, max_new_tokens=30, stop=stop)
        assert stream.generation is None
        pieces = list(stream)
        assert "".join(pieces) == expected.text
        assert len(pieces) > 1
        assert stream.generation.token_ids == expected.token_ids


def test_text_stream_holds_back_partial_stop_strings():
    tok = presets.byte_tokenizer()
    stream = TextStream(tok, stop=["END"])
    out = [stream.push(t) for t in tok("abcEN")["input_ids"][1:]]
    assert "".join(out) == "abc"  # "EN" may start "END": held back
    assert stream.push(tok("X")["input_ids"][1]) == "ENX"
    assert stream.push(tok("E")["input_ids"][1]) == ""
    stream.push(tok("N")["input_ids"][1])
    stream.push(tok("D")["input_ids"][1])
    assert stream.stopped and stream.text == "abcENX"


def test_text_stream_waits_for_complete_utf8():
    tok = presets.byte_tokenizer()
    stream = TextStream(tok, stop=[])
    first, second = tok("é")["input_ids"][1:]
    assert stream.push(first) == ""
    assert stream.push(second) == "é"


def test_generation_stops_at_eos(engine):
    prompt = random_prompt(30, seed=5)
    greedy = engine.generate(prompt, max_new_tokens=8).token_ids
    # Make EOS the argmax right after the first token by biasing the LM head.
    head = engine.model.lm_head
    bias = torch.zeros(head.out_features)
    bias[presets.EOS_ID] = 1e4
    original = head.bias
    head.bias = torch.nn.Parameter(bias)
    try:
        gen = engine.generate(prompt, max_new_tokens=8)
    finally:
        head.bias = original
    assert gen.finish_reason == "eos" and gen.token_ids == [presets.EOS_ID] and greedy[0] != presets.EOS_ID


def test_next_token_logits_follow_generate(engine):
    prompt = random_prompt(60, seed=6)
    gen = engine.generate(prompt, max_new_tokens=10)
    logits = engine.next_token_logits(prompt, gen.token_ids[:-1])
    assert logits.shape == (10, engine.model.spec.vocab_size)
    assert logits.argmax(-1).tolist() == gen.token_ids


def test_token_id_prompt_equals_text_prompt(engine):
    text = "The quick brown fox"
    assert (
        engine.generate(text, max_new_tokens=6).token_ids
        == engine.generate(engine.encode(text), max_new_tokens=6).token_ids
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(prompt=""), ValueError, "prompt is empty"),
        (dict(prompt=[]), ValueError, "prompt is empty"),
        (dict(prompt=[1, 2, 9999]), ValueError, "token id 9999 at index 2 is out of range"),
        (dict(prompt="hi", max_new_tokens=0), ValueError, "max_new_tokens must be"),
        (dict(prompt=[1] * 1000, max_new_tokens=100), ValueError, "beyond the model's 1024 positions"),
        (dict(prompt="hi", method="bogus"), ValueError, "unknown method 'bogus'"),
        (dict(prompt="hi", temperature=-1.0), ValueError, "temperature must be"),
        (dict(prompt="hi", top_p=0.0), ValueError, "top_p must be"),
        (dict(prompt="hi", chat=True), ValueError, "no chat template"),
    ],
)
def test_bad_input_is_a_clear_error(engine, kwargs, error, message):
    with pytest.raises(error, match=message):
        engine.generate(**{"max_new_tokens": 4, **kwargs})


def test_load_rejects_bad_settings(tmp_path):
    model, tok = presets.build("tiny")
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        tokensieve.load(model, tokenizer=tok, dtype="float8")
    with pytest.raises(ValueError, match="unknown device"):
        tokensieve.load(model, tokenizer=tok, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            tokensieve.load(model, tokenizer=tok, device="cuda")
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint directory"):
        tokensieve.load(tmp_path)
    with pytest.raises(ValueError, match="no tokenizer"):
        tokensieve.load(model)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2"):
        tokensieve.load(tmp_path)


def test_checkpoint_directory_and_cli_round_trip(tmp_path, capsys):
    model, tok = presets.build("tiny", seed=9)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = tokensieve.load(tmp_path)
    expected = engine.generate("Hello", max_new_tokens=5)
    assert (
        cli_main(["generate", "--model", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "5", "--stats"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith(expected.text) and "prefill tokens per layer" in out and "name=dense" in out
    assert cli_main(["generate", "--model", str(tmp_path), "--prompt", "Hi", "--method", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
