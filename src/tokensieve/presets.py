"""Random-weight models built in memory: for tests, benchmarks and demos that must not download anything.

`build(name)` returns a Hugging Face model and a byte-level tokenizer (256 byte tokens plus BOS/EOS,
no merges, no training), so every preset works offline and identically on every machine.
"""

from __future__ import annotations

from typing import Any

import torch

from .models.families import hf_attention_implementation

# Shapes of the presets. `cpu-prefill` mimics the compute mix of an 8B model at 32K tokens when run at
# 4-8K on a CPU; `cpu-decode` reads more KV than weights per decode step at long context.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model_type="llama",
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "cpu-prefill": dict(
        model_type="llama",
        num_hidden_layers=32,
        hidden_size=512,
        intermediate_size=1792,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
    "cpu-decode": dict(
        model_type="llama",
        num_hidden_layers=32,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=1,
    ),
    "llama3-8b": dict(
        model_type="llama",
        num_hidden_layers=32,
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}

BOS_ID, EOS_ID = 256, 257
BYTE_VOCAB = 258
MAX_POSITIONS = 131072  # every preset's position limit unless `max_positions=` says otherwise


def byte_tokenizer():
    """A byte-level tokenizer: every UTF-8 byte is one token; BOS is prepended, EOS ends generation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet, key=lambda s: _byte_of(s)))}
    vocab.update({"<s>": BOS_ID, "</s>": EOS_ID})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def _byte_of(symbol: str) -> int:
    """The byte a ByteLevel alphabet symbol stands for (GPT-2's printable byte mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = 256 + extra
            extra += 1
    return {chr(v): k for k, v in mapping.items()}[symbol]


def config_for(name_or_shape: str | dict[str, Any], max_positions: int = MAX_POSITIONS, **overrides):
    """A `transformers` config for a preset name or a dict of shape fields."""
    from transformers import AutoConfig

    shape = dict(PRESETS[name_or_shape]) if isinstance(name_or_shape, str) else dict(name_or_shape)
    shape.update(overrides)
    model_type = shape.pop("model_type", "llama")
    shape.setdefault("vocab_size", BYTE_VOCAB)
    shape.setdefault("bos_token_id", BOS_ID)
    shape.setdefault("eos_token_id", EOS_ID)
    shape.setdefault("max_position_embeddings", max_positions)
    shape.setdefault("tie_word_embeddings", False)
    if model_type == "mistral":
        shape.setdefault("sliding_window", None)
    return AutoConfig.for_model(model_type, **shape)


def build(
    name_or_shape: str | dict[str, Any],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **overrides,
):
    """A random-weight model (eval mode, SDPA attention where the model allows it) and the byte tokenizer,
    from a preset or shape. The weights are drawn on `device` (the same seed gives other weights on CUDA
    than on the CPU)."""
    from transformers import AutoModelForCausalLM

    if isinstance(name_or_shape, str) and name_or_shape not in PRESETS:
        raise ValueError(f"unknown preset {name_or_shape!r}: choose one of {', '.join(PRESETS)}")
    config = config_for(name_or_shape, **overrides)
    config._attn_implementation = hf_attention_implementation(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return model, byte_tokenizer()
