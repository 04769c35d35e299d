"""Host memory for offloaded KV (`HostRows`, the one host store every method uses), and copies between
host and device that overlap compute on CUDA (`Transfers`).

On CUDA, host tensors are pinned and loads run on a side stream; the consumer waits on an event just
before it needs the data, so the copy overlaps whatever the default stream computes meanwhile. On CPU the
same calls copy synchronously and return identical values, so every offloading method has one code path.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass

import torch

TRIM_BYTES = 8 << 20  # CPU memory freed between two trims


def return_freed_memory(nbytes: int) -> None:
    """Note that `nbytes` of CPU memory were freed, and give freed memory back to the system (glibc's
    `malloc_trim`; elsewhere nothing) once `TRIM_BYTES` have been freed since the last time.

    glibc raises its mmap threshold each time a large block is freed, so KV buffers freed by eviction or
    offloading (`LayerKV.replace`) stay in the process heap and peak RSS counts them twice (a subprocess
    test measures it). A trim walks the whole heap, which takes milliseconds in a server that retains many
    sessions, so frees are gathered: RSS over-reports by less than `TRIM_BYTES`, and a 512-token OmniKV
    prefill, which frees 24 small buffers, trims about once instead of 24 times. (A race between threads
    only moves a trim.)
    """
    global _untrimmed
    _untrimmed += nbytes
    if _LIBC is not None and _untrimmed >= TRIM_BYTES:
        _untrimmed = 0
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc() if sys.platform.startswith("linux") else None
_untrimmed = 0  # bytes freed since the last trim


@dataclass(frozen=True)
class Loaded:
    """Host -> device copies so far: copies started, rows copied (dim 0 of each copy: a `HostRows` row, i.e. a
    SlimInfer block of one layer or an OmniKV token of one segment) and bytes. `later - earlier` is what moved
    in between (the engine reports one call's loads so)."""

    loads: int = 0
    rows: int = 0
    bytes: int = 0

    def __add__(self, more: Loaded) -> Loaded:
        return Loaded(self.loads + more.loads, self.rows + more.rows, self.bytes + more.bytes)

    def __sub__(self, earlier: Loaded) -> Loaded:
        return Loaded(self.loads - earlier.loads, self.rows - earlier.rows, self.bytes - earlier.bytes)


class Transfers:
    """Host <-> device copies for one device, counted here where they happen (`loaded`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.loaded = Loaded()

    def load(self, host: torch.Tensor, index: torch.Tensor | None = None) -> Pending:
        """Start copying `host` (or its rows `index` along dim 0, gathered on the host) to the device."""
        rows = host if index is None else host.index_select(0, index.to("cpu"))
        self.loaded += Loaded(1, rows.shape[0], rows.numel() * rows.element_size())
        if not self.cuda:
            return Pending(rows.to(self.device), None)
        if index is not None:
            rows = rows.pin_memory()
        with torch.cuda.stream(self.stream):
            on_device = rows.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Pending(on_device, event, keep_alive=rows)

    def to_host(self, tensor: torch.Tensor) -> HostCopy:
        """Start copying a small device tensor (a decision's indices) to the host, without waiting for it.

        On CUDA the copy goes into pinned memory on the current stream, after the work that computes the
        tensor; read it a step later, when the host has waited for that step's token, and it is long done.
        On CPU the tensor is already on the host. Not counted in `loaded`: no KV moves.
        """
        if not self.cuda:
            return HostCopy(tensor, None)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return HostCopy(host, event)


class HostRows:
    """Rows of KV in host memory (pinned on CUDA), which the device loads by index in one copy.

    A row is what a method moves as a unit: one token's KV in every layer of an OmniKV segment, or one
    block's KV at a SlimInfer pruning layer. Loads gather the rows on the host (from a flat 2-D view, one
    contiguous row each: faster than gathering the N-D layout) and copy them through `transfers`, which
    counts the copies, rows and bytes.
    """

    def __init__(self, transfers: Transfers, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype):
        self.transfers = transfers
        # Empty, not zeros: pages are committed only as rows are written.
        self.tensor = torch.empty((rows, *row_shape), dtype=dtype, pin_memory=transfers.cuda)

    @classmethod
    def copy_of(cls, transfers: Transfers, tensor: torch.Tensor) -> HostRows:
        """A host copy of `tensor`, its rows along dim 0."""
        rows = cls(transfers, tensor.shape[0], tuple(tensor.shape[1:]), tensor.dtype)
        rows.tensor.copy_(tensor)
        return rows

    def load(self, index: torch.Tensor) -> Pending:
        """Start bringing rows `index` to the device; `rows_of(pending.wait())` gives them in row shape."""
        return self.transfers.load(self.tensor.view(self.tensor.shape[0], -1), index)

    def rows_of(self, loaded: torch.Tensor) -> torch.Tensor:
        return loaded.view(-1, *self.tensor.shape[1:])

    @property
    def row_bytes(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class HostCopy:
    """A device -> host copy (`Transfers.to_host`); `read()` returns the host tensor once the copy is done."""

    def __init__(self, tensor: torch.Tensor, event):
        self._tensor = tensor
        self._event = event

    def read(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()  # returns at once when read a step later (see `Transfers.to_host`)
            self._event = None
        return self._tensor

    def __deepcopy__(self, memo) -> HostCopy:
        """A forked session's copy (between calls: the copy is done), without the CUDA event, which cannot be
        copied."""
        return HostCopy(self.read().clone(), None)


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

    def __deepcopy__(self, memo) -> Pending:
        """A forked session's copy of a copy in flight (SlimInfer's swap decision, acted on next step): the
        copy waited for and cloned, without the CUDA event, which cannot be copied."""
        return Pending(self.wait().clone(), None)
