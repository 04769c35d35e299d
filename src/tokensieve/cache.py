"""Per-layer KV on the device, each entry with its original position.

Entries are appended in the order they are computed: prompt tokens sorted by position, then generated
tokens, then (LazyLLM) revived tokens, which can be older than the generated ones. Readers therefore
mask by the stored positions, never by slot index.

Buffers grow as a session goes on (a later turn, more new tokens): by an eighth of their size at a time,
so appends stay amortised O(1) while the spare capacity stays small; `reserved_bytes` reports it.
"""

from __future__ import annotations

import torch

from .offload import return_freed_memory


class LayerKV:
    """Growable key/value/position buffers of one layer (batch size 1)."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self._k = torch.empty(kv_heads, 0, head_dim, dtype=dtype, device=device)
        self._v = torch.empty_like(self._k)
        self._pos = torch.empty(0, dtype=torch.long, device=device)
        self.length = 0

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

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Add entries `k`, `v` `[kv_heads, n, head_dim]` at original `positions` `[n]`."""
        n = k.shape[1]
        if self.length + n > self._k.shape[1]:
            self._grow(self.length + n)
        self._k[:, self.length : self.length + n] = k
        self._v[:, self.length : self.length + n] = v
        self._pos[self.length : self.length + n] = positions
        self.length += n

    def replace(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep only the given entries (an offloading or evicting method keeps the rest elsewhere, or drops it).

        They go into fresh buffers (with the usual headroom), so the old ones are freed now.
        """
        n = k.shape[1]
        on_cpu, freed = self._k.device.type == "cpu", self.reserved_bytes
        self._k = k.new_empty(k.shape[0], _capacity(n), k.shape[2])
        self._v = torch.empty_like(self._k)
        self._pos = positions.new_empty(self._k.shape[1])
        self._k[:, :n], self._v[:, :n], self._pos[:n] = k, v, positions
        if on_cpu:
            return_freed_memory(freed)
        self.length = n

    def drop_older_than(self, position: int | torch.Tensor) -> int:
        """Drop the entries at positions below `position`; returns how many were dropped.

        A windowed layer's keys older than `newest position - window + 1` are seen by no later query, so
        its cache can shrink to its window. The kept entries keep their order and move to fresh buffers
        (as `replace`: the old ones are freed now); nothing is copied when nothing is dropped. Calling it
        every few steps rather than every step amortises the copy.
        """
        keep = self.positions >= position
        dropped = self.length - int(keep.sum())
        if dropped:
            self.replace(self.keys[:, keep], self.values[:, keep], self.positions[keep])
        return dropped

    def move_last_to(self, slot: int | torch.Tensor) -> None:
        """Overwrite entry `slot` with the last entry and drop the last: an O(1) eviction of `slot`.

        `slot` may give one slot per KV head (`[kv_heads]`) for a policy whose heads keep different entries;
        the stored position of each such slot becomes the last entry's (the newest, so a per-slot maximum
        over heads stays one).
        """
        last = self.length - 1
        slots = torch.as_tensor(slot, device=self._pos.device).expand(self._k.shape[0])
        heads = torch.arange(self._k.shape[0], device=self._pos.device)
        self._k[heads, slots] = self._k[:, last].clone()  # clones: index_put refuses an overlapping source
        self._v[heads, slots] = self._v[:, last].clone()
        self._pos[slots] = self._pos[last].clone()
        self.length = last

    def _grow(self, needed: int) -> None:
        capacity = _capacity(needed)
        k = self._k.new_empty(self._k.shape[0], capacity, self._k.shape[2])
        v = torch.empty_like(k)
        pos = self._pos.new_empty(capacity)
        k[:, : self.length] = self.keys
        v[:, : self.length] = self.values
        pos[: self.length] = self.positions
        self._k, self._v, self._pos = k, v, pos

    def move_to(self, device: torch.device) -> None:
        """Move the entries (not the spare capacity) to `device`: a retained session parked in host memory,
        and back before it computes again."""
        if self._k.device != device:
            self._k, self._v, self._pos = (t.to(device) for t in (self.keys, self.values, self.positions))

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


def _capacity(needed: int) -> int:
    """Room for `needed` entries plus an eighth (at least 16) for the appends to come."""
    return needed + max(16, needed // 8)
