"""LayerKV: appends keep positions and kinds; buffers grow by an eighth; keep frees the old buffers; host-resident
positions."""

from __future__ import annotations

import copy

import pytest
import torch

from device_syncs import DeviceSyncs
from tokensieve.cache import MAX_RUNS, Kind, LayerKV


def entries(n: int, start: int = 0, kind: Kind = Kind.PROMPT):
    k = torch.arange(start, start + n, dtype=torch.float32).view(1, n, 1).expand(2, n, 3).clone()
    return k, -k, torch.arange(start, start + n), kind


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


def test_keep_frees_the_old_buffers_and_leaves_headroom():
    kv = LayerKV(2, 3, torch.float32, torch.device("cpu"))
    kv.append(*entries(100))
    old = kv._k
    keep = torch.tensor([0, 50, 99])
    kv.keep(keep)
    assert kv._k.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()
    assert kv._k.shape[1] == 3 + 16 and len(kv) == 3 and kv.positions.tolist() == [0, 50, 99]
    kv.append(*entries(4, start=100))
    assert kv._k.shape[1] == 19 and kv.positions.tolist() == [0, 50, 99, 100, 101, 102, 103]


def test_move_last_to_evicts_one_slot_in_place():
    kv = LayerKV(2, 4, torch.float32, torch.device("cpu"))
    k, v = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    kv.append(k, v, torch.arange(10, 15), Kind.PROMPT)
    buffer = kv._k.data_ptr()
    kv.move_last_to(1)
    assert len(kv) == 4 and kv.positions.tolist() == [10, 14, 12, 13]
    torch.testing.assert_close(kv.keys, k[:, [0, 4, 2, 3]], rtol=0, atol=0)
    torch.testing.assert_close(kv.values, v[:, [0, 4, 2, 3]], rtol=0, atol=0)
    assert kv._k.data_ptr() == buffer  # no copy of the cache


def test_move_last_to_takes_one_slot_per_kv_head():
    kv = LayerKV(2, 4, torch.float32, torch.device("cpu"))
    k, v = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    kv.append(k, v, torch.tensor([0, 1, 2, 3]), Kind.PROMPT)
    kv.move_last_to(torch.tensor([0, 2]))  # head 0 evicts slot 0, head 1 slot 2
    torch.testing.assert_close(kv.keys[0], k[0, [3, 1, 2]], rtol=0, atol=0)
    torch.testing.assert_close(kv.keys[1], k[1, [0, 1, 3]], rtol=0, atol=0)
    torch.testing.assert_close(kv.values[1], v[1, [0, 1, 3]], rtol=0, atol=0)
    assert kv.positions.tolist() == [3, 1, 3]  # per slot, the newest position any head holds there


# -- the per-entry record: what each entry is, and which positions live in host memory --------------------------
P, T, G, R = Kind.PROMPT, Kind.TURN, Kind.GENERATED, Kind.REVIVED


def conversation() -> LayerKV:
    """A prompt of 20, two generated tokens, a turn of 3, one generated token, then a revived prompt token."""
    kv = LayerKV(2, 3, torch.float32, torch.device("cpu"))
    for n, start, kind in [(20, 0, P), (2, 20, G), (3, 22, T), (1, 25, G), (1, 7, R)]:
        kv.append(*entries(n, start, kind))
    return kv


def test_appends_record_each_entry_kind_on_the_device_and_runs_on_the_host():
    kv = conversation()
    assert kv.kinds.tolist() == [P] * 20 + [G] * 2 + [T] * 3 + [G] + [R]
    assert kv.runs() == [(P, 20), (G, 2), (T, 3), (G, 1), (R, 1)]
    assert kv.count(P) == 20 and kv.count(G) == 3 and kv.count(P, R) == 21 and kv.leading(P) == 20
    for kind in (G, T):
        with pytest.raises(ValueError, match=f"{kind.name} entries are not all its first slots: PROMPT x20, GEN"):
            kv.leading(kind)
    assert LayerKV(2, 3, torch.float32, torch.device("cpu")).leading(P) == 0


def test_growth_and_copies_keep_the_kinds():
    kv = LayerKV(2, 3, torch.float32, torch.device("cpu"))
    kv.append(*entries(200))
    kv.append(*entries(30, start=200, kind=G))  # past the capacity: the buffers grow
    assert kv.kinds.tolist() == [P] * 200 + [G] * 30 and kv.runs() == [(P, 200), (G, 30)]
    twin = copy.deepcopy(kv)  # a forked session's KV
    twin.append(*entries(1, start=230, kind=G))
    assert twin.runs() == [(P, 200), (G, 31)] and kv.runs() == [(P, 200), (G, 30)]
    kv.offload(torch.arange(5))
    assert kv.runs() == [(P, 195), (G, 30)] and kv.host_count == 5
    kv.move_to(torch.device("meta"))  # parked elsewhere: every record moves along
    assert kv.kinds.device.type == "meta" == kv.host_positions.device.type and kv.runs() == [(P, 195), (G, 30)]


