"""GGUF loading: a GGUF written here from a tiny random Llama loads and equals the same model from safetensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import tokensieve
from tokensieve import gguf as tsgguf
from tokensieve import presets
from tokensieve.cli import main

gguf = pytest.importorskip("gguf", reason="GGUF loading needs the optional package gguf (make install has it)")

SHAPE = dict(
    model_type="llama",
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
PROMPT = "Once upon a time, a small boat crossed the narrow bridge."


def llama_cpp_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows as llama.cpp stores them (rotary halves interleaved per head); transformers undoes this on load."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, tokenizer, path: Path, architecture: str = "llama") -> Path:
    """`model` (a Hugging Face Llama) and its byte-level tokenizer as an fp32 GGUF file."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny random llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([token for token, _ in vocab])
        writer.add_token_types([gguf.TokenType.NORMAL] * (len(vocab) - 2) + [gguf.TokenType.CONTROL] * 2)
        writer.add_token_scores([0.0] * len(vocab))  # no merges: transformers derives them (none) from scores
        writer.add_bos_token_id(presets.BOS_ID)
        writer.add_eos_token_id(presets.EOS_ID)
        writer.add_add_bos_token(True)
        writer.add_chat_template(TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        weight = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_order(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_order(weight, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """The same random model three ways: in memory, as a safetensors checkpoint, and as a GGUF file."""
    model, tokenizer = presets.build(SHAPE, seed=3)
    tokenizer.chat_template = TEMPLATE
    root = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    return model, root / "hf", write_gguf(model, tokenizer, root / "tiny-llama.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TOKENSIEVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_loads_and_equals_the_safetensors_model(tiny_llama, cache):
    _, hf_dir, gguf_file = tiny_llama
    from_gguf = tokensieve.load(gguf_file, dtype="float32")
    from_hf = tokensieve.load(hf_dir, dtype="float32")
    ids = from_hf.encode(PROMPT)
    assert from_gguf.encode(PROMPT) == ids
    assert from_gguf.encode(PROMPT, chat=True) == from_hf.encode(PROMPT, chat=True)  # the chat template came along
    continuation = list(range(40, 56))
    torch.testing.assert_close(
        from_gguf.next_token_logits(ids, continuation),
        from_hf.next_token_logits(ids, continuation),
        atol=1e-4,
        rtol=0,
    )
    greedy = [engine.generate(PROMPT, max_new_tokens=16).token_ids for engine in (from_gguf, from_hf)]
    assert greedy[0] == greedy[1]


def test_gguf_is_converted_once_into_a_plain_checkpoint(tiny_llama, cache, monkeypatch):
    _, _, gguf_file = tiny_llama
    checkpoint = tsgguf.gguf_checkpoint(gguf_file, torch.float32)
    assert checkpoint.parent == cache / "gguf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}
    assert "quantization_config" not in (checkpoint / "config.json").read_text()

    def no_second_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(tsgguf, "_convert", no_second_conversion)
    assert tsgguf.gguf_checkpoint(gguf_file, torch.float32) == checkpoint
    with pytest.raises(AssertionError, match="converted again"):  # another dtype is another checkpoint
        tsgguf.gguf_checkpoint(gguf_file, torch.bfloat16)


def test_bfloat16_is_dequantized_to_bfloat16(tiny_llama, cache):
    engine = tokensieve.load(tiny_llama[2], dtype="bfloat16")
    assert engine.model.dtype == torch.bfloat16


def test_cli_takes_a_gguf_file(tiny_llama, cache, capsys):
    argv = ["generate", "--model", str(tiny_llama[2]), "--prompt", "abc", "--max-new-tokens", "3", "--stats"]
    assert main(argv) == 0
    assert "prompt tokens" in capsys.readouterr().out


def test_gguf_without_a_tokenizer_loads_for_token_ids(tiny_llama, cache, tmp_path):
    model = tiny_llama[0]
    engine = tokensieve.load(write_gguf(model, None, tmp_path / "no-tokenizer.gguf"))
    assert engine.tokenizer is None
    torch.testing.assert_close(
        engine.next_token_logits([1, 2, 3], [4]), tokensieve.load(tiny_llama[1]).next_token_logits([1, 2, 3], [4])
    )


def test_checkpoint_directory_without_tokenizer_files_loads(tiny_llama, tmp_path):
    model = tiny_llama[0]
    model.save_pretrained(tmp_path / "weights-only")
    engine = tokensieve.load(tmp_path / "weights-only")
    assert engine.tokenizer is None
    assert engine.next_token_logits([5, 6, 7], [8]).shape == (2, model.config.vocab_size)
    gen = engine.generate([5, 6, 7], max_new_tokens=4)  # token ids in, token ids out; no text to show
    assert len(gen.token_ids) == 4 and gen.text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.generate("some text", max_new_tokens=2)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.generate([5, 6, 7], max_new_tokens=2, stop="x")


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"not a gguf file at all" * 4,  # wrong magic
        lambda data: data[: len(data) // 2],  # truncated tensor data
        lambda data: data[:4] + b"\x03\x00\x00\x00" + b"\xff" * 64,  # a header that lies
    ],
)
def test_corrupt_gguf_is_a_clear_error(tiny_llama, cache, tmp_path, damage):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(damage(tiny_llama[2].read_bytes()))
    with pytest.raises(ValueError, match="broken.gguf is not a readable GGUF file"):
        tokensieve.load(broken)
    assert not list(cache.glob("gguf/*"))  # nothing half-written is left for the next load to trust


def test_unsupported_gguf_architecture_is_named(tiny_llama, cache, tmp_path):
    model, _, _ = tiny_llama
    gpt2 = write_gguf(model, None, tmp_path / "other.gguf", architecture="gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2' in .*other.gguf.*llama, mistral, qwen2"):
        tokensieve.load(gpt2)


def test_missing_packages_name_the_install_command(tiny_llama, cache, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"needs the packages accelerate: pip install gguf==\S+ accelerate=="):
        tokensieve.load(tiny_llama[2])


def test_a_file_that_is_not_gguf_and_unknown_names_are_clear_errors(tmp_path):
    text = tmp_path / "weights.bin"
    text.write_text("x")
    with pytest.raises(ValueError, match="weights.bin is a file but not a .gguf file"):
        tokensieve.load(text)
    with pytest.raises(ValueError, match="model 'smollm3' not found: .*embedded model \\(testbed, smollm2\\).*tiny"):
        tokensieve.load("smollm3")


def test_preset_names_load_in_the_api_as_in_the_cli():
    engine = tokensieve.load("tiny")
    assert engine.model.spec.num_layers == presets.PRESETS["tiny"]["num_hidden_layers"]
    assert engine.generate("abc", max_new_tokens=2).stats.new_tokens == 2


def test_cache_dir_defaults_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKENSIEVE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tsgguf.cache_root() == tmp_path / "tokensieve"
    monkeypatch.setenv("TOKENSIEVE_CACHE", "~/elsewhere")
    assert tsgguf.cache_root() == Path.home() / "elsewhere"


def test_checks_before_loading_do_not_convert(tiny_llama, cache, capsys):
    from tokensieve.loading import resolve_model_path

    assert resolve_model_path(tiny_llama[2]) == tiny_llama[2]  # where the model is, not its conversion
    argv = ["generate", "--model", str(tiny_llama[2]), "--prompt", "", "--max-new-tokens", "2"]
    assert main(argv) == 2  # a bad prompt is refused before the model is converted or loaded
    assert not cache.exists()
