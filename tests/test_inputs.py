"""Bad input through the API: each a clear error naming the argument, raised before any prefill runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokensieve
from conftest import random_prompt
from tokensieve import presets
from tokensieve.generation import TextStream
from tokensieve.methods import H2O, OmniKV, SlimInfer, resolve_method


@pytest.fixture(scope="module")
def engine() -> tokensieve.Engine:
    model, tok = presets.build("tiny", seed=5, max_positions=1024)
    return tokensieve.load(model, tokenizer=tok)


@pytest.fixture
def no_prefill(engine, monkeypatch):
    """The engine with a prefill that fails the test: the error must come before any work."""
    from tokensieve.engine import loop

    def prefill(*args, **kwargs):
        raise AssertionError("the prefill ran before the bad input was refused")

    monkeypatch.setattr(loop, "prefill", prefill)
    return engine


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(stop=""), ValueError, "stop holds an empty string"),
        (dict(stop=["\n", ""]), ValueError, "stop holds an empty string"),
        (dict(stop=[None]), TypeError, "stop string at index 0 is None"),
        (dict(stop=5), TypeError, "stop must be a string or a list of strings"),
        (dict(stop=b"x"), TypeError, "stop must be a string"),
        (dict(prompt=[1, 2, 3], chat=True), ValueError, "chat=True applies the chat template to text"),
        (dict(method="dense("), ValueError, "bad method spec 'dense\\('"),
        (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int >= 1, got True"),
        (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be an int >= 1"),
        (dict(max_new_tokens=-3), ValueError, "max_new_tokens must be an int >= 1"),
        (dict(prompt=b"hello"), TypeError, "prompt is bytes"),
        (dict(prompt=bytearray(b"hi")), TypeError, "prompt is bytes"),
        (dict(prompt=None), TypeError, "token ids must be a list of ints, got NoneType"),
        (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
        (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
        (dict(temperature="0.5"), TypeError, "temperature must be a number"),
        (dict(top_p=float("nan")), ValueError, "top_p must be in \\(0, 1\\]"),
        (dict(top_p=1.5), ValueError, "top_p must be in \\(0, 1\\]"),
        (dict(top_p="1"), TypeError, "top_p must be a number"),
        (dict(temperature=1.0, seed="abc"), TypeError, "seed must be an int"),
        (dict(temperature=1.0, seed=-1), ValueError, "seed must be in \\[0, 2\\*\\*64\\)"),
        (dict(temperature=1.0, seed=True), TypeError, "seed must be an int"),
    ],
)
def test_bad_generation_input_is_refused_before_the_prefill(no_prefill, kwargs, error, message):
    kwargs = {"prompt": "hello", "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=message):
        no_prefill.generate(**kwargs)
    with pytest.raises(error, match=message):
        list(no_prefill.stream(**kwargs))


@pytest.mark.parametrize(
    ("prompt", "error", "message"),
    [
        ([True, False], TypeError, "token id at index 0 is True, a bool"),
        ([5] * 20 + ["7"], TypeError, "token id at index 20 is '7' \\(str\\)"),
        ([5] * 20 + [7.0], TypeError, "token id at index 20 is 7.0 \\(float\\)"),
        ([5] * 20 + [9999], ValueError, "token id 9999 at index 20 is out of range: this model takes \\[0, 258\\)"),
        ([5, -1], ValueError, "token id -1 at index 1 is out of range"),
        (np.array([True, False]), TypeError, "integer dtype, got bool"),
        (torch.tensor([1.0, 2.0]), TypeError, "integer dtype, got torch.float32"),
        (torch.ones(2, 3, dtype=torch.long), ValueError, "one sequence \\(1-D or one row\\), got shape \\(2, 3\\)"),
        (np.array([], dtype=np.int64), ValueError, "prompt is empty"),
        (5, TypeError, "token ids must be a list of ints, got int"),
    ],
)
def test_bad_token_ids_name_the_index_and_the_value(no_prefill, prompt, error, message):
    with pytest.raises(error, match=message):
        no_prefill.generate(prompt, max_new_tokens=2)


def test_numpy_and_torch_token_ids_are_accepted_like_lists(engine):
    ids = random_prompt(40, seed=2)
    expected = engine.generate(ids, max_new_tokens=5).token_ids
    for prompt in (
        np.array(ids, dtype=np.int64),
        np.array(ids, dtype=np.uint16),
        [np.int32(i) for i in ids],
        torch.tensor(ids),
        torch.tensor([ids]),  # one row, as a tokenizer's return_tensors="pt" gives
        tuple(ids),
    ):
        assert engine.encode(prompt) == ids
        assert engine.generate(prompt, max_new_tokens=5).token_ids == expected


def test_next_token_logits_checks_the_continuation(no_prefill):
    with pytest.raises(ValueError, match="continuation token id 9999 at index 1 is out of range"):
        no_prefill.next_token_logits([1, 2, 3], [4, 9999])
    with pytest.raises(TypeError, match="continuation token id at index 0 is True, a bool"):
        no_prefill.next_token_logits([1, 2, 3], [True])


def test_next_token_logits_accepts_numpy_continuations(engine):
    prompt = random_prompt(30, seed=3)
    cont = [7, 8, 9]
    assert torch.equal(engine.next_token_logits(prompt, np.array(cont)), engine.next_token_logits(prompt, cont))
    assert engine.next_token_logits(prompt, []).shape == (1, engine.model.spec.vocab_size)


@pytest.mark.parametrize("spec", ["dense(", "omnikv(budget=8", "omnikv(budget=8))", "omnikv(budget=8) x", "()", ""])
def test_malformed_method_specs_are_errors(spec):
    with pytest.raises(ValueError, match="bad method spec"):
        resolve_method(spec)


def test_well_formed_method_specs_still_resolve():
    assert resolve_method("dense()") == resolve_method("dense")
    assert resolve_method("  omnikv ( budget=8 ) ") == OmniKV(budget=8)


@pytest.mark.parametrize(
    "build",
    [
        lambda: OmniKV(budget=float("nan")),
        lambda: OmniKV(budget=float("inf")),
        lambda: H2O(budget=float("nan")),
        lambda: SlimInfer(budgets=(0.5, float("nan"), 0.1)),
        lambda: resolve_method("omnikv(budget=float('nan'))"),
    ],
)
def test_nan_and_infinite_budgets_are_errors(build):
    with pytest.raises(ValueError, match="budget"):
        build()


def lead_byte_engine(engine, monkeypatch, byte: int):
    """The engine with its LM head biased so that every generated token is `byte` (byte tokenizer)."""
    bias = torch.zeros(engine.model.lm_head.out_features)
    bias[byte] = 1e4
    monkeypatch.setattr(engine.model.lm_head, "bias", torch.nn.Parameter(bias))
    return engine


def test_a_multibyte_character_cut_by_max_new_tokens_is_dropped(engine, monkeypatch):
    lead_byte_engine(engine, monkeypatch, 0xE2)  # the first byte of a 3-byte character, never completed
    gen = engine.generate("hello", max_new_tokens=1)
    assert gen.token_ids == [0xE2] and gen.finish_reason == "length"
    assert gen.text == ""
    assert "".join(engine.stream("hello", max_new_tokens=1)) == ""


def test_text_stream_drops_only_an_incomplete_tail():
    tok = presets.byte_tokenizer()
    stream = TextStream(tok, stop=[])
    pieces = [stream.push(t) for t in tok("ab€")["input_ids"][1:-1]]  # "ab" and 2 of the euro sign's 3 bytes
    assert pieces[-1] == "" and stream.text == "ab\ufffd"  # held back while the next token may complete it
    assert "".join(pieces) + stream.finish() == "ab" and stream.text == "ab"

    stopped = TextStream(tok, stop=["!"])
    invalid = 0xFF  # a byte no UTF-8 text holds (byte tokens have the ids of their bytes)
    for token in [invalid, *tok("!")["input_ids"][1:]]:
        stopped.push(token)
    assert stopped.stopped and stopped.finish() == "" and stopped.text == "\ufffd"  # a real invalid byte stays


def test_session_calls_check_their_input_and_stay_usable(engine):
    session = engine.start("hello")
    with pytest.raises(ValueError, match="stop holds an empty string"):
        session.generate(stop=[""])
    with pytest.raises(TypeError, match="max_new_tokens must be an int >= 1, got True"):
        session.generate(max_new_tokens=True)
    with pytest.raises(TypeError, match="prompt is bytes"):
        session.extend(b" more")
    with pytest.raises(TypeError, match="prompt token id at index 1 is True, a bool"):
        session.extend([5, True])
    session.extend(np.array([5, 6]))
    assert session.generate(max_new_tokens=2).stats.new_tokens == 2
    session.close()
