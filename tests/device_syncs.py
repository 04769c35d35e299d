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


def decode_syncs_per_step(engine, prompt, method, new_tokens: int, monkeypatch) -> dict:
    """Syncs per decode step of `engine.generate(prompt, method=...)`, by the layer where they happen
    ("step": before the first layer, where the step's token goes to the device)."""
    from tokensieve.engine import loop

    syncs, decode_batch, qkv, steps = DeviceSyncs(), loop.decode_batch, engine.model.qkv, []

    def counted_decode_batch(model, batch, *pool):
        syncs.where = "step"
        with syncs:
            logits = decode_batch(model, batch, *pool)
        steps.append(len(batch))
        return logits

    def located_qkv(layer, *args):
        syncs.where = layer
        return qkv(layer, *args)

    monkeypatch.setattr(loop, "decode_batch", counted_decode_batch)
    monkeypatch.setattr(engine.model, "qkv", located_qkv)
    engine.generate(prompt, max_new_tokens=new_tokens, method=method)
    monkeypatch.undo()
    assert len(steps) == new_tokens - 1
    return {where: n / len(steps) for where, n in syncs.counts.items()}
