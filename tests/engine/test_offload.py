"""The host store and its copies: `HostRows` loads rows by index; `Transfers` counts each copy where it happens."""

from __future__ import annotations

import torch

from tokensieve.offload import HostRows, Loaded, Transfers


def test_host_rows_load_by_index_and_transfers_count_loads_rows_and_bytes():
    transfers = Transfers(torch.device("cpu"))
    blocks = torch.randn(6, 2, 3, 4)  # 6 rows, e.g. SlimInfer blocks [2 (k, v), kv_heads, block_size]
    host = HostRows.copy_of(transfers, blocks)
    assert transfers.loaded == Loaded() and host.row_bytes == 2 * 3 * 4 * 4
    before = transfers.loaded
    first = host.rows_of(host.load(torch.tensor([4, 1])).wait())
    second = host.rows_of(host.load(torch.tensor([0])).wait())
    assert torch.equal(first, blocks[[4, 1]]) and torch.equal(second, blocks[[0]])
    assert transfers.loaded - before == Loaded(loads=2, rows=3, bytes=3 * host.row_bytes)
    transfers.load(torch.zeros(5, 2))  # a whole tensor: its rows along dim 0
    assert transfers.loaded == Loaded(loads=3, rows=8, bytes=3 * host.row_bytes + 40)


def test_freed_cpu_memory_is_trimmed_once_per_trim_bytes_not_per_free(monkeypatch):
    """A trim walks the whole heap (milliseconds in a server holding many sessions): small frees gather."""
    from tokensieve import offload

    trims = []
    monkeypatch.setattr(offload, "_LIBC", type("Libc", (), {"malloc_trim": lambda self, pad: trims.append(pad)})())
    monkeypatch.setattr(offload, "_untrimmed", 0)
    for _ in range(24):  # a 512-token OmniKV prefill on cpu-decode frees 24 buffers of 256 KiB
        offload.return_freed_memory(256 << 10)
    assert trims == []
    offload.return_freed_memory(offload.TRIM_BYTES)
    assert trims == [0] and offload._untrimmed == 0


def test_copies_in_flight_are_deep_copied_as_their_finished_tensors():
    """A fork between calls copies a load or a host copy still in flight (SlimInfer's prefetch, its swap
    decision) as the finished tensor: a CUDA event cannot be copied."""
    import copy

    transfers = Transfers(torch.device("cpu"))
    rows = HostRows.copy_of(transfers, torch.arange(12.0).view(4, 3))
    load, to_host = rows.load(torch.tensor([2, 0])), transfers.to_host(torch.tensor([5, 6]))
    load_twin, host_twin = copy.deepcopy(load), copy.deepcopy(to_host)
    assert load_twin.wait().tolist() == [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]] and host_twin.read().tolist() == [5, 6]
    assert load_twin.wait().data_ptr() != load.wait().data_ptr()
