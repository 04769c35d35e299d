"""The layer loop: a prompt (or a later turn) through every layer in chunks, and one decode step.

Plain functions over a session's state (the model, the policy, the per-layer KV), as readable steps:

- `prefill`: the first prompt. At each layer its rows go through q/k/v, attention and the MLP in chunks
  of at most `chunk` rows, so peak activation memory stays flat as the prompt grows; the policy's keep
  decisions are taken after the layer has seen every row, so chunking never changes a decision.
- `extend`: a later turn over a retained cache. Its rows attend to what the policy exposes of each
  layer's cache (`Policy.extend_context`) and to each other; nothing of the turn is pruned.
- `decode_step`: one new token through every layer, the policy choosing rows and context per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..cache import LayerKV
from ..methods import Context, LayerStep, Policy, Rows
from ..model import DecoderModel


@dataclass
class PromptPass:
    """What one prefill or extension computed: tokens entering each layer, and earlier tokens it could not see."""

    tokens: int
    seconds: float = 0.0
    tokens_per_layer: list[int] = field(default_factory=list)
    unseen_per_layer: list[int] = field(default_factory=list)
    mlp_tokens_per_layer: list[int] = field(default_factory=list)

    def then(self, later: PromptPass) -> PromptPass:
        """This pass followed by a later one, reported together (two turns with no generation between)."""
        return PromptPass(
            self.tokens + later.tokens,
            self.seconds + later.seconds,
            [a + b for a, b in zip(self.tokens_per_layer, later.tokens_per_layer, strict=True)],
            later.unseen_per_layer,
            [a + b for a, b in zip(self.mlp_tokens_per_layer, later.mlp_tokens_per_layer, strict=True)],
        )


@dataclass
class DecodeCounts:
    """What the decode steps of one call computed, counted where it happens: rows per layer (the new token
    plus revived ones), keys attended per layer, steps."""

    rows_per_layer: list[int]
    keys_per_layer: list[int]
    steps: int = 0

    @staticmethod
    def zeros(layers: int) -> DecodeCounts:
        return DecodeCounts([0] * layers, [0] * layers)


def prefill(
    model: DecoderModel, policy: Policy, kv: list[LayerKV], ids: list[int], chunk: int | None
) -> tuple[torch.Tensor, PromptPass]:
    """The first prompt `ids` (positions 0..n-1) through every layer; returns the last position's logits
    and what was computed (the tokens entering each layer)."""
    rows = _embed(model, ids, 0)
    record = PromptPass(len(ids))
    for layer in range(model.spec.num_layers):
        record.tokens_per_layer.append(len(rows))
        cache = kv[layer]
        q, k = _write_kv(model, layer, rows, cache, chunk)
        if chunk is None or len(rows) <= chunk:
            attn = model.causal_attention(layer, q, k, cache.values[:, -len(rows) :], rows.pos)
            rows = rows.with_h(model.attention_output(layer, rows.h, attn))
        else:
            rows = _attend_in_chunks(model, layer, rows, q, Context.of(cache), chunk)
        step = LayerStep(layer, rows, q, k, cache)
        policy.prefill_observe(step)
        step = step.select(policy.prefill_keep_after_attention(step))
        record.mlp_tokens_per_layer.append(len(step.rows))
        step = step.with_rows(step.rows.with_h(_mlp(model, layer, step.rows.h, chunk)))
        step = step.select(policy.prefill_keep_after_layer(step))
        policy.prefill_layer_done(step)
        rows = step.rows
    return model.logits(rows.h[-1]), record


def extend(
    model: DecoderModel, policy: Policy, kv: list[LayerKV], ids: list[int], start: int, chunk: int | None
) -> tuple[torch.Tensor, PromptPass]:
    """Tokens `ids` at positions `start...` appended to a retained cache; returns the last one's logits."""
    rows = _embed(model, ids, start)
    record = PromptPass(len(ids))
    for layer in range(model.spec.num_layers):
        record.tokens_per_layer.append(len(rows))
        cache = kv[layer]
        q, k = _write_kv(model, layer, rows, cache, chunk)
        context = policy.extend_context(LayerStep(layer, rows, q, k, cache))
        record.unseen_per_layer.append(start - (len(context) - len(rows)))
        rows = _attend_in_chunks(model, layer, rows, q, context, chunk or len(rows))
        record.mlp_tokens_per_layer.append(len(rows))
        rows = rows.with_h(_mlp(model, layer, rows.h, chunk))
        policy.extend_layer_done(LayerStep(layer, rows, q, k, cache))
    return model.logits(rows.h[-1]), record


def decode_step(
    model: DecoderModel, policy: Policy, kv: list[LayerKV], token: int, position: int, counts: DecodeCounts
) -> torch.Tensor:
    """One decode step for `token` at `position`; returns the next-token logits."""
    policy.decode_step_start(position)
    rows = _embed(model, [token], position)
    for layer in range(model.spec.num_layers):
        rows = policy.decode_rows(layer, rows)
        counts.rows_per_layer[layer] += len(rows)
        q, k, v = model.qkv(layer, rows.h, rows.pos)
        kv[layer].append(k, v, rows.pos)
        step = LayerStep(layer, rows, q, k, kv[layer])
        context = policy.decode_context(step)
        counts.keys_per_layer[layer] += len(context)
        out = model.attend(layer, q, rows.pos, context.k, context.v, context.pos, context.hidden, newest=True)
        rows = rows.with_h(model.mlp(layer, model.attention_output(layer, rows.h, out)))
        rows = policy.decode_layer_done(step.with_rows(rows), context)
    policy.decode_step_done()
    counts.steps += 1
    return model.logits(rows.h[-1])


def _embed(model: DecoderModel, ids: list[int], start: int) -> Rows:
    tokens = torch.tensor(ids, device=model.device)
    return Rows(model.embed(tokens), torch.arange(start, start + len(ids), device=model.device))


def _write_kv(
    model: DecoderModel, layer: int, rows: Rows, cache: LayerKV, chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries of every row, and the rows' keys, with their keys and values appended to `cache`.

    The queries `[heads, n, d]` and keys `[kv_heads, n, d]` are what the policy scores with.
    """
    step = chunk or len(rows)
    queries = []
    for begin in range(0, len(rows), step):
        part = slice(begin, begin + step)
        q, k, v = model.qkv(layer, rows.h[part], rows.pos[part])
        cache.append(k, v, rows.pos[part])
        queries.append(q)
    q = queries[0] if len(queries) == 1 else torch.cat(queries, 1)
    return q, cache.keys[:, -len(rows) :]


def _attend_in_chunks(
    model: DecoderModel, layer: int, rows: Rows, q: torch.Tensor, context: Context, chunk: int
) -> Rows:
    """Each chunk of rows attends to `context` (masked by position) and adds its output projection."""
    outputs = []
    for begin in range(0, len(rows), chunk):
        part = slice(begin, begin + chunk)
        attn = model.attend(layer, q[:, part], rows.pos[part], context.k, context.v, context.pos, context.hidden)
        outputs.append(model.attention_output(layer, rows.h[part], attn))
    return rows.with_h(outputs[0] if len(outputs) == 1 else torch.cat(outputs))


def _mlp(model: DecoderModel, layer: int, h: torch.Tensor, chunk: int | None) -> torch.Tensor:
    if chunk is None or len(h) <= chunk:
        return model.mlp(layer, h)
    return torch.cat([model.mlp(layer, h[begin : begin + chunk]) for begin in range(0, len(h), chunk)])
