"""The leader (rank 0) runs the engine; the other ranks follow it step by step on their share of the heads.

Rank 0 is an ordinary `Engine` whose executor is a `Leader`: before each forward pass it broadcasts one
command (open or fork a sequence, prefill, extend, decode a batch) on the group's control channel, then runs the
pass itself. The followers (`follow`) run the same pass on their shard, so every collective inside it
(the model's partial sums, the methods' score reductions) meets its peers in the same order. Only the
leader samples: the followers are given the token ids, so they never need the leader's random state.

A sequence's state on the followers is dropped when the leader's policy object for it goes away (a
session closed or garbage-collected): a finalizer queues the key, and the next command carries it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import traceback
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..collectives import RankFailure, TensorParallelGroup, leave
from ..engine import loop
from ..engine.executor import Executor, PromptTask, SequenceLike, SequenceState, copy_state
from ..methods import Method
from ..model import DecoderModel


class Leader(Executor):
    """Rank 0's executor. `describe_failure` names what stopped (e.g. a worker's exit code), or None."""

    def __init__(
        self,
        model: DecoderModel,
        group: TensorParallelGroup,
        describe_failure: Callable[[], str | None] = lambda: None,
        on_close: Callable[[], None] = lambda: None,
    ):
        super().__init__(model, group)
        self.describe_failure = describe_failure
        self.on_close = on_close
        self.failure: str | None = None
        self.processes: list = []  # the spawned ranks 1..N-1 (none under torchrun)
        self._dropped: list[int] = []  # keys whose followers' state can go; appended by finalizers

    def open(self, method: Method, prompt_len: int) -> SequenceState:
        state = super().open(method, prompt_len)
        with self.lock:
            self._send("open", state.key, method, prompt_len)
        weakref.finalize(state.policy, self._dropped.append, state.key)
        return state

    def fork(self, seq: SequenceLike) -> SequenceState:
        state = super().fork(seq)
        with self.lock:
            self._send("fork", seq.key, state.key)
        weakref.finalize(state.policy, self._dropped.append, state.key)
        return state

    def start_prefill(self, seqs: list[SequenceLike], ids: list[list[int]], chunk: int | None) -> PromptTask:
        with self.lock:
            self._send("prefill", [seq.key for seq in seqs], ids, chunk)
            return super().start_prefill(seqs, ids, chunk)

    def start_extend(self, seq: SequenceLike, ids: list[int], start: int, chunk: int | None) -> PromptTask:
        with self.lock:
            self._send("extend", seq.key, ids, start, chunk)
            return super().start_extend(seq, ids, start, chunk)

    def advance(self, task: PromptTask, layers: int) -> bool:
        with self.lock:
            self._send("advance", task.seqs[0].key, layers)  # a pass is known by its first sequence
            return self._guarded(super().advance, task, layers)

    def decode(self, batch: list[loop.DecodeRequest]) -> torch.Tensor:
        with self.lock:
            self._send("decode", [(r.key, r.token, r.position) for r in batch])
            return self._guarded(super().decode, batch)

    def release_slots(self) -> None:
        with self.lock:
            if self.pool.holding:  # the followers' pools hold slots exactly when this one does
                self._send("release_slots")
                super().release_slots()

    def digests(self, seq: SequenceLike) -> list[str]:
        """Every rank's `selection_digest` of a sequence, rank 0 first: all equal when the ranks agree on
        every whole-sequence decision (per-KV-head evictions, SnapKV's and H2O's, are each rank's own)."""
        with self.lock:
            self._send("digest", seq.key)
            gathered = [None] * self.group.size
            dist.gather_object(selection_digest(seq.policy, seq.kv), gathered, dst=0, group=self.group.control)
        return gathered

    def close(self) -> None:
        """Stop the followers and leave the group (idempotent)."""
        with self.lock:
            if self.failure is None:
                with contextlib.suppress(RankFailure):  # a follower already gone needs no stop
                    self._send("stop")
                self.failure = "the engine was closed"
            self.on_close()
            leave()
        atexit.unregister(self.close)  # registered by `launch`; once closed, nothing is left to stop at exit

    def _send(self, *command) -> None:
        self._check_usable()
        dropped, self._dropped = self._dropped, []
        try:
            dist.broadcast_object_list([(dropped, command)], src=0, group=self.group.control)
        except RuntimeError as err:
            raise self._failed(err) from err

    def _guarded(self, run, *args):
        try:
            return run(*args)
        except RankFailure as err:
            raise self._failed(err) from err

    def _check_usable(self) -> None:
        if self.failure is None:
            self.failure = self.describe_failure()
        if self.failure is not None:
            raise RankFailure(f"this tensor-parallel engine cannot run: {self.failure}; load it again")

    def _failed(self, err: Exception) -> RankFailure:
        self.failure = self.describe_failure() or f"a rank stopped or is unreachable ({err})"
        return RankFailure(f"tensor-parallel engine failed: {self.failure}; load it again")


def follow(model: DecoderModel, group: TensorParallelGroup) -> None:
    """A follower's life: run the leader's commands on this rank's shard until it says stop."""
    executor = Executor(model, group)
    states: dict[int, SequenceState] = {}
    prefills: dict[int, PromptTask] = {}  # prompt passes under way, advanced a few layers at a time
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group.control)
        dropped, (kind, *args) = box[0]
        for key in dropped:
            states.pop(key, None)
        for first, task in list(prefills.items()):  # a pass goes once none of its sequences is left
            if not any(seq.key in states for seq in task.seqs):
                del prefills[first]
        if kind == "stop":
            return
        try:
            _run(executor, model, states, prefills, kind, args)
        except Exception:  # the leader met the same error at the same point and reports it to its caller
            traceback.print_exc()


