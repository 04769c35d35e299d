"""LayerKV: appends keep positions; buffers grow by an eighth; replace frees the old buffers."""

from __future__ import annotations

import torch

from tokensieve.cache import LayerKV


def entries(n: int, start: int = 0):
    k = torch.arange(start, start + n, dtype=torch.float32).view(1, n, 1).expand(2, n, 3).clone()
    return k, -k, torch.arange(start, start + n)


def test_append_keeps_order_and_positions_and_grows():
    kv = LayerKV(2, 3, torch.float32, torch.device("cpu"))
    kv.append(*entries(200))
    assert kv._k.shape[1] == 225  # room for an eighth more: decode appends without copying ...
    kv.append(*entries(25, start=200))
    assert kv._k.shape[1] == 225
    kv.append(*entries(1, start=225))
    assert kv._k.shape[1] == 226 + 226 // 8  # ... until it is full, then it grows by an eighth again
    assert len(kv) == 226 and kv.positions.tolist() == list(range(226))
    assert torch.equal(kv.keys[0, :, 0], torch.arange(226.0)) and torch.equal(kv.values, -kv.keys)
    assert kv.nbytes == 2 * 2 * 226 * 3 * 4
    assert kv.reserved_bytes == 2 * 2 * 254 * 3 * 4  # spare capacity is reported, not hidden


def test_replace_frees_the_old_buffers_and_leaves_headroom():
    kv = LayerKV(2, 3, torch.float32, torch.device("cpu"))
    kv.append(*entries(100))
    old = kv._k
    keep = torch.tensor([0, 50, 99])
    kv.replace(kv.keys[:, keep], kv.values[:, keep], kv.positions[keep])
    assert kv._k.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()
    assert kv._k.shape[1] == 3 + 16 and len(kv) == 3 and kv.positions.tolist() == [0, 50, 99]
    kv.append(*entries(4, start=100))
    assert kv._k.shape[1] == 19 and kv.positions.tolist() == [0, 50, 99, 100, 101, 102, 103]


def test_move_last_to_evicts_one_slot_in_place():
    kv = LayerKV(2, 4, torch.float32, torch.device("cpu"))
    k, v = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    kv.append(k, v, torch.arange(10, 15))
    buffer = kv._k.data_ptr()
    kv.move_last_to(1)
    assert len(kv) == 4 and kv.positions.tolist() == [10, 14, 12, 13]
    torch.testing.assert_close(kv.keys, k[:, [0, 4, 2, 3]], rtol=0, atol=0)
    torch.testing.assert_close(kv.values, v[:, [0, 4, 2, 3]], rtol=0, atol=0)
    assert kv._k.data_ptr() == buffer  # no copy of the cache


def test_move_last_to_takes_one_slot_per_kv_head():
    kv = LayerKV(2, 4, torch.float32, torch.device("cpu"))
    k, v = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    kv.append(k, v, torch.tensor([0, 1, 2, 3]))
    kv.move_last_to(torch.tensor([0, 2]))  # head 0 evicts slot 0, head 1 slot 2
    torch.testing.assert_close(kv.keys[0], k[0, [3, 1, 2]], rtol=0, atol=0)
    torch.testing.assert_close(kv.keys[1], k[1, [0, 1, 3]], rtol=0, atol=0)
    torch.testing.assert_close(kv.values[1], v[1, [0, 1, 3]], rtol=0, atol=0)
    assert kv.positions.tolist() == [3, 1, 3]  # per slot, the newest position any head holds there
