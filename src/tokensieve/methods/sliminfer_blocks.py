"""SlimInfer's blocks: scoring a layer's prompt entries in blocks, and the decode block manager.

`LayerBlocks` is what a pruning layer's prefill observes (the blocks' unit keys, positions and the active
set); `PrunedLayer` manages those blocks in decode: which block sits in each device slot, the host copies,
and the swaps the rescoring decides (see `methods/sliminfer.py` for the method and its choices).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..attention import grouped_logits
from ..cache import LayerKV
from ..collectives import heads_mean
from ..offload import HostCopy, HostRows, Pending, Transfers
from .base import Context


def unit_keys(block_keys: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Representative keys `[kv_heads, blocks, units, d]` (fp32 means) of block keys `[kv_heads, blocks, size, d]`."""
    return block_keys.float().unflatten(2, (-1, unit_size)).mean(3)


def block_scores(query: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Score `[blocks]` of each block for one query `[heads, d]`: max over units of mean over heads of |q.k|."""
    kv_heads, blocks, per_block, d = units.shape
    logits = grouped_logits(query[:, None], units.reshape(kv_heads, blocks * per_block, d), 1.0)
    return heads_mean(logits.abs().mean(0)).view(blocks, per_block).amax(-1)


def top_blocks(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The sink block 0 and the `count - 1` best-scoring other blocks, sorted."""
    best = scores[1:].topk(count - 1).indices + 1
    return torch.cat([best.new_zeros(1), best]).sort().values


def block_rows(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Row indices of whole blocks, block `b` being rows `b * block_size ... (b + 1) * block_size - 1`."""
    return (blocks[:, None] * block_size + torch.arange(block_size, device=blocks.device)).flatten()


def last_block_len(entries: int, block_size: int) -> int:
    """Entries of the last block when `entries` (>= 1) are cut into blocks from the first: 1 ... block_size."""
    return entries - (entries - 1) // block_size * block_size


def blocks_kept(blocks: int, tail: int, budget: int | None, block_size: int) -> int:
    """Whole blocks (sink included, last block excluded) that fit `budget` beside the last block's `tail` tokens."""
    if budget is None or blocks * block_size + tail <= budget:
        return blocks
    return min(blocks, 1 + max(0, (budget - tail - block_size) // block_size))


class LayerBlocks(NamedTuple):
    """A pruning layer's prompt entries cut into blocks, and the active set, as observed in prefill."""

    units: torch.Tensor  # [kv_heads, blocks, units per block, d], fp32: unit keys of the whole blocks
    positions: torch.Tensor  # [blocks, block_size]: their entries' original positions
    active: torch.Tensor  # [kept blocks], sorted: the sink and the best-scoring blocks within the budget

    @property
    def entries(self) -> int:
        """Entries in the whole blocks; the last block (and, in decode, anything newer) follows them."""
        return self.positions.numel()


class PrunedLayer:
    """A pruning layer's blocks during decode: which block sits in each device slot, unit keys, host copies.

    Device slot `s` holds one block, in entries `s * block_size ...` of the layer's KV (offload: the other
    blocks are the layer's host-resident entries, `LayerKV.host_positions`) or names the entries of that
    block in the layer's full KV (no offload); the last block, generated tokens and later turns follow the
    slots.
    """

    def __init__(self, units: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, host: HostRows | None):
        self.units = units  # [kv_heads, blocks, units per block, d], fp32
        self.positions = positions  # [blocks, block_size]
        self.slots = slots  # [active blocks]: block held by each slot
        self.host = host  # rows [blocks, 2 (k, v), kv_heads, block_size, d], or None
        self.decision: tuple[HostCopy, torch.Tensor] | None = None  # the last rescoring's, not acted on yet
        self.pending: tuple[torch.Tensor, torch.Tensor, Pending | None] | None = None

    @classmethod
    def of(cls, blocks: LayerBlocks, kv: LayerKV, transfers: Transfers | None) -> PrunedLayer:
        """The manager of a layer whose prompt KV is complete in `kv`, its active blocks in the slots. With
        `transfers`, every block is copied to the host store and the device keeps only the active ones."""
        store = cls(blocks.units, blocks.positions, blocks.active, None)
        if transfers is None:
            return store
        whole = blocks.entries
        kv_blocks = torch.stack([kv.keys[:, :whole], kv.values[:, :whole]]).unflatten(2, blocks.positions.shape)
        store.host = HostRows.copy_of(transfers, kv_blocks.permute(2, 0, 1, 3, 4))  # a row per block
        every = torch.arange(len(blocks.positions), device=blocks.active.device)
        kv.offload(block_rows(every[~torch.isin(every, blocks.active)], store.block_size))
        return store

    @property
    def block_size(self) -> int:
        return self.positions.shape[1]

    def decide(self, top: torch.Tensor, transfers: Transfers) -> None:
        """How the new top set `top` differs from the active one, worked out on the device and sent to the
        host without waiting: `[leaving count, slots (leaving ones first), top blocks (entering ones first)]`,
        each part in ascending order. As many blocks enter as leave (both sets hold as many blocks)."""
        leaving = ~torch.isin(self.slots, top)
        entering = ~torch.isin(top, self.slots)
        first = (leaving.sum()[None], (~leaving).argsort(stable=True), top[(~entering).argsort(stable=True)])
        decision = torch.cat(first)
        self.decision = transfers.to_host(decision), decision

    def leaving(self) -> int:
        """Active blocks the last decision takes out, read from its host copy (numpy, not `item()`: a read of
        host memory, which the tests' sync counters would count as a device read)."""
        return int(self.decision[0].read().numpy()[0])

    def overlap(self) -> float:
        """The share of the active blocks the last decision keeps."""
        return 1 - self.leaving() / len(self.slots)

    def settle(self, gamma: float) -> float | None:
        """Act on the last decision, if any: below `gamma` overlap, start loading the entering blocks (`install`
        puts them in place before this layer's next attention). Returns its overlap."""
        if self.decision is None:
            return None
        overlap, leaving, size = self.overlap(), self.leaving(), len(self.slots)
        (host, decision), self.decision = self.decision, None
        if overlap < gamma:  # then at least one block leaves, and as many enter
            entering = slice(1 + size, 1 + size + leaving)
            load = None if self.host is None else self.host.load(host.read()[entering])
            self.pending = (decision[1 : 1 + leaving], decision[entering], load)
        return overlap

    def install(self, kv: LayerKV) -> None:
        """Put the blocks prefetched in the previous step into the slots they replace."""
        if self.pending is None:
            return
        slots, entering, load = self.pending
        self.pending = None
        self.slots[slots] = entering
        if load is None:
            return
        kv_blocks = self.host.rows_of(load.wait())  # [entering, 2, kv_heads, block_size, d]
        keys, values = (kv_blocks[:, i].transpose(0, 1).flatten(1, 2) for i in (0, 1))
        kv.swap(block_rows(slots, self.block_size), keys, values, self.positions[entering].flatten())

    def context(self, kv: LayerKV) -> Context:
        if self.host is not None:
            return Context.of(kv)  # the device holds exactly the slots, the last block and newer entries
        whole = self.positions.numel()
        rest = torch.arange(whole, len(kv), device=self.slots.device)
        return Context.of(kv, torch.cat([block_rows(self.slots, self.block_size), rest]))

    def nbytes(self) -> tuple[int, int]:
        """Bytes on the device (unit keys, positions, slots) and on the host (block copies)."""
        device = sum(t.numel() * t.element_size() for t in (self.units, self.positions, self.slots))
        host = 0 if self.host is None else self.host.nbytes
        return device, host
