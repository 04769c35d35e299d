"""Host memory for offloaded KV, and copies between host and device that overlap compute on CUDA.

On CUDA, host tensors are pinned and loads run on a side stream; the consumer waits on an event just
before it needs the data, so the copy overlaps whatever the default stream computes meanwhile. On CPU the
same calls copy synchronously and return identical values, so every offloading method has one code path.
"""

from __future__ import annotations

import torch


class Transfers:
    """Host <-> device copies for one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.bytes_loaded = 0  # host -> device, counted here where the copies happen

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of `tensor` (pinned on CUDA, so later loads can be asynchronous)."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.cuda)
        host.copy_(tensor)
        return host

    def load(self, host: torch.Tensor, index: torch.Tensor | None = None) -> Pending:
        """Start copying `host` (or its rows `index` along dim 0, gathered on the host) to the device."""
        rows = host if index is None else host.index_select(0, index.to("cpu"))
        self.bytes_loaded += rows.numel() * rows.element_size()
        if not self.cuda:
            return Pending(rows.to(self.device), None)
        if index is not None:
            rows = rows.pin_memory()
        with torch.cuda.stream(self.stream):
            on_device = rows.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Pending(on_device, event, keep_alive=rows)


class Pending:
    """A copy in flight; `wait()` returns the tensor once the consumer's stream may use it."""

    def __init__(self, tensor: torch.Tensor, event, keep_alive: torch.Tensor | None = None):
        self._tensor = tensor
        self._event = event
        self._keep_alive = keep_alive  # the pinned source must live until the copy is done

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            torch.cuda.current_stream(self._tensor.device).wait_event(self._event)
            self._tensor.record_stream(torch.cuda.current_stream(self._tensor.device))
            self._event = None
            self._keep_alive = None
        return self._tensor
