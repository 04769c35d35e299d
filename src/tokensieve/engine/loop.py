"""The layer loop: a prompt (or a later turn) through every layer in chunks, and one decode step.

Plain functions over a session's state (the model, the policy, the per-layer KV), as readable steps:

- `prefill`: the first prompt, a layer at a time. At each layer its rows go through q/k/v, attention and
  the MLP in chunks of at most `chunk` rows, so peak activation memory stays flat as the prompt grows; the policy's keep
  decisions are taken after the layer has seen every row, so chunking never changes a decision.
- `extend`: a later turn over a retained cache, a layer at a time too. Its rows attend to what the policy
  exposes of each layer's cache (`Policy.extend_context`) and to each other; nothing of the turn is pruned.
- `decode_batch`: one new token of each sequence through every layer, each policy choosing its rows and
  context per layer.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from ..cache import Kind, LayerKV
from ..methods import Context, LayerStep, Policy, Rows
from ..model import DecoderModel
from .pool import BatchPool


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
    plus revived ones), keys attended per layer, steps.

    Keys hidden by a mask whose size only the device knows (`Context.hidden_count` a tensor) are summed on
    the device and read once, by `keys_per_layer`: counting adds no device sync to a decode layer.
    """

    rows_per_layer: list[int]
    entries_per_layer: list[int]  # context entries, minus the hidden ones the host knows of
    steps: int = 0
    device_hidden_per_layer: torch.Tensor | None = None

    @staticmethod
    def zeros(layers: int) -> DecodeCounts:
        return DecodeCounts([0] * layers, [0] * layers)

    def add(self, layer: int, rows: int, context: Context) -> None:
        """Count one sequence's rows and attended keys at `layer` in one step."""
        self.rows_per_layer[layer] += rows
        attended = context.attended()
        if isinstance(attended, int):
            self.entries_per_layer[layer] += attended
            return
        self.entries_per_layer[layer] += context.pos.shape[0]
        if self.device_hidden_per_layer is None:
            self.device_hidden_per_layer = attended.new_zeros(len(self.rows_per_layer))
        self.device_hidden_per_layer[layer] += context.hidden_count

    def add_dense_step(self, kv: list[LayerKV]) -> None:
        """Count a step of one sequence decoded densely: one row per layer, every entry of each layer attended."""
        self.rows_per_layer = [rows + 1 for rows in self.rows_per_layer]
        self.entries_per_layer = [
            entries + len(layer) for entries, layer in zip(self.entries_per_layer, kv, strict=True)
        ]

    @property
    def keys_per_layer(self) -> list[int]:
        """Keys attended per layer, summed over the steps (one read of the device's counts, if any)."""
        if self.device_hidden_per_layer is None:
            return list(self.entries_per_layer)
        hidden = self.device_hidden_per_layer.tolist()
        return [entries - n for entries, n in zip(self.entries_per_layer, hidden, strict=True)]


@dataclass
class PrefillRequest:
    """One sequence's part of a prefill: its policy and KV, and its first prompt's ids."""

    policy: Policy
    kv: list[LayerKV]
    ids: list[int]


def prefill(
    model: DecoderModel, batch: list[PrefillRequest], chunk: int | None
) -> Generator[int, None, list[tuple[torch.Tensor, PromptPass]]]:
    """First prompts (positions 0..n-1) through every layer, one layer per `next()` (it yields the layer
    just done), so that a scheduler can run other sequences' decode steps between layers; returns each
    prompt's last logits and what was computed (the tokens entering each layer).

    Several prompts go through the projections and the MLP together (one matmul per weight: what pays for
    short prompts), attention and every policy decision per sequence. Running the layers at any pace, or
    with other prompts beside, changes no decision: a layer's decisions depend only on its own sequence's
    rows."""
    rows = [_embed(model, seq.ids, 0) for seq in batch]
    records = [PromptPass(len(seq.ids)) for seq in batch]
    for layer in range(model.spec.num_layers):
        steps = []
        written = _write_kv(model, layer, rows, [seq.kv[layer] for seq in batch], chunk, Kind.PROMPT)
        for seq, part, (q, k), record in zip(batch, rows, written, records, strict=True):
            record.tokens_per_layer.append(len(part))
            cache = seq.kv[layer]
            step = LayerStep(layer, _self_attention(model, layer, part, q, k, cache, chunk), q, k, cache)
            seq.policy.prefill_observe(step)
            step = step.select(seq.policy.prefill_keep_after_attention(step))
            record.mlp_tokens_per_layer.append(len(step.rows))
            steps.append(step)
        h = _mlp(model, layer, _cat([step.rows.h for step in steps]), chunk)
        rows, start = [], 0
        for seq, step in zip(batch, steps, strict=True):
            step = step.with_rows(step.rows.with_h(h[start : start + len(step.rows)]))
            start += len(step.rows)
            step = step.select(seq.policy.prefill_keep_after_layer(step))
            seq.policy.prefill_layer_done(step)
            rows.append(step.rows)
        yield layer
    return [(model.logits(part.h[-1]), record) for part, record in zip(rows, records, strict=True)]


