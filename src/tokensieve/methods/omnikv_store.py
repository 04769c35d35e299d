"""OmniKV's packed host store: the prompt KV of one segment's sparse layers, token-major, in host memory.

A segment is the run of sparse layers that share one filter layer's selection. Their prompt keys and
values live side by side in one host tensor `[tokens, layers, 2, kv_heads, head_dim]`, so that the rows
of the selected tokens for *every* layer of the segment are one `index_select` and one host-to-device
copy ("packed load"), instead of one small gather and copy per layer and per key/value tensor.
"""

from __future__ import annotations

import torch

from ..offload import Pending, Transfers


class PackedSegment:
    """Host copy of the prompt KV of the sparse layers `layers`; filled in prefill, never shrunk."""

    def __init__(self, layers: tuple[int, ...], transfers: Transfers):
        self.layers = layers
        self.slot = {layer: i for i, layer in enumerate(layers)}
        self.transfers = transfers
        self.host: torch.Tensor | None = None
        self._filled: set[int] = set()

    def put(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy layer `layer`'s prompt keys and values `[kv_heads, tokens, head_dim]` into its slot."""
        if self.host is None:
            kv_heads, tokens, head_dim = keys.shape
            shape = (tokens, len(self.layers), 2, kv_heads, head_dim)
            # Pinned on CUDA so that later loads can run asynchronously on the side stream.
            self.host = torch.empty(shape, dtype=keys.dtype, pin_memory=self.transfers.cuda)
        slot = self.slot[layer]
        self.host[:, slot, 0].copy_(keys.transpose(0, 1))
        self.host[:, slot, 1].copy_(values.transpose(0, 1))
        self._filled.add(layer)

    def load(self, index: torch.Tensor) -> Pending:
        """Start bringing the rows `index` (prompt token indices) of every layer to the device."""
        if len(self._filled) != len(self.layers):
            missing = sorted(set(self.layers) - self._filled)
            raise RuntimeError(f"packed load before prefill stored layers {missing}")
        # Gather from a 2-D view (one contiguous row per token): faster than on the 5-D layout.
        return self.transfers.load(self.host.view(self.host.shape[0], -1), index)

    def keys_values(self, rows: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values `[kv_heads, n, head_dim]` out of loaded rows (`load`'s result)."""
        rows = rows.view(-1, *self.host.shape[1:])
        slot = self.slot[layer]
        return rows[:, slot, 0].transpose(0, 1), rows[:, slot, 1].transpose(0, 1)

    def layer_keys_values(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored row of layer `layer`, keys and values `[kv_heads, tokens, head_dim]`, on `device`
        (a later turn of a session attends to all of them; on CPU these are views, no copy)."""
        slot = self.slot[layer]
        keys, values = self.host[:, slot, 0].transpose(0, 1), self.host[:, slot, 1].transpose(0, 1)
        return keys.to(device, non_blocking=True), values.to(device, non_blocking=True)

    @property
    def row_bytes(self) -> int:
        """Bytes one token's row occupies (all layers of the segment, keys and values)."""
        return 0 if self.host is None else self.host[0].numel() * self.host.element_size()

    @property
    def nbytes(self) -> int:
        return 0 if self.host is None else self.host.numel() * self.host.element_size()
