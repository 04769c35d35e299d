"""Per-layer KV on the device, each entry with its original position and what it is; the positions a
layer's KV holds in host memory.

Entries are appended in the order they are computed: prompt tokens sorted by position, then generated
tokens, then (LazyLLM) revived tokens, which can be older than the generated ones. Readers therefore
mask by the stored positions, never by slot index.

Each entry also records its `Kind`: which pass computed it (the first prompt's prefill, a later turn, a
decode step's new token, or a prompt token revived in a decode step). The engine's loop says what it
appends; every operation that moves entries (`keep`, `move_last_to`, `swap`, `offload`, growth, `move_to`,
deep copies) moves their kinds along. The host knows the kinds in slot order as runs (`count`, `leading`),
kept as Python ints where entries are appended, so asking costs no device read in a decode step; after an
operation whose effect only the device knows (`keep` by a device index, `move_last_to`) the runs are read
back once, by the next reader (a prompt pass: the evicting policies read no kinds in decode).

Entries a policy moves to host memory (OmniKV's sparse layers' prompt KV, SlimInfer's inactive blocks)
leave the device buffers, and the layer records their positions as host-resident (`host_positions`,
`host_count`); the bytes themselves stay in the policy's host store (`offload.HostRows`).

Buffers grow as a session goes on (a later turn, more new tokens): by an eighth of their size at a time,
so appends stay amortised O(1) while the spare capacity stays small; `reserved_bytes` reports it. A layer
can also work in buffers lent to it (`borrow`: views of a batch pool's slot, `engine/pool.py`); every
operation that needs new buffers (growth, `keep`, `move_to`, a deep copy) gives it buffers of its own again.
"""

from __future__ import annotations

import copy
from enum import IntEnum
from typing import Any

import torch

from .offload import return_freed_memory

# Runs of kinds the host tracks per layer: a prompt, 127 turns and the replies between them. Beyond (or with
# LazyLLM's revival, which starts a run per step) the runs are read back from the device when asked.
MAX_RUNS = 256


class Kind(IntEnum):
    """What computed an entry of a layer's KV."""

    PROMPT = 0  # the first prompt's prefill
    TURN = 1  # a later turn's pass (`extend`); it also computes the previous call's last sampled token
    GENERATED = 2  # a decode step's new token
    REVIVED = 3  # a prompt token computed again in a decode step (LazyLLM's revival), after generated ones


