"""Adapter over a Hugging Face decoder: its own modules and weights, called one piece at a time.

The engine owns the layer loop; this file only knows how to run the pieces of one layer on a set of
rows (tokens) at given positions. Using the Hugging Face modules themselves (projections, norms, MLP,
rotary embedding) is what makes the dense path match `transformers` exactly. What differs between
families is named once, in `models.families.FAMILIES`; per-layer facts (sliding window, RoPE base, attention scale,
soft-capping) are read from the Hugging Face modules and config, so each layer runs as its model says.

Shapes: hidden states are `[n, hidden]` (batch size 1, rows = tokens); queries `[heads, n, head_dim]`;
keys and values `[kv_heads, n, head_dim]`. Under tensor parallelism (`parallel.shard`) the heads are this
rank's, and the output projection and the MLP sum their partial outputs over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from .attention import attend, attend_slots, causal_attention
from .collectives import sum_partials
from .models.families import FAMILIES, SUPPORTED_ARCHITECTURES, check_supported, layer_window
from .models.rope import apply_rope, layer_rotaries

__all__ = ["SUPPORTED_ARCHITECTURES", "DecoderModel", "ModelSpec", "check_supported"]


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
    layer_windows: tuple[int | None, ...] = field(default=())
    """Each layer's sliding window in tokens, None for a global (full-attention) layer; () means all global."""
    tensor_parallel_size: int = 1
    """Ranks the heads and MLP columns are split over; the head and MLP counts above are one rank's."""

    def __post_init__(self):
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")

    @cached_property
    def windowed(self) -> tuple[tuple[int, int], ...]:
        """(layer, window) of each windowed layer; () when every layer is global."""
        return tuple((layer, window) for layer, window in enumerate(self.layer_windows) if window is not None)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of one token's keys and values at one layer."""
        return 2 * self.num_kv_heads * self.head_dim * torch.empty(0, dtype=dtype).element_size()

    def nearest_global_layer(self, layer: int) -> int:
        """The global layer nearest to `layer` (the earlier one on a tie): where a method that scores the
        whole prompt must sit, since a windowed layer sees only its window. `layer` itself when it is global,
        or when every layer is windowed (there is nothing to move to)."""
        globals_ = [i for i, window in enumerate(self.layer_windows) if window is None]
        if not globals_:
            return layer
        return min(globals_, key=lambda i: (abs(i - layer), i))


class DecoderModel:
    """A dense causal LM of one of `SUPPORTED_ARCHITECTURES`, seen as embed, layers and head."""

    def __init__(self, hf_model: nn.Module):
        config = hf_model.config
        check_supported(config)
        self.family = FAMILIES[config.model_type]
        self.hf = hf_model.eval()
        self.config = config
        body = hf_model.model
        self.embed_tokens = body.embed_tokens
        self.layers = list(body.layers)
        self.norm = body.norm
        self.lm_head = hf_model.lm_head
        first = self.layers[0].self_attn
        self.scale = first.scaling  # Gemma: query_pre_attn_scalar ** -0.5
        self.softcap = getattr(first, "attn_logit_softcapping", None)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        windows = tuple(layer_window(config, layer.self_attn) for layer in self.layers)
        self.spec = ModelSpec(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=first.head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            model_type=config.model_type,
            layer_windows=windows,
        )
        self._rotary, self._rope_kind = layer_rotaries(body, config)
        self._rope_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        if self.family.scaled_embedding and not hasattr(self.embed_tokens, "embed_scale"):
            # transformers < 5 scales Gemma 2's embeddings in the model's forward, rounded to their dtype
            h = h * torch.tensor(self.config.hidden_size**0.5, dtype=h.dtype)
        return h

    def rope(self, layer: int, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[n, rotary_dim]` of layer `layer` for the given original positions (RoPE scaling included).

        The tables of the last `positions` tensor are kept per RoPE kind (Gemma 3 has a local and a global
        base): every layer of a step rotates the same rows, so they are computed once per step and kind.
        """
        kind = self._rope_kind[layer]
        cached = self._rope_cache.get(kind)
        if cached is not None and cached[0] is positions:
            return cached[1], cached[2]
        cos, sin = self._rotary[kind](like, positions[None])
        self._rope_cache[kind] = (positions, cos[0], sin[0])
        return cos[0], sin[0]

    def qkv(self, layer: int, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of rows `h` at original positions `pos`, at layer `layer`, RoPE applied:
        the queries and keys the layer attends with (after Qwen3's and Gemma 3's q/k norms)."""
        attn = self.layers[layer].self_attn
        x = self.layers[layer].input_layernorm(h)
        n, d = x.shape[0], self.spec.head_dim
        if self.family.fused_qkv:
            q_size, kv_size = self.spec.num_heads * d, self.spec.num_kv_heads * d
            q, k, v = attn.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q, k, v = q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d)
        if self.family.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self.rope(layer, pos, x)
        return apply_rope(q.transpose(0, 1), cos, sin), apply_rope(k.transpose(0, 1), cos, sin), v.transpose(0, 1)

    def causal_attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """Layer `layer`'s causal self-attention of rows sorted by original positions `pos` (the keys are the
        rows' own); a windowed layer measures its window in positions."""
        window = self.spec.layer_windows[layer]
        return causal_attention(q, k, v, self.scale, pos=pos, window=window, softcap=self.softcap)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        q_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pos: torch.Tensor,
        hidden: torch.Tensor | None = None,
        newest: bool = False,
    ) -> torch.Tensor:
        """Layer `layer`'s attention of queries at `q_pos` over keys at `k_pos` (see `attention.attend`)."""
        window = self.spec.layer_windows[layer]
        return attend(q, q_pos, k, v, k_pos, self.scale, hidden, window=window, softcap=self.softcap, newest=newest)

    def attend_slots(
        self,
        layer: int,
        q: torch.Tensor,
        q_pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pos: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Layer `layer`'s decode attention of one query per sequence over its batch-pool slot (see
        `attention.attend_slots`)."""
        window = self.spec.layer_windows[layer]
        return attend_slots(q, q_pos, k, v, k_pos, lengths, self.scale, window=window, softcap=self.softcap)

    def attention_output(self, layer: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual add of the output projection of `attn` `[heads, n, head_dim]` (Gemma normalises it first)."""
        block = self.layers[layer]
        out = sum_partials(block.self_attn.o_proj(attn.transpose(0, 1).reshape(attn.shape[1], -1)))
        if self.family.sandwich_norms:
            out = block.post_attention_layernorm(out)
        return h + out

    def mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        block = self.layers[layer]
        if self.family.sandwich_norms:
            return h + block.post_feedforward_layernorm(sum_partials(block.mlp(block.pre_feedforward_layernorm(h))))
        return h + sum_partials(block.mlp(block.post_attention_layernorm(h)))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, in fp32 (callers pass only the rows they need); Gemma 2 soft-caps them."""
        logits = self.lm_head(self.norm(h)).float()
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
