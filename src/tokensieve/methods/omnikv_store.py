"""OmniKV's packed host store: the prompt KV of one segment's sparse layers, by position, in host memory.

A segment is the run of sparse layers that share one filter layer's selection. Their prompt keys and
values live side by side in one host tensor `[positions, layers, 2, kv_heads, head_dim]`, so that the rows
of the selected tokens for *every* layer of the segment are one `index_select` and one host-to-device
copy ("packed load"), instead of one small gather and copy per layer and per key/value tensor.

Rows are indexed by original position. After a dense prefill every layer holds every prompt position;
after a pruning prefill (a composition such as SlimInfer's prefill with OmniKV's decode) a layer may lack
some: their rows are zeros, and the layer's KV records which positions it holds here
(`LayerKV.host_positions`), so that a selection masks the rows the layer does not hold.
"""

from __future__ import annotations

import torch

from ..offload import HostRows, Pending, Transfers


class PackedSegment:
    """Host copy of the prompt KV of the sparse layers `layers`; filled in prefill, never shrunk."""

    def __init__(self, layers: tuple[int, ...], transfers: Transfers, prompt_len: int):
        self.layers = layers
        self.slot = {layer: i for i, layer in enumerate(layers)}
        self.transfers = transfers
        self.prompt_len = prompt_len
        self.host: HostRows | None = None
        self._filled: set[int] = set()

    def put(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Copy layer `layer`'s prompt keys and values `[kv_heads, tokens, head_dim]` at `positions` into its slot."""
        if self.host is None:
            kv_heads, _, head_dim = keys.shape
            # Pages are committed only as layers are written, so prefill never holds this beside the device KV.
            row = (len(self.layers), 2, kv_heads, head_dim)
            self.host = HostRows(self.transfers, self.prompt_len, row, keys.dtype)
        host, slot = self.host.tensor, self.slot[layer]
        if len(positions) == self.prompt_len:  # every position, in order: plain copies
            host[:, slot, 0].copy_(keys.transpose(0, 1))
            host[:, slot, 1].copy_(values.transpose(0, 1))
        else:  # a pruned layer: the rows it lacks are zeroed (masked, never attended, but no garbage)
            host[:, slot].zero_()
            where = positions.to("cpu")
            host[where, slot, 0] = keys.transpose(0, 1).to("cpu")
            host[where, slot, 1] = values.transpose(0, 1).to("cpu")
        self._filled.add(layer)

    def load(self, positions: torch.Tensor) -> Pending:
        """Start bringing the rows at `positions` of every layer to the device."""
        if len(self._filled) != len(self.layers):
            missing = sorted(set(self.layers) - self._filled)
            raise RuntimeError(f"packed load before prefill stored layers {missing}")
        return self.host.load(positions)

    def keys_values(self, rows: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values `[kv_heads, n, head_dim]` out of loaded rows (`load`'s result)."""
        rows = self.host.rows_of(rows)
        slot = self.slot[layer]
        return rows[:, slot, 0].transpose(0, 1), rows[:, slot, 1].transpose(0, 1)

    def layer_keys_values(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored row of layer `layer`, keys and values `[kv_heads, prompt_len, head_dim]`, on `device`
        (a later turn of a session attends to all of them; on CPU these are views, no copy)."""
        slot = self.slot[layer]
        host = self.host.tensor
        keys, values = host[:, slot, 0].transpose(0, 1), host[:, slot, 1].transpose(0, 1)
        return keys.to(device, non_blocking=True), values.to(device, non_blocking=True)

    @property
    def row_bytes(self) -> int:
        """Bytes one token's row occupies (all layers of the segment, keys and values)."""
        return 0 if self.host is None else self.host.row_bytes

    @property
    def nbytes(self) -> int:
        return 0 if self.host is None else self.host.nbytes
