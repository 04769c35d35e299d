"""Cut a loaded model down to one rank's share of its heads and MLP columns (Megatron-style).

Rank r of N keeps KV heads `[r * kv/N, (r + 1) * kv/N)` and the query heads that share them (GQA groups stay
whole), and MLP columns `[r * I/N, (r + 1) * I/N)`:
- column-parallel (output features cut): q, k, v, gate, up (and their biases, Qwen2);
- row-parallel (input features cut): o and down, whose partial outputs `DecoderModel` sums across ranks
  (`group.sum_partials`); a bias of theirs stays on rank 0 only, so that it is added once;
- replicated: embeddings, norms (Qwen3's and Gemma's per-head q/k norms act on `head_dim`), the LM head.
The model's `spec` then describes one rank: its heads, its KV, its MLP width.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..model import DecoderModel


def check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {size!r}")


def check_divisible(spec, size: int) -> None:
    """A clear error unless `size` ranks can each take an equal share of the heads and the MLP."""
    check_size(size)
    if spec.num_kv_heads < size:
        raise ValueError(
            f"tensor_parallel_size={size} is more than the model's {spec.num_kv_heads} KV heads: every rank needs "
            f"at least one KV head (replicating KV heads across ranks is not supported); pick a size that "
            f"divides {spec.num_kv_heads}"
        )
    for what, count in (("KV heads", spec.num_kv_heads), ("MLP columns", spec.intermediate_size)):
        if count % size:
            sizes = [
                n for n in range(1, spec.num_kv_heads + 1) if spec.num_kv_heads % n == 0 == spec.intermediate_size % n
            ]
            raise ValueError(
                f"tensor_parallel_size={size} does not divide the model's {count} {what}: pick one of "
                f"{', '.join(map(str, sizes))} (the sizes that divide its {spec.num_kv_heads} KV heads and its "
                f"{spec.intermediate_size} MLP columns)"
            )


def shard(model: DecoderModel, rank: int, size: int) -> DecoderModel:
    """Keep rank `rank`'s share of every layer, in place; returns `model` with its per-rank `spec`."""
    spec = model.spec
    check_divisible(spec, size)
    d = spec.head_dim
    q_width, kv_width = spec.num_heads * d // size, spec.num_kv_heads * d // size
    mlp_width = spec.intermediate_size // size
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        if model.family.fused_qkv:
            q_all, kv_all = spec.num_heads * d, spec.num_kv_heads * d
            _keep_outputs(attn.qkv_proj, [(rank * q_width, q_width), (q_all + rank * kv_width, kv_width),
                                          (q_all + kv_all + rank * kv_width, kv_width)])  # fmt: skip
        else:
            _keep_outputs(attn.q_proj, [(rank * q_width, q_width)])
            _keep_outputs(attn.k_proj, [(rank * kv_width, kv_width)])
            _keep_outputs(attn.v_proj, [(rank * kv_width, kv_width)])
        _keep_inputs(attn.o_proj, rank * q_width, q_width, rank)
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: gate and up in one weight, split in half by its forward
            full = spec.intermediate_size
            _keep_outputs(mlp.gate_up_proj, [(rank * mlp_width, mlp_width), (full + rank * mlp_width, mlp_width)])
        else:
            _keep_outputs(mlp.gate_proj, [(rank * mlp_width, mlp_width)])
            _keep_outputs(mlp.up_proj, [(rank * mlp_width, mlp_width)])
        _keep_inputs(mlp.down_proj, rank * mlp_width, mlp_width, rank)
    model.spec = replace(
        spec,
        num_heads=spec.num_heads // size,
        num_kv_heads=spec.num_kv_heads // size,
        intermediate_size=mlp_width,
        tensor_parallel_size=size,
    )
    return model


def _keep_outputs(linear: nn.Linear, spans: list[tuple[int, int]]) -> None:
    """Keep the output features (weight rows, bias entries) in `spans` of (start, length)."""
    index = torch.cat([torch.arange(start, start + length) for start, length in spans]).to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach()[index].contiguous(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[index].contiguous(), requires_grad=False)
    linear.out_features = len(index)


def _keep_inputs(linear: nn.Linear, start: int, length: int, rank: int) -> None:
    """Keep the input features `[start, start + length)` (weight columns); a bias is added on rank 0 only."""
    weight = linear.weight.detach()[:, start : start + length].contiguous()
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None and rank != 0:
        linear.bias = nn.Parameter(torch.zeros_like(linear.bias), requires_grad=False)
    linear.in_features = length