def extend(
    model: DecoderModel, policy: Policy, kv: list[LayerKV], ids: list[int], start: int, chunk: int | None
) -> Generator[int, None, tuple[torch.Tensor, PromptPass]]:
    """Tokens `ids` at positions `start...` appended to a retained cache, one layer per `next()` as in
    `prefill`; returns the last one's logits. A turn's rows depend on nothing but this sequence's cache."""
    rows = _embed(model, ids, start)
    record = PromptPass(len(ids))
    for layer in range(model.spec.num_layers):
        record.tokens_per_layer.append(len(rows))
        cache = kv[layer]
        [(q, k)] = _write_kv(model, layer, [rows], [cache], chunk, Kind.TURN)
        context = policy.extend_context(LayerStep(layer, rows, q, k, cache))
        record.unseen_per_layer.append(start - (len(context) - len(rows)))
        rows = _attend_in_chunks(model, layer, rows, q, context, chunk or len(rows))
        record.mlp_tokens_per_layer.append(len(rows))
        rows = rows.with_h(_mlp(model, layer, rows.h, chunk))
        policy.extend_layer_done(LayerStep(layer, rows, q, k, cache))
        yield layer
    return model.logits(rows.h[-1]), record


@dataclass
class DecodeRequest:
    """One sequence's part of a decode step: its key, policy and KV, the token to compute and its position."""

    key: int
    policy: Policy
    kv: list[LayerKV]
    token: int
    position: int
    counts: DecodeCounts


def decode_batch(model: DecoderModel, batch: list[DecodeRequest], pool: BatchPool | None = None) -> torch.Tensor:
    """One decode step of several sequences, each with its own policy and KV; returns logits `[batch, vocab]`.

    The rows of every sequence go through the projections and the MLP together (one matmul per weight);
    attention runs per sequence, over the context its own policy selects (ragged, never padded), except for
    the dense sequences that `pool` takes (`engine/pool.py`): their entries are written and attended in one
    call per layer, each in its own slot. Their rows come first, one block, a slice of every projection.
    """
    for seq in batch:
        seq.policy.decode_step_start(seq.position)
    dense = [i for i, seq in enumerate(batch) if seq.policy.dense_decode]
    group = None if pool is None else pool.admit([(batch[i].key, batch[i].kv) for i in dense])
    pooled = dense if group is not None else []
    alone = sorted(set(range(len(batch))) - set(pooled))
    n = len(pooled)
    block = _embed_tokens(model, [batch[i].token for i in pooled], [batch[i].position for i in pooled]) if n else None
    rows = {i: _embed(model, [batch[i].token], batch[i].position) for i in alone}
    for layer in range(model.spec.num_layers):
        for i in alone:
            rows[i] = batch[i].policy.decode_rows(layer, rows[i])
        parts = ([block] if n else []) + [rows[i] for i in alone]
        h, pos = _cat([part.h for part in parts]), _cat([part.pos for part in parts])
        q, k, v = model.qkv(layer, h, pos)
        outputs, done, sizes = [], [], [len(rows[i]) for i in alone]
        if n:  # the pooled rows come first
            outputs.append(group.attend(model, layer, q[:, :n], k[:, :n], v[:, :n], pos[:n]))
        if alone:
            seqs, own_rows = [batch[i] for i in alone], [rows[i] for i in alone]
            done = _attend_alone(model, layer, seqs, own_rows, q[:, n:], k[:, n:], v[:, n:], sizes)
            outputs += [output for output, _, _ in done]
        h = model.mlp(layer, model.attention_output(layer, h, _cat(outputs, dim=1)))
        if n:
            block = block.with_h(h[:n])
        for i, h_i, (_, step, context) in zip(alone, h[n:].split(sizes) if alone else [], done, strict=True):
            rows[i] = batch[i].policy.decode_layer_done(step.with_rows(step.rows.with_h(h_i)), context)
    for i in pooled:
        batch[i].counts.add_dense_step(batch[i].kv)
    for seq in batch:
        seq.policy.decode_step_done()
        seq.counts.steps += 1
    last = _cat(([block.h] if n else []) + [rows[i].h[-1:] for i in alone])
    order = pooled + alone
    if order != sorted(order):  # back to the batch's order
        last = last[torch.tensor(order, device=last.device).argsort()]
    return model.logits(last)


