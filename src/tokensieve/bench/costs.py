"""The ceiling: prefill FLOPs and decode bytes of a generation, from the model's shape and its stats.

Prefill is bound by compute. Layer l with n_l tokens entering it costs about `2 * n_l * P_l` FLOPs for the
projections and the MLP (P_l = the layer's parameters) plus `2 * d * n_l^2` for causal attention
(d = query heads x head dim); the LM head runs on the last position only. Decode is bound by memory: each
step reads every weight once plus the keys and values it attends to (and any KV a method copies in from
host memory). The *ideal speedup* of a method is the dense cost over the method's cost, both computed
from what the method reported it did (`Stats`), so the same formula serves every method.

Left out on purpose (small beside the rest): norms, biases, RoPE, softmax, the embedding lookup in
prefill. Layers whose MLP runs on fewer tokens than their attention (SlimInfer's pruning layers) are
counted exactly: the engine reports the tokens reaching each MLP (`Stats.prefill_mlp_tokens_per_layer`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..generation import Stats
from ..model import ModelSpec


def attention_params(spec: ModelSpec) -> int:
    """Parameters of one layer's q, k, v and o projections."""
    q_width, kv_width = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return 2 * spec.hidden_size * q_width + 2 * spec.hidden_size * kv_width


def mlp_params(spec: ModelSpec) -> int:
    """Parameters of one layer's gated MLP (gate, up and down projections)."""
    return 3 * spec.hidden_size * spec.intermediate_size


def layer_params(spec: ModelSpec) -> int:
    """P_l: the parameters of one decoder layer (projections and MLP)."""
    return attention_params(spec) + mlp_params(spec)


def prefill_flops(
    spec: ModelSpec, tokens_per_layer: Sequence[int], mlp_tokens_per_layer: Sequence[int] | None = None
) -> float:
    """FLOPs of a prefill in which `tokens_per_layer[l]` tokens enter layer l (and reach its MLP, unless
    `mlp_tokens_per_layer` says fewer do), plus the LM head on one position."""
    if len(tokens_per_layer) != spec.num_layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries for a {spec.num_layers}-layer model")
    mlp_tokens = tokens_per_layer if mlp_tokens_per_layer is None else mlp_tokens_per_layer
    if len(mlp_tokens) != spec.num_layers:
        raise ValueError(f"mlp_tokens_per_layer has {len(mlp_tokens)} entries for a {spec.num_layers}-layer model")
    d = spec.num_heads * spec.head_dim
    flops = 2 * spec.hidden_size * spec.vocab_size
    for n, m in zip(tokens_per_layer, mlp_tokens, strict=True):
        flops += 2 * n * attention_params(spec) + 2 * m * mlp_params(spec) + 2 * d * n * n
    return float(flops)


def extend_flops(spec: ModelSpec, context: int, new: int) -> float:
    """FLOPs of extending a session of `context` tokens by `new` dense tokens: projections and MLP on the
    new tokens, attention of each to the context and, causally, to the new tokens before it (c = 0: a prefill)."""
    d = spec.num_heads * spec.head_dim
    per_layer = 2 * new * layer_params(spec) + 2 * d * new * (2 * context + new)
    return float(2 * spec.hidden_size * spec.vocab_size + spec.num_layers * per_layer)


def weight_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of weights one decode step reads: every layer, the LM head and one embedding row."""
    params = spec.num_layers * layer_params(spec) + spec.vocab_size * spec.hidden_size + spec.hidden_size
    return params * _element_size(dtype)


def decode_bytes(
    spec: ModelSpec, dtype: torch.dtype, keys_per_layer: Sequence[float], host_bytes_loaded: float = 0.0
) -> float:
    """Bytes one decode step moves: the weights, the KV of `keys_per_layer[l]` keys at each layer, and
    `host_bytes_loaded` copied in from host memory."""
    return weight_bytes(spec, dtype) + kv_step_bytes(spec, dtype, keys_per_layer, host_bytes_loaded)


def kv_step_bytes(
    spec: ModelSpec, dtype: torch.dtype, keys_per_layer: Sequence[float], host_bytes_loaded: float = 0.0
) -> float:
    """One sequence's share of a decode step's bytes: its KV read and what it copied in from host memory."""
    if len(keys_per_layer) != spec.num_layers:
        raise ValueError(f"keys_per_layer has {len(keys_per_layer)} entries for a {spec.num_layers}-layer model")
    return float(sum(keys_per_layer) * spec.kv_bytes_per_token(dtype) + host_bytes_loaded)


def dense_decode_keys(stats: Stats) -> float:
    """Keys the dense model attends to per layer, averaged over the decode steps of `stats`' generation.

    After a prefill (or extension) of the context, the first token comes from it and step k (k = 1 .. T-1)
    attends to the context and k generated tokens: the mean is context + T/2. A call on a session with
    nothing to prefill decodes its first token too (k = 0 .. T-1): context + (T-1)/2.
    """
    if stats.prompt_tokens:
        return max(stats.prompt_tokens, stats.context_tokens) + stats.new_tokens / 2
    return stats.context_tokens + (stats.new_tokens - 1) / 2


def ideal_prefill_speedup(spec: ModelSpec, stats: Stats) -> float:
    """Dense prefill FLOPs over the FLOPs of the prefill `stats` reports."""
    dense = prefill_flops(spec, [stats.prompt_tokens] * spec.num_layers)
    method = prefill_flops(spec, stats.prefill_tokens_per_layer, stats.prefill_mlp_tokens_per_layer or None)
    return dense / method


def ideal_decode_speedup(spec: ModelSpec, dtype: torch.dtype, stats: Stats) -> float | None:
    """Dense bytes per decode step over the bytes per step `stats` reports; None without decode steps."""
    if stats.new_tokens < 2:
        return None
    dense = decode_bytes(spec, dtype, [dense_decode_keys(stats)] * spec.num_layers)
    return dense / decode_bytes(spec, dtype, stats.decode_keys_per_layer, stats.host_bytes_loaded_per_step)


def ideal_batch_decode_speedup(
    spec: ModelSpec, dtype: torch.dtype, dense: Sequence[Stats], method: Sequence[Stats]
) -> float:
    """Bytes of one batched dense decode step over the method's: a batched step reads the weights once for
    every sequence, and each sequence's own KV (and host loads), from each sequence's `Stats`."""

    def step(batch: Sequence[Stats]) -> float:
        kv = (kv_step_bytes(spec, dtype, s.decode_keys_per_layer, s.host_bytes_loaded_per_step) for s in batch)
        return weight_bytes(spec, dtype) + sum(kv)

    return step(dense) / step(method)


def ideal_e2e_speedup(prefill_s: float, decode_s: float, prefill_speedup: float, decode_speedup: float | None) -> float:
    """A whole generation's ideal speedup: a baseline's measured prefill and decode seconds, each divided by
    its phase's ideal speedup (no decode steps: the prefill alone)."""
    ideal_s = prefill_s / prefill_speedup + (decode_s / decode_speedup if decode_speedup else decode_s)
    return (prefill_s + decode_s) / ideal_s


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()
