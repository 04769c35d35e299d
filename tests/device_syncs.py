"""Counting the calls that make the host wait for the device, on any device (a CPU test catches them too)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Reading a value back (`item()`, `int()`, `bool()`), or a result whose shape depends on the data.
_READS = {"aten.item.default", "aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.equal.default"}
_DATA_SHAPED = {"aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default"}
_INDEXING = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}


class DeviceSyncs(TorchDispatchMode):
    """Counts, by `where` (set it as the work goes on, e.g. to the layer being computed), the operations
    that make the host wait for the device on CUDA: reading a value, a data-dependent shape (`nonzero`,
    boolean-mask indexing), `tolist`, and host data copied to the device (`torch.tensor(list, ...)`).

    On CPU nothing waits, but the same calls are made, so counting them there catches a new sync.
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.where: Any = None
        self._tolist = None

    def __enter__(self):
        self._tolist, counter = torch.Tensor.tolist, self

        def counted_tolist(tensor):
            counter.counts[counter.where] += 1
            return counter._tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _syncs(str(func), args):
            self.counts[self.where] += 1
        return func(*args, **(kwargs or {}))


def _syncs(name: str, args: tuple) -> bool:
    if name in _READS or name in _DATA_SHAPED:
        return True
    if name in _INDEXING:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return name == "aten.lift_fresh.default" and args[0].dim() > 0  # a tensor made from host data