def test_keep_and_drop_older_than_carry_the_kinds_and_the_runs_follow():
    kv = conversation()
    kv.keep(torch.tensor([0, 5, 21, 23, 25, 26]))
    assert kv.positions.tolist() == [0, 5, 21, 23, 25, 7] and kv.kinds.tolist() == [P, P, G, T, G, R]
    assert kv.runs() == [(P, 2), (G, 1), (T, 1), (G, 1), (R, 1)]  # read back from the device once
    assert kv.drop_older_than(20) == 3
    assert kv.positions.tolist() == [21, 23, 25] and kv.kinds.tolist() == [G, T, G] and kv.count(G) == 2


def test_a_per_head_keep_records_the_newest_entry_of_each_slot():
    kv = LayerKV(2, 3, torch.float32, torch.device("cpu"))
    kv.append(*entries(4))
    kv.append(*entries(2, start=4, kind=G))
    kv.keep(torch.tensor([[0, 4], [1, 2]]))  # head 0 keeps positions 0 and 4, head 1 positions 1 and 2
    assert kv.positions.tolist() == [1, 4] and kv.kinds.tolist() == [P, G]
    assert kv.keys[0, :, 0].tolist() == [0, 4] and kv.keys[1, :, 0].tolist() == [1, 2]


def test_move_last_to_moves_the_kind_of_the_last_entry():
    kv = conversation()
    kv.move_last_to(3)  # the revived token's entry overwrites the prompt entry at slot 3
    assert kv.positions[3] == 7 and kv.kinds[3] == R and len(kv) == 26
    assert kv.count(R) == 1 and kv.count(P) == 19 and kv.runs()[:3] == [(P, 3), (R, 1), (P, 16)]
    kv.move_last_to(torch.tensor([0, 1]))  # per KV head: slots 0 and 1 both take the last entry (position 25)
    assert kv.kinds[:2].tolist() == [G, G] and kv.positions[:2].tolist() == [25, 25]


def test_offload_records_host_positions_and_swap_exchanges_them_without_reading_the_device():
    kv = conversation()
    kv.offload(torch.tensor([12, 3, 4]))
    assert kv.host_positions.tolist() == [3, 4, 12] and kv.host_count == 3 and len(kv) == 24
    assert 3 not in kv.positions.tolist() and kv.runs() == [(P, 17), (G, 2), (T, 3), (G, 1), (R, 1)]
    assert kv.host_lacks(torch.tensor([2, 3, 12, 13])).tolist() == [True, False, False, True]
    k, v, pos = torch.full((2, 2, 3), 9.0), torch.full((2, 2, 3), -9.0), torch.tensor([12, 4])
    slots = torch.tensor([0, 5])  # the device entries at positions 0 and 7 leave for the host
    with DeviceSyncs() as syncs:
        kv.swap(slots, k, v, pos)
    assert not syncs.counts, syncs.counts
    assert kv.positions[slots].tolist() == [12, 4] and kv.host_positions.tolist() == [0, 3, 7]
    assert torch.equal(kv.keys[:, slots], k) and torch.equal(kv.values[:, slots], v) and kv.kinds[5] == P
    kv.offload(torch.arange(len(kv)))  # everything: the device keeps nothing
    assert (
        len(kv) == 0
        and kv.runs() == []
        and kv.host_count == 27
        and kv.host_positions.tolist() == sorted([*range(26), 7])
    )


def test_the_runs_are_host_ints_read_back_from_the_device_only_past_their_cap():
    kv = conversation()
    with DeviceSyncs() as syncs:
        assert kv.leading(P) == 20 and kv.count(G) == 3 and kv.runs()[-1] == (R, 1)
    assert not syncs.counts, syncs.counts
    for i in range(MAX_RUNS):  # a run per append, as LazyLLM's revival starts one per decode step
        kv.append(*entries(1, 30 + i, (G, T)[i % 2]))
    with DeviceSyncs() as syncs:
        runs = kv.runs()
    assert syncs.counts and len(runs) == 5 + MAX_RUNS and runs[-2:] == [(G, 1), (T, 1)]
