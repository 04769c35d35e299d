"""Batch-wide KV slots for the dense sequences of a decode step: one cache write and one attention call per
layer for all of them.

At short contexts a batched decode step costs mostly per-sequence calls: a cache append and an attention
call per sequence and layer (512 of each per step at batch 16 on a 32-layer model), where `transformers`
makes one of each per layer over its padded batch. So the sequences whose policy decodes densely
(`Policy.dense_decode`) keep each layer's KV in a slot of one tensor per layer,
`[slots, kv_heads, capacity, head_dim]`. Their `LayerKV` works in views of its slot (`LayerKV.borrow`), so
policies, sessions and stats see the same layer as before; a step writes the group's new entries with one
indexed copy and attends with one call, each slot masked to its own length.

The price is padding: the call attends over the longest slot's entries in every slot. The pool takes a
group of `MIN_GROUP` sequences or more while the padding is at most `MAX_PADDING` of the keys attended, or
`FREE_PADDING` keys per sequence (about what a call of its own costs on a CPU), and contexts up to
`MAX_KEYS`: beyond, the calls are a small share of a step, while joining and leaving the pool copies a whole
context (and a CPU attends one long query faster alone: `attention.EXPLICIT_MIN_KEYS`). Otherwise, and for
every other policy, each sequence attends alone, in its own buffers. A sequence that
leaves the group gets its entries back in buffers of its own; a layer that needed new buffers meanwhile
(growth, a trimmed window, a parked session) is lent its slot again at its next step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..attention import EXPLICIT_MIN_KEYS
from ..cache import Kind, LayerKV, capacity_for
from ..model import DecoderModel

MIN_GROUP = 2  # a sequence alone gains nothing from a slot
MAX_PADDING = 0.25  # keys attended in padding, at most, as a share of the group's own ...
FREE_PADDING = 256  # ... or this many per sequence, whichever is more
MAX_KEYS = EXPLICIT_MIN_KEYS  # the longest context pooled


class LayerSlots:
    """One layer's slots: keys and values `[slots, kv_heads, capacity, head_dim]`, positions and kinds
    `[slots, capacity]`. A lent slot's keys and values past its entries are zeroed: a masked entry must be
    finite, since it still meets a zero probability (an idle slot's output is dropped, whatever it holds)."""

    def __init__(self, like: LayerKV, slots: int, capacity: int):
        kv_heads, head_dim, device = like.keys.shape[0], like.keys.shape[2], like.device
        self.k = torch.empty(slots, kv_heads, capacity, head_dim, dtype=like.keys.dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.pos = torch.empty(slots, capacity, dtype=torch.long, device=device)
        self.kind = torch.empty(slots, capacity, dtype=torch.uint8, device=device)

    def fits(self, slots: int, entries: int) -> bool:
        """Room for `slots` slots of `entries` entries, without holding more than twice the entries needed."""
        capacity = self.k.shape[2]
        return self.k.shape[0] >= slots and entries <= capacity <= 2 * entries + 64

    def lend(self, kv: LayerKV, slot: int) -> None:
        kv.borrow(self.k[slot], self.v[slot], self.pos[slot], self.kind[slot], self)
        self.k[slot, :, len(kv) :] = 0
        self.v[slot, :, len(kv) :] = 0


@dataclass
class PooledStep:
    """One decode step of the pooled group: each sequence's per-layer KV in batch order, and its slot."""

    layers: list[LayerSlots]
    kvs: list[list[LayerKV]]
    index: torch.Tensor  # the slot of each sequence, `[b]`
    ends: torch.Tensor  # per layer, each sequence's entries before this step, `[layers, b]` (sent once a step)
    longest: list[int]  # per layer, the most entries a sequence holds before this step
    even: list[bool]  # per layer, every sequence holds as many: one call needs no mask
    span: int  # slots one call covers: the highest in use, plus one
    in_order: bool  # the slots are 0..b-1 in batch order: no scatter or gather around the call

    def attend(
        self, model: DecoderModel, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """Write the group's new entries (`k`, `v` `[kv_heads, b, head_dim]` at positions `pos` `[b]`) into
        their slots, and attend each query (`q` `[heads, b, head_dim]`) over its slot; `[heads, b, head_dim]`."""
        store, at, t = self.layers[layer], self.ends[layer], self.longest[layer] + 1
        store.k[self.index, :, at] = k.transpose(0, 1)
        store.v[self.index, :, at] = v.transpose(0, 1)
        store.pos[self.index, at] = pos
        store.kind[self.index, at] = Kind.GENERATED
        for layers in self.kvs:
            layers[layer].record_appended(1, Kind.GENERATED)
        lengths, q_pos, queries = None if self.even[layer] else at + 1, pos, q.transpose(0, 1)
        if not self.in_order:  # idle slots get one (finite) entry and a zero query: their output is dropped
            lengths = at.new_ones(self.span).index_copy(0, self.index, at + 1)
            q_pos = pos.new_zeros(self.span).index_copy(0, self.index, pos)
            queries = queries.new_zeros(self.span, *queries.shape[1:]).index_copy(0, self.index, queries)
        slots = slice(0, self.span)
        keys, values, positions = store.k[slots, :, :t], store.v[slots, :, :t], store.pos[slots, :t]
        out = model.attend_slots(layer, queries, q_pos, keys, values, positions, lengths)
        return (out if self.in_order else out[self.index]).transpose(0, 1)


class BatchPool:
    """The slots of one executor's dense decode group (see the module docstring)."""

    def __init__(self):
        self.layers: list[LayerSlots] = []
        self.slots: dict[int, int] = {}  # sequence key -> its slot
        self._members: dict[int, list[weakref.ref[LayerKV]]] = {}  # to give back what a leaver still holds

    def admit(self, group: list[tuple[int, list[LayerKV]]]) -> PooledStep | None:
        """This step's dense sequences (key and per-layer KV, in batch order) in their slots, lent where
        needed; None, with every slot given back, when the group is too small or too ragged to gain."""
        ends = [[len(kv) for kv in layers] for _, layers in group]
        if not _pays([max(row) + 1 for row in ends]):  # a sequence's longest layer (others may be windowed)
            self.release()
            return None
        keys = {key for key, _ in group}
        for key in [key for key in self.slots if key not in keys]:
            self._leave(key)
        for key, layers in group:
            if key not in self.slots:
                self.slots[key] = min(set(range(len(self.slots) + 1)) - set(self.slots.values()))
                self._members[key] = [weakref.ref(kv) for kv in layers]
        span = max(self.slots.values()) + 1
        for layer in range(len(group[0][1])):
            self._fit(layer, [(self.slots[key], layers[layer]) for key, layers in group], span)
        slots = [self.slots[key] for key, _ in group]
        per_layer = list(zip(*ends, strict=True))
        longest, even = [max(layer) for layer in per_layer], [min(layer) == max(layer) for layer in per_layer]
        device = group[0][1][0].device
        index, ends = torch.tensor(slots, device=device), torch.tensor(ends, device=device).T
        kvs = [layers for _, layers in group]
        return PooledStep(self.layers, kvs, index, ends, longest, even, span, slots == list(range(span)))

    @property
    def holding(self) -> bool:
        """Slots are allocated (some step pooled its sequences since the last release)."""
        return bool(self.layers)

    @property
    def padding_bytes(self) -> int:
        """Bytes of keys and values the slots hold beyond their sequences' entries: what memory admission
        adds to the sessions' own (`Session.device_bytes` counts entries)."""
        members = (ref() for refs in self._members.values() for ref in refs)
        lent = sum(kv.nbytes for kv in members if kv is not None and kv.lender is not None)
        return max(0, sum(2 * store.k.numel() * store.k.element_size() for store in self.layers) - lent)

    def release(self) -> None:
        """Every sequence back in buffers of its own, and the slots freed."""
        for key in list(self.slots):
            self._leave(key)
        self.layers = []

    def _fit(self, layer: int, members: list[tuple[int, LayerKV]], span: int) -> None:
        """Layer `layer`'s slots, large enough for this step's appends, lent to every member not in its own."""
        needed = max(len(kv) for _, kv in members) + 1
        if layer == len(self.layers) or not self.layers[layer].fits(span, needed):
            store = LayerSlots(members[0][1], 1 << (span - 1).bit_length(), capacity_for(needed))
            self.layers[layer : layer + 1] = [store]
        store = self.layers[layer]
        for slot, kv in members:
            if kv.lender is not store:
                store.lend(kv, slot)

    def _leave(self, key: int) -> None:
        del self.slots[key]
        for ref in self._members.pop(key):
            kv = ref()
            if kv is not None and kv.lender is not None:
                kv.own()


def _pays(lengths: list[int]) -> bool:
    """Enough sequences, short enough contexts, and lengths even enough that the padding stays within bounds."""
    if len(lengths) < MIN_GROUP or max(lengths) > MAX_KEYS:
        return False
    padding = max(lengths) * len(lengths) - sum(lengths)
    return padding <= max(MAX_PADDING * sum(lengths), FREE_PADDING * len(lengths))