class LayerKV:
    """Growable key/value/position/kind buffers of one layer (batch size 1), and its host-resident positions."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self._k = torch.empty(kv_heads, 0, head_dim, dtype=dtype, device=device)
        self._v = torch.empty_like(self._k)
        self._pos = torch.empty(0, dtype=torch.long, device=device)
        self._kind = torch.empty(0, dtype=torch.uint8, device=device)
        self.length = 0
        self._runs: list[list[int]] | None = []  # [kind, entries] in slot order; None: only the device knows
        self._host_pos = torch.empty(0, dtype=torch.long, device=device)
        self.host_count = 0  # entries held in host memory
        self.lender: Any = None  # who lent the buffers (`borrow`), while the layer works in them

    def __deepcopy__(self, memo: dict) -> LayerKV:
        """A copy with buffers of its own, sized to the entries (never a copy of a lender's whole pool)."""
        twin = copy.copy(self)
        memo[id(self)] = twin
        twin._runs = copy.deepcopy(self._runs)
        twin._host_pos = self.host_positions.clone()
        twin.own()
        return twin

    def __len__(self) -> int:
        return self.length

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, : self.length]

    @property
    def positions(self) -> torch.Tensor:
        return self._pos[: self.length]

    @property
    def kinds(self) -> torch.Tensor:
        """Each entry's `Kind` (uint8 `[length]`, on the device), in slot order."""
        return self._kind[: self.length]

    @property
    def host_positions(self) -> torch.Tensor:
        """Original positions of the entries this layer holds in host memory, sorted (`[host_count]`)."""
        return self._host_pos[: self.host_count]

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kind: Kind) -> None:
        """Add entries `k`, `v` `[kv_heads, n, head_dim]` at original `positions` `[n]`, all of `kind`."""
        n = k.shape[1]
        if self.length + n > self._k.shape[1]:
            self._grow(self.length + n)
        self._k[:, self.length : self.length + n] = k
        self._v[:, self.length : self.length + n] = v
        self._pos[self.length : self.length + n] = positions
        self._kind[self.length : self.length + n] = kind
        self.record_appended(n, kind)

    def record_appended(self, n: int, kind: Kind) -> None:
        """`n` entries of `kind` were written past the last one: by `append`, or by a batch pool into the
        buffers it lent this layer (one write for many sequences)."""
        self.length += n
        if self._runs is not None and n:
            if self._runs and self._runs[-1][0] == kind:
                self._runs[-1][1] += n
            elif len(self._runs) < MAX_RUNS:
                self._runs.append([int(kind), n])
            else:  # revival in every decode step interleaves kinds: read back when asked, not tracked per step
                self._runs = None

    def count(self, *kinds: Kind) -> int:
        """Entries of these kinds on the device (host-side: no device read unless the runs are unknown)."""
        return sum(n for kind, n in self._known_runs() if kind in kinds)

    def leading(self, kind: Kind) -> int:
        """How many entries of `kind` the layer holds, when they are its first slots (a prompt pass's entries
        before anything decode added); a ValueError when some lie elsewhere."""
        runs = self._known_runs()
        first = runs[0][1] if runs and runs[0][0] == kind else 0
        if any(k == kind for k, _ in runs[1 if first else 0 :]):
            layout = ", ".join(f"{k.name} x{n}" for k, n in self.runs())
            raise ValueError(f"this layer's {kind.name} entries are not all its first slots: {layout}")
        return first

    def runs(self) -> list[tuple[Kind, int]]:
        """The kinds in slot order as (kind, entries) runs; read back from the device once when unknown."""
        return [(Kind(kind), n) for kind, n in self._known_runs()]

    def _known_runs(self) -> list[list[int]]:
        if self._runs is None:
            kinds, counts = torch.unique_consecutive(self.kinds, return_counts=True)
            self._runs = [list(run) for run in zip(kinds.tolist(), counts.tolist(), strict=True)]
        return self._runs

    def keep(self, index: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Keep only the entries at slots `index` (an evicting method drops the rest for good).

        `index` is `[t]` (slot indices or a bool mask), or `[kv_heads, t]` for a policy whose KV heads keep
        different entries (SnapKV, H2O). Then slot `j` holds a different entry per head, and records the
        newest position any head keeps there (`positions`, or the stored positions' maximum over heads)
        and that entry's kind: placeholders that hide nothing from a later query.
        The kept entries go into fresh buffers (with the usual headroom), so the old ones are freed now.
        """
        if index.dim() == 1:
            self._replace(self.keys[:, index], self.values[:, index], self.positions[index], self.kinds[index])
            return
        gather = index[..., None].expand(-1, -1, self._k.shape[2])
        stored = self.positions[index]
        newest = stored.argmax(0, keepdim=True)  # per slot, the head that keeps the newest entry
        kinds = self.kinds[index].gather(0, newest)[0]
        positions = stored.amax(0) if positions is None else positions
        self._replace(self.keys.gather(1, gather), self.values.gather(1, gather), positions, kinds)

    def offload(self, index: torch.Tensor) -> None:
        """The entries at slots `index` (`[t]`) now live in host memory (the policy's host store holds their
        bytes): they leave the device, and their positions join `host_positions`."""
        moved = self.positions[index]
        self._host_pos = torch.cat([self.host_positions, moved]).sort().values
        self.host_count += moved.shape[0]
        stays = torch.ones(self.length, dtype=torch.bool, device=self._pos.device)
        stays[index] = False
        self.keep(stays)

    def swap(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Entries from host memory, `k`, `v` `[kv_heads, n, head_dim]` at `positions` `[n]`, take device
        slots `slots` `[n]`, whose entries go to host memory in their place (a swap of blocks: SlimInfer).

        The entering entries take the kinds of those they replace: a swap exchanges entries of one kind.
        Worked out on the device without reading anything back: no sync in a decode step.
        """
        leaving = self._pos[slots]
        self._k[:, slots], self._v[:, slots], self._pos[slots] = k, v, positions
        # The positions that stay on the host, and the leaving ones; the entering ones sort past every real
        # position and are cut (as many enter as leave), so nothing is read back.
        entering = torch.isin(self.host_positions, positions)
        staying = self.host_positions.masked_fill(entering, torch.iinfo(torch.long).max)
        self._host_pos = torch.cat([staying, leaving]).sort().values[: self.host_count]

    def host_lacks(self, positions: torch.Tensor) -> torch.Tensor:
        """Bool per position of `positions`: not among `host_positions` (no device read)."""
        return find_sorted(self.host_positions, positions)[1]

    def _replace(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor) -> None:
        """These entries, and no others, into fresh buffers (with the usual headroom): the old ones are freed now."""
        n = k.shape[1]
        on_cpu, freed = self._k.device.type == "cpu", self.reserved_bytes
        self._k = k.new_empty(k.shape[0], capacity_for(n), k.shape[2])
        self._v = torch.empty_like(self._k)
        self._pos = positions.new_empty(self._k.shape[1])
        self._kind = kinds.new_empty(self._k.shape[1])
        self._k[:, :n], self._v[:, :n], self._pos[:n], self._kind[:n] = k, v, positions, kinds
        self.lender = None
        if on_cpu:
            return_freed_memory(freed)
        self.length = n
        self._runs = [] if n == 0 else None

    def drop_older_than(self, position: int | torch.Tensor) -> int:
        """Drop the entries at positions below `position`; returns how many were dropped.

        A windowed layer's keys older than `newest position - window + 1` are seen by no later query, so
        its cache can shrink to its window. The kept entries keep their order and move to fresh buffers
        (as `keep`: the old ones are freed now); nothing is copied when nothing is dropped. Calling it
        every few steps rather than every step amortises the copy.
        """
        keep = self.positions >= position
        dropped = self.length - int(keep.sum())
        if dropped:
            self.keep(keep)
        return dropped

    def move_last_to(self, slot: int | torch.Tensor) -> None:
        """Overwrite entry `slot` with the last entry and drop the last: an O(1) eviction of `slot`.

        `slot` may give one slot per KV head (`[kv_heads]`) for a policy whose heads keep different entries;
        the stored position and kind of each such slot become the last entry's (the newest, so a per-slot
        maximum over heads stays one).
        """
        last = self.length - 1
        slots = torch.as_tensor(slot, device=self._pos.device).expand(self._k.shape[0])
        heads = torch.arange(self._k.shape[0], device=self._pos.device)
        self._k[heads, slots] = self._k[:, last].clone()  # clones: index_put refuses an overlapping source
        self._v[heads, slots] = self._v[:, last].clone()
        self._pos[slots] = self._pos[last].clone()
        self._kind[slots] = self._kind[last].clone()
        self.length = last
        self._runs = None  # which kind left is the device's to know

    def _grow(self, needed: int) -> None:
        capacity = capacity_for(needed)
        k = self._k.new_empty(self._k.shape[0], capacity, self._k.shape[2])
        self._move_into(k, torch.empty_like(k), self._pos.new_empty(capacity), self._kind.new_empty(capacity))

    def own(self) -> None:
        """Move the entries into buffers of the layer's own (with the usual headroom), e.g. out of a lender's."""
        self._grow(self.length)

    def borrow(
        self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, kinds: torch.Tensor, lender: Any
    ) -> None:
        """Work in buffers `lender` provides (`[kv_heads, capacity, head_dim]` and `[capacity]` views of a batch
        pool's slot) from now on, the entries copied in; `lender` stays set until the layer needs others."""
        if self.length > k.shape[1]:
            raise ValueError(f"lent buffers hold {k.shape[1]} entries, fewer than this layer's {self.length}")
        self._move_into(k, v, positions, kinds, lender)

    def _move_into(self, k, v, positions, kinds, lender: Any = None) -> None:
        n = self.length
        k[:, :n], v[:, :n], positions[:n], kinds[:n] = self.keys, self.values, self.positions, self.kinds
        self._k, self._v, self._pos, self._kind, self.lender = k, v, positions, kinds, lender

    def move_to(self, device: torch.device) -> None:
        """Move the entries (not the spare capacity) to `device`: a retained session parked in host memory,
        and back before it computes again."""
        if self._k.device != device:
            moved = (t.to(device) for t in (self.keys, self.values, self.positions, self.kinds, self.host_positions))
            self._k, self._v, self._pos, self._kind, self._host_pos = moved
            self.lender = None

    @property
    def device(self) -> torch.device:
        return self._k.device

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held (not the spare capacity)."""
        return 2 * self.keys.numel() * self.keys.element_size()

    @property
    def reserved_bytes(self) -> int:
        """Bytes allocated for keys and values, spare capacity included."""
        return 2 * self._k.numel() * self._k.element_size()


def find_sorted(held: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of `positions` lies in sorted `held` (distinct positions), and which of them `held` lacks
    (their index is a placeholder, to be masked), worked out on the device."""
    if len(held) == 0:
        return torch.zeros_like(positions), torch.ones_like(positions, dtype=torch.bool)
    index = torch.searchsorted(held, positions).clamp(max=len(held) - 1)
    return index, held[index] != positions


def capacity_for(needed: int) -> int:
    """Room for `needed` entries plus an eighth (at least 16) for the appends to come."""
    return needed + max(16, needed // 8)
