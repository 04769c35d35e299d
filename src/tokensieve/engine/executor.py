"""What runs the layer loop for an engine's sessions: `Executor` runs it here, in this process.

Every forward pass of every session goes through one executor (a prefill or an extension a few layers at
a time, a batched decode step), under its lock. The tensor-parallel leader (`parallel.leader`) is an
executor that first tells the other ranks to run the same step on their share of the heads; nothing above
the executor knows how many ranks there are.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..cache import LayerKV
from ..collectives import TensorParallelGroup, using
from ..methods import Method, Policy, Run
from ..model import DecoderModel
from ..offload import Transfers
from . import loop
from .pool import BatchPool


class SequenceLike(Protocol):
    """A sequence as the executor sees it: its key, policy and per-layer KV (a `Session` is one)."""

    key: int
    policy: Policy
    kv: list[LayerKV]


@dataclass
class SequenceState:
    """The policy and KV of one sequence, under the key its executor gave it."""

    key: int
    policy: Policy
    kv: list[LayerKV]

    @staticmethod
    def new(model: DecoderModel, method: Method, prompt_len: int, key: int) -> SequenceState:
        spec = model.spec
        policy = method.start(Run(spec, prompt_len, model.device, model.dtype, model.scale))
        kv = [LayerKV(spec.num_kv_heads, spec.head_dim, model.dtype, model.device) for _ in range(spec.num_layers)]
        return SequenceState(key, policy, kv)


@dataclass
class PromptTask:
    """A prompt pass under way: the prefill of one or more first prompts (computed together), or a later
    turn's extension of one sequence. Its sequences, the layers still to run, each sequence's tokens with
    KV once it is done, and then each one's logits and record."""

    seqs: list[SequenceLike]
    layers: Iterator[int]
    computed: list[int]
    layers_done: int = 0
    seconds: float = 0.0  # wall time of the layers run so far (the sessions' TTFT share of it)
    result: list[tuple[torch.Tensor, loop.PromptPass]] | None = None


class Executor:
    """Runs the layer loop on this process's model. `lock` serializes forward passes (re-entrant);
    `group` is the tensor-parallel group the passes' collectives act on (None: a single device); `pool`
    holds the KV slots of the dense sequences that decode together (`engine/pool.py`)."""

    def __init__(self, model: DecoderModel, group: TensorParallelGroup | None = None):
        self.model = model
        self.group = group
        self.lock = threading.RLock()
        self._keys = itertools.count()
        self.pool = BatchPool()

    def open(self, method: Method, prompt_len: int) -> SequenceState:
        """A new sequence's policy and empty KV."""
        return SequenceState.new(self.model, method, prompt_len, next(self._keys))

    def fork(self, seq: SequenceLike) -> SequenceState:
        """A new sequence whose policy state and KV are copies of `seq`'s (nothing recomputed)."""
        return SequenceState(next(self._keys), *copy_state(seq.policy, seq.kv))

    def start_prefill(self, seqs: list[SequenceLike], ids: list[list[int]], chunk: int | None) -> PromptTask:
        """The prefill of sequences `seqs` (prompts `ids`, one pass for all) that runs when `advance` is
        called, a few layers at a time (nothing runs yet)."""
        batch = [loop.PrefillRequest(seq.policy, seq.kv, prompt) for seq, prompt in zip(seqs, ids, strict=True)]
        return PromptTask(list(seqs), loop.prefill(self.model, batch, chunk), [len(prompt) for prompt in ids])

    def start_extend(self, seq: SequenceLike, ids: list[int], start: int, chunk: int | None) -> PromptTask:
        """Tokens `ids` at positions `start...` appended to `seq`'s cache, run by `advance` like a prefill."""
        layers = _listed(loop.extend(self.model, seq.policy, seq.kv, ids, start, chunk))
        return PromptTask([seq], layers, [start + len(ids)])

    def advance(self, task: PromptTask, layers: int) -> bool:
        """Run up to `layers` more layers of `task`; True once every layer ran (then `task.result` is set)."""
        total = self.model.spec.num_layers
        with self.lock, using(self.group), torch.inference_mode():
            for _ in range(min(layers, total - task.layers_done)):
                next(task.layers)
                task.layers_done += 1
            if task.layers_done == total and task.result is None:
                task.result = _returned(task.layers)
                for seq, computed in zip(task.seqs, task.computed, strict=True):
                    trim_windows(self.model, seq.policy, seq.kv, computed)
        return task.result is not None

    def decode(self, batch: list[loop.DecodeRequest]) -> torch.Tensor:
        """One decode step of every request; logits `[len(batch), vocab]`."""
        with self.lock, using(self.group), torch.inference_mode():
            logits = loop.decode_batch(self.model, batch, self.pool)
            for request in batch:
                trim_windows(self.model, request.policy, request.kv, request.position + 1)
        return logits

    def release_slots(self) -> None:
        """Give every pooled sequence its KV back in buffers of its own and free the slots: a batch ended."""
        with self.lock:
            self.pool.release()

    def close(self) -> None:
        """Release what the executor holds beyond the sessions (nothing here; the other ranks for a leader)."""


def copy_state(policy: Policy, kv: list[LayerKV]) -> tuple[Policy, list[LayerKV]]:
    """Deep copies of a sequence's policy (its selections, host stores, aux caches) and KV. The copy shares
    the model's spec, and gets transfers of its own (a fresh channel that counts only its own copies)."""
    run = policy.run
    memo = {id(run.spec): run.spec, id(run.transfers): Transfers(run.device)}
    return copy.deepcopy((policy, kv), memo)


def trim_windows(model: DecoderModel, policy: Policy, kv: list[LayerKV], computed: int) -> None:
    """Free a windowed layer's KV that no later query can see (under policies that allow it), once the
    excess is an eighth of the window, so the copy is amortised over many steps. `computed`: tokens with KV."""
    if not policy.trims_windows or not model.spec.windowed:
        return
    for layer, window in model.spec.windowed:
        if len(kv[layer]) > window + max(16, window // 8):
            kv[layer].drop_older_than(computed - window + 1)


def _listed(generator: Generator[int, None, tuple]) -> Generator[int, None, list[tuple]]:
    """A one-sequence pass's generator whose result is a list of one, as a joint prefill's is."""
    return [(yield from generator)]


def _returned(generator: Iterator):
    """The value a generator returns at its end (it has nothing left to yield)."""
    try:
        next(generator)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the prompt pass yielded more layers than the model has")
