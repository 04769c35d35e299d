"""Start a tensor-parallel group: worker processes this process spawns itself, or the ranks `torchrun` made.

Either way this process (rank 0 of `torchrun`) becomes the leader and gets a `Leader` executor; every other
rank builds the same model, keeps its shard and follows (`leader.follow`). Spawned workers load the model
before the group forms, and report it through a pipe, so that a worker that cannot load is an error here,
not a rendezvous that waits forever. gloo carries the collectives on CPU, NCCL on CUDA (rank r on cuda:r).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from multiprocessing.connection import wait

import torch

from ..collectives import join, leave
from ..model import DecoderModel
from .leader import Leader, follow
from .shard import check_divisible, shard

# A model builder: given this rank's device, the Hugging Face model (picklable: a module-level function or
# a functools.partial of one, since spawned workers receive it).
Builder = Callable[[torch.device], torch.nn.Module]
STOP_WAIT_S = 30.0


def under_torchrun() -> bool:
    """This process is one rank of a group that `torchrun` (or another launcher of its kind) started."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def start(model: DecoderModel, build: Builder, size: int, device: torch.device) -> Leader:
    """Make `model` (the full model, on the CPU) rank 0 of `size` ranks, its shard on `device`; returns its
    executor. Under `torchrun` on a rank other than 0 this does not return: the rank follows, then the
    process exits. Every rank builds the whole model on the CPU and moves only its shard to its device."""
    check_divisible(model.spec, size)
    if under_torchrun():
        return _join_torchrun(model, size, device)
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(
            f"tensor_parallel_size={size} needs {size} CUDA devices, and this machine has "
            f"{torch.cuda.device_count()}: pick a smaller size"
        )
    rendezvous = tempfile.mkdtemp(prefix="tokensieve-tp-")
    workers = _spawn(build, size, device, f"file://{rendezvous}/store", torch.get_num_threads())

    def stop() -> None:
        for process in workers:
            process.join(STOP_WAIT_S)
            if process.is_alive():
                process.kill()
        shutil.rmtree(rendezvous, ignore_errors=True)

    group = join(0, size, f"file://{rendezvous}/store", _backend(device))
    _place(shard(model, 0, size), device)
    leader = Leader(model, group, describe_failure=lambda: _describe_dead(workers), on_close=stop)
    leader.processes = workers
    return _stopped_at_exit(leader)


def _spawn(build: Builder, size: int, device: torch.device, init_method: str, threads: int) -> list:
    """Start ranks 1..size-1 and wait until each has its model loaded (or stopped: then an error)."""
    context = multiprocessing.get_context("spawn")  # CUDA and fork do not mix; spawn is safe everywhere
    workers, pipes = [], []
    for rank in range(1, size):
        mine, theirs = context.Pipe()
        process = context.Process(
            target=_worker,
            args=(rank, size, init_method, build, device.type, threads, theirs),
            name=f"tokensieve-rank-{rank}",
            daemon=True,
        )
        process.start()
        workers.append(process)
        pipes.append(mine)
    for rank, (process, pipe) in enumerate(zip(workers, pipes, strict=True), start=1):
        wait([pipe, process.sentinel])
        message = pipe.recv() if pipe.poll() else f"it exited with code {process.exitcode} while loading"
        if message != "loaded":
            for other in workers:
                other.kill()
            raise RuntimeError(f"tensor-parallel rank {rank} could not start: {message}")
    return workers


def _worker(rank: int, size: int, init_method: str, build: Builder, device_type: str, threads: int, pipe) -> None:
    """A spawned rank: load the model, report, join the group, keep its shard, follow the leader."""
    torch.set_num_threads(threads)
    device = torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")
    try:
        model = DecoderModel(build(torch.device("cpu")))
    except Exception as err:  # reported to the parent, which raises it
        pipe.send(f"{type(err).__name__}: {err}")
        return
    pipe.send("loaded")
    group = join(rank, size, init_method, _backend(device))
    follow(_place(shard(model, rank, size), device), group)
    leave()


def _join_torchrun(model: DecoderModel, size: int, device: torch.device) -> Leader:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if world != size:
        raise ValueError(
            f"tensor_parallel_size={size}, but torchrun started {world} processes: launch with "
            f"--nproc-per-node {size}, or pass tensor_parallel_size={world}"
        )
    group = join(rank, size, "env://", _backend(device))
    _place(shard(model, rank, size), device)
    if rank != 0:
        follow(model, group)
        leave()
        sys.exit(0)
    return _stopped_at_exit(Leader(model, group))


def _stopped_at_exit(leader: Leader) -> Leader:
    """The followers are told to stop when this process exits, even if the caller never closes the engine."""
    atexit.register(leader.close)
    return leader


def _place(model: DecoderModel, device: torch.device) -> DecoderModel:
    """Move a rank's shard to its device (in place: the adapter holds the Hugging Face modules themselves)."""
    model.hf.to(device)
    return model


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _describe_dead(workers: list) -> str | None:
    """Which spawned ranks have stopped, with their exit codes (a negative code is the signal that killed it)."""
    dead = [(rank, p.exitcode) for rank, p in enumerate(workers, start=1) if not p.is_alive()]
    if not dead:
        return None
    return ", ".join(f"rank {rank} {_exit(code)}" for rank, code in dead)


def _exit(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