def _attend_alone(
    model: DecoderModel,
    layer: int,
    seqs: list[DecodeRequest],
    rows: list[Rows],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sizes: list[int],
) -> list[tuple[torch.Tensor, LayerStep, Context]]:
    """Each of `seqs` (rows of `sizes` in `q`, `k`, `v`) appends its entries and attends over the context
    its policy chooses; each one's output, step and context."""
    done = []
    per_seq = zip(seqs, rows, q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1), strict=True)
    for seq, part, q_i, k_i, v_i in per_seq:
        _append_decoded(seq.kv[layer], k_i, v_i, part.pos)
        step = LayerStep(layer, part, q_i, k_i, seq.kv[layer])
        context = seq.policy.decode_context(step)
        seq.counts.add(layer, len(part), context)
        output = model.attend(layer, q_i, part.pos, context.k, context.v, context.pos, context.hidden, True)
        done.append((output, step, context))
    return done


def _append_decoded(cache: LayerKV, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    """A decode step's entries: the new token (the last row), after any revived prompt tokens (LazyLLM)."""
    if len(pos) == 1:  # the usual step: no slicing
        cache.append(k, v, pos, Kind.GENERATED)
        return
    cache.append(k[:, :-1], v[:, :-1], pos[:-1], Kind.REVIVED)
    cache.append(k[:, -1:], v[:, -1:], pos[-1:], Kind.GENERATED)


def _cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """`torch.cat`, without a copy for a single part (a batch of one is the usual decode step)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _embed_tokens(model: DecoderModel, ids: list[int], positions: list[int]) -> Rows:
    """One token of each of several sequences, at their own positions."""
    tokens, positions = torch.tensor([ids, positions], device=model.device)
    return Rows(model.embed(tokens), positions)


def _embed(model: DecoderModel, ids: list[int], start: int) -> Rows:
    tokens = torch.tensor(ids, device=model.device)
    return Rows(model.embed(tokens), torch.arange(start, start + len(ids), device=model.device))


def _write_kv(
    model: DecoderModel, layer: int, rows: list[Rows], caches: list[LayerKV], chunk: int | None, kind: Kind
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each sequence's queries and keys at `layer`, with its keys and values appended to its cache as `kind`.

    The rows of every sequence go through the projections together, `chunk` rows at a time (so a long
    prompt's activations stay bounded); the queries `[heads, n, d]` and keys `[kv_heads, n, d]` are what
    the policy scores with. `caches`: each sequence's KV at this layer.
    """
    h, pos = _cat([part.h for part in rows]), _cat([part.pos for part in rows])
    bounds = [0, *accumulate(len(part) for part in rows)]
    queries: list[list[torch.Tensor]] = [[] for _ in rows]
    step = chunk or len(h)
    for begin in range(0, len(h), step):
        end = min(begin + step, len(h))
        q, k, v = model.qkv(layer, h[begin:end], pos[begin:end])
        for i, cache in enumerate(caches):  # the part of this chunk that is sequence i's
            first, last = max(begin, bounds[i]), min(end, bounds[i + 1])
            if first < last:
                mine = slice(first - begin, last - begin)
                cache.append(k[:, mine], v[:, mine], pos[first:last], kind)
                queries[i].append(q[:, mine])
    return [
        (_cat(parts, dim=1), cache.keys[:, -len(part) :])
        for parts, cache, part in zip(queries, caches, rows, strict=True)
    ]


def _self_attention(
    model: DecoderModel, layer: int, rows: Rows, q: torch.Tensor, k: torch.Tensor, cache: LayerKV, chunk: int | None
) -> Rows:
    """A first prompt's rows attend causally to their own keys (the cache's last entries), in chunks of rows
    when asked, and add the output projection."""
    if chunk is None or len(rows) <= chunk:
        attn = model.causal_attention(layer, q, k, cache.values[:, -len(rows) :], rows.pos)
        return rows.with_h(model.attention_output(layer, rows.h, attn))
    return _attend_in_chunks(model, layer, rows, q, Context.of(cache), chunk, own=True)


def _attend_in_chunks(
    model: DecoderModel, layer: int, rows: Rows, q: torch.Tensor, context: Context, chunk: int, own: bool = False
) -> Rows:
    """Each chunk of rows attends to `context` (masked by position) and adds its output projection.

    `own`: the context is the rows' own keys, in row order (a first prompt), so a chunk sees only the keys
    up to its last row: the later ones are all masked, and scoring them would double the attention work.
    """
    outputs = []
    for begin in range(0, len(rows), chunk):
        part = slice(begin, begin + chunk)
        keys = slice(0, begin + chunk) if own else slice(None)
        k, v, k_pos = context.k[:, keys], context.v[:, keys], context.pos[keys]
        hidden = None if context.hidden is None else context.hidden[keys]
        attn = model.attend(layer, q[:, part], rows.pos[part], k, v, k_pos, hidden)
        outputs.append(model.attention_output(layer, rows.h[part], attn))
    return rows.with_h(outputs[0] if len(outputs) == 1 else torch.cat(outputs))


def _mlp(model: DecoderModel, layer: int, h: torch.Tensor, chunk: int | None) -> torch.Tensor:
    if chunk is None or len(h) <= chunk:
        return model.mlp(layer, h)
    return torch.cat([model.mlp(layer, h[begin : begin + chunk]) for begin in range(0, len(h), chunk)])
