"""Adapter over a Hugging Face decoder: its own modules and weights, called one piece at a time.

The engine owns the layer loop; this file only knows how to run the pieces of one layer on a set of
rows (tokens) at given positions. Using the Hugging Face modules themselves (projections, norms, MLP,
rotary embedding) is what makes the dense path match `transformers` exactly.

Shapes: hidden states are `[n, hidden]` (batch size 1, rows = tokens); queries `[heads, n, head_dim]`;
keys and values `[kv_heads, n, head_dim]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import attend, causal_attention

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder, as the methods and the cost models need it."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    model_type: str

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of one token's keys and values at one layer."""
        return 2 * self.num_kv_heads * self.head_dim * torch.empty(0, dtype=dtype).element_size()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[heads, n, head_dim]` by the angles of each row's position (`cos`, `sin`: `[n, head_dim]`)."""
    return x * cos + rotate_half(x) * sin


class DecoderModel:
    """A Llama-family causal LM (Llama 2/3/3.1/3.2, Mistral, Qwen2) seen as embed, layers and head."""

    def __init__(self, hf_model: nn.Module):
        config = hf_model.config
        if config.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {config.model_type!r}: tokensieve supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} decoders"
            )
        self.hf = hf_model.eval()
        self.config = config
        body = hf_model.model
        self.embed_tokens = body.embed_tokens
        self.layers = list(body.layers)
        self.norm = body.norm
        self.rotary = body.rotary_emb
        self.lm_head = hf_model.lm_head
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.spec = ModelSpec(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            model_type=config.model_type,
        )
        self.scale = head_dim**-0.5
        self.sliding_window = self._sliding_window(config)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def _sliding_window(config) -> int | None:
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None) or []
        if config.model_type == "qwen2" and "sliding_attention" not in layer_types:
            return None
        return window

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[n, head_dim]` for the given original positions (RoPE scaling included).

        The tables of the last `positions` tensor are kept: every layer of a step rotates the same rows,
        so they are computed once per step (and again only when a policy changes the rows).
        """
        cached = self._rope_cache
        if cached is not None and cached[0] is positions:
            return cached[1], cached[2]
        cos, sin = self.rotary(like, positions[None])
        self._rope_cache = (positions, cos[0], sin[0])
        return cos[0], sin[0]

    def qkv(self, layer: int, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of rows `h` at original positions `pos`, at layer `layer`, RoPE applied."""
        attn = self.layers[layer].self_attn
        x = self.layers[layer].input_layernorm(h)
        n, d = x.shape[0], self.spec.head_dim
        q = attn.q_proj(x).view(n, -1, d).transpose(0, 1)
        k = attn.k_proj(x).view(n, -1, d).transpose(0, 1)
        v = attn.v_proj(x).view(n, -1, d).transpose(0, 1)
        cos, sin = self.rope(pos, x)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def causal_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s causal self-attention of rows sorted by position (the keys are the rows' own)."""
        return causal_attention(q, k, v, self.scale)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        q_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pos: torch.Tensor,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layer `layer`'s attention of queries at `q_pos` over keys at `k_pos` (see `attention.attend`)."""
        return attend(q, q_pos, k, v, k_pos, self.scale, hidden)

    def attention_output(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual add of the output projection of `attn` `[heads, n, head_dim]`."""
        o = attn.transpose(0, 1).reshape(attn.shape[1], -1)
        return h + self.layers[layer].self_attn.o_proj(o)

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        block = self.layers[layer]
        return h + block.mlp(block.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, in fp32 (callers pass only the rows they need)."""
        return self.lm_head(self.norm(h)).float()