def _run(
    executor: Executor,
    model: DecoderModel,
    states: dict[int, SequenceState],
    prefills: dict[int, PromptTask],
    kind: str,
    args: list,
) -> None:
    if kind == "open":
        key, method, prompt_len = args
        states[key] = SequenceState.new(model, method, prompt_len, key)
    elif kind == "fork":
        source, key = args
        states[key] = SequenceState(key, *copy_state(states[source].policy, states[source].kv))
    elif kind == "prefill":
        keys, ids, chunk = args
        prefills[keys[0]] = executor.start_prefill([states[key] for key in keys], ids, chunk)
    elif kind == "advance":
        key, layers = args
        if executor.advance(prefills[key], layers):
            del prefills[key]
    elif kind == "extend":
        key, ids, start, chunk = args
        prefills[key] = executor.start_extend(states[key], ids, start, chunk)
    elif kind == "decode":
        executor.decode([_request(states[key], token, position) for key, token, position in args[0]])
    elif kind == "release_slots":
        executor.release_slots()
    elif kind == "digest":
        state = states[args[0]]
        dist.gather_object(selection_digest(state.policy, state.kv), None, dst=0, group=executor.group.control)
    else:
        raise RuntimeError(f"unknown tensor-parallel command {kind!r}")


def _request(state: SequenceState, token: int, position: int) -> loop.DecodeRequest:
    counts = loop.DecodeCounts.zeros(len(state.kv))  # the leader keeps the counts that stats report
    return loop.DecodeRequest(state.key, state.policy, state.kv, token, position, counts)


def selection_digest(policy, kv) -> str:
    """A hash of what a sequence's policy has selected: each layer's KV positions, and every integer or
    boolean tensor the policy holds (kept blocks, selected indices, masks of present tokens)."""
    digest = hashlib.sha1()
    for layer in kv:
        digest.update(layer.positions.cpu().numpy().tobytes())
    for tensor in _integer_tensors(vars(policy), depth=3):
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _integer_tensors(value, depth: int):
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            yield value
    elif depth > 0 and isinstance(value, dict):
        for item in value.values():
            yield from _integer_tensors(item, depth - 1)
    elif depth > 0 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _integer_tensors(item, depth - 1)
    elif depth > 0 and hasattr(value, "__dict__") and not isinstance(value, type):
        yield from _integer_tensors(vars(value), depth - 1)
