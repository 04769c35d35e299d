"""Rotary position embeddings: applying them (partial rotary included) and finding each layer's table."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[heads, n, head_dim]` by the angles of each row's position (`cos`, `sin`: `[n, rotary_dim]`).

    With partial rotary (Phi-4-mini) only the first `rotary_dim` dimensions turn; the rest pass through.
    """
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    turned, kept = x[..., :rotary], x[..., rotary:]
    return torch.cat((turned * cos + rotate_half(turned) * sin, kept), dim=-1)


def layer_rotaries(body: nn.Module, config) -> tuple[dict, list[str]]:
    """The rotary embeddings by kind, and each layer's kind: one for most models; Gemma 3's local layers have
    their own base (a second module before transformers 5, a per-layer-type table in one module since)."""
    layers = config.num_hidden_layers
    rotary = body.rotary_emb
    if hasattr(body, "rotary_emb_local"):
        return {"global": rotary, "local": body.rotary_emb_local}, [
            "local" if t == "sliding_attention" else "global" for t in config.layer_types
        ]
    if isinstance(getattr(rotary, "rope_type", None), dict):
        return {t: partial(rotary, layer_type=t) for t in set(config.layer_types)}, list(config.layer_types)
    return {"rope": rotary}, ["rope"] * layers
