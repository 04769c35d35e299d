"""This process's place in a tensor-parallel group, and the collectives the model and the scorers call.

A process is at most one rank of one group (`join`; never inferred from `torch.distributed`: a process
group a user made for something else is not ours to reduce over). The collectives act on the group of the
forward pass running in this thread (`using`, entered by the executor around each pass), so a
single-device engine beside a tensor-parallel one in the same process stays single-device: with no active
group every function here is the identity.

Two kinds of collective, counted apart so that a benchmark can report what each method adds:
- `sum_partials`: the partial outputs of row-parallel weights (the attention output and the MLP's down
  projection), summed: what the dense model exchanges, two all-reduces of `[rows, hidden]` per layer;
- `heads_max` / `heads_mean`: a per-token score reduced over the heads of every rank, so that every rank
  takes the same selection (OmniKV's max over heads, SlimInfer's and LazyLLM's mean).
"""

from __future__ import annotations

import contextlib
import datetime
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# How long a collective may wait for a slow rank before it fails; a dead rank fails it at once (gloo).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# The control channel waits for the leader's next command, which may come hours later (an idle server).
CONTROL_TIMEOUT = datetime.timedelta(days=365)


@dataclass
class Traffic:
    """Bytes this rank sent into all-reduces: the model's partial sums, and the methods' score reductions."""

    model_bytes: int = 0
    selection_bytes: int = 0
    calls: int = 0


@dataclass
class TensorParallelGroup:
    """Rank `rank` of `size`; `control` is a gloo group for the leader's commands (the compute group may be
    NCCL, which cannot carry Python objects)."""

    rank: int
    size: int
    control: object = None
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


_joined: TensorParallelGroup | None = None  # the group this process is a rank of
_active: ContextVar[TensorParallelGroup | None] = ContextVar("tensor_parallel_group", default=None)


def joined() -> TensorParallelGroup | None:
    """The tensor-parallel group this process is a rank of, or None."""
    return _joined


@contextlib.contextmanager
def using(group: TensorParallelGroup | None):
    """Collectives in this thread act on `group` while the block runs (None: none, single device)."""
    token = _active.set(group)
    try:
        yield
    finally:
        _active.reset(token)


def join(rank: int, size: int, init_method: str, backend: str) -> TensorParallelGroup:
    """Join the group as `rank` of `size` (every rank calls this with the same `init_method`)."""
    global _joined
    if _joined is not None:
        raise RuntimeError(
            f"this process is already rank {_joined.rank} of a tensor-parallel group of {_joined.size}: "
            "a process holds one tensor-parallel engine at a time (close it first)"
        )
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT
        )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _joined = TensorParallelGroup(rank, size, control)
    return _joined


def leave() -> None:
    """Leave the group (the engine closed): a later tensor-parallel engine may form a new one."""
    global _joined
    if _joined is not None and dist.is_initialized():
        dist.destroy_process_group()
    _joined = None


def sum_partials(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a row-parallel layer's partial output (in place; `x` itself with no group)."""
    group = _active.get()
    if group is None:
        return x
    _all_reduce(x, dist.ReduceOp.SUM)
    group.traffic.model_bytes += x.numel() * x.element_size()
    return x


def heads_max(scores: torch.Tensor) -> torch.Tensor:
    """A score already reduced by max over this rank's heads, reduced by max over every rank's."""
    return _reduce_heads(scores, dist.ReduceOp.MAX)


def heads_mean(scores: torch.Tensor) -> torch.Tensor:
    """A score already averaged over this rank's heads, averaged over every rank's (each rank holds as many)."""
    group = _active.get()
    if group is None:
        return scores
    return _reduce_heads(scores, dist.ReduceOp.SUM) / group.size


def _reduce_heads(scores: torch.Tensor, op) -> torch.Tensor:
    group = _active.get()
    if group is None:
        return scores
    scores = scores.contiguous()
    _all_reduce(scores, op)
    group.traffic.selection_bytes += scores.numel() * scores.element_size()
    return scores


def _all_reduce(x: torch.Tensor, op) -> None:
    try:
        dist.all_reduce(x, op=op)
    except RuntimeError as err:
        raise RankFailure(
            f"a tensor-parallel collective failed: another rank stopped or is unreachable ({err})"
        ) from err
    _active.get().traffic.calls += 1


class RankFailure(RuntimeError):
    """A rank of the tensor-parallel group stopped: the engine cannot continue (load it again)."""
