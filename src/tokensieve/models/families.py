"""The decoder families the adapter runs, what differs between them, and a clear error for the others."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """The quirks of a decoder family, as far as the adapter must know them."""

    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3)
    fused_qkv: bool = False  # one `qkv_proj` for queries, keys and values (Phi-3)
    sandwich_norms: bool = False  # norm after attention and around the MLP (Gemma 2/3)
    scaled_embedding: bool = False  # embeddings times sqrt(hidden_size) (Gemma)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm=True),
    "phi3": Family(fused_qkv=True),
    "gemma2": Family(sandwich_norms=True, scaled_embedding=True),
    "gemma3_text": Family(qk_norm=True, sandwich_norms=True, scaled_embedding=True),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


# What makes a model unsupported, recognised by its config's fields (named in the error).
UNSUPPORTED_TRAITS = {
    "mixture-of-experts": ("num_experts", "num_local_experts", "n_routed_experts"),
    "multimodal": ("vision_config", "audio_config", "text_config"),
    "multi-head latent attention (MLA)": ("kv_lora_rank",),
}


def check_supported(config, where: str = "") -> None:
    """Raise a clear error for a model the adapter cannot run, naming what it can."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(
                f"{model_type}{where} uses bidirectional attention (an encoder): tokensieve runs causal LMs only"
            )
        return
    traits = [
        trait
        for trait, fields in UNSUPPORTED_TRAITS.items()
        if any(getattr(config, name, None) is not None for name in fields)
    ]
    kind = f"{' and '.join(traits)} models are" if traits else "this architecture is"
    hint = " (for Gemma 3's text model, load a Gemma3ForCausalLM checkpoint)" if model_type == "gemma3" else ""
    raise ValueError(
        f"unsupported architecture {model_type!r}{where}: {kind} not supported{hint}; tokensieve supports dense "
        f"text decoders of these model types: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def layer_window(config, attn: nn.Module) -> int | None:
    """A layer's sliding window: set per layer by its attention module (Qwen2/3, Gemma) or for every
    layer by the config (Mistral, Phi-3); None for full attention."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(config, "sliding_window", None)


def hf_attention_implementation(config) -> str:
    """The attention implementation to load a Hugging Face model with: SDPA, except for a model with logit
    soft-capping (Gemma 2), which `transformers` runs, and loads, only with eager attention."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
