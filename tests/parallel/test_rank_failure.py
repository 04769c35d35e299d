"""A tensor-parallel rank that dies makes the engine raise a clear error in the leader, never hang."""

from __future__ import annotations

import os
import signal

import pytest

import tokensieve
from tokensieve.collectives import RankFailure


def test_a_killed_rank_is_a_clear_error_not_a_hang():
    engine = tokensieve.load("tiny", tensor_parallel_size=2)
    worker = engine.executor.processes[0]
    stream = engine.stream("the first words", max_new_tokens=50)
    next(stream)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    signal.alarm(60)  # a hang fails the test instead of stalling the suite
    try:
        with pytest.raises(RankFailure, match="rank 1 was killed by signal 9"):
            for _ in stream:
                pass
        with pytest.raises(RankFailure, match="load it again"):
            engine.generate("more words", max_new_tokens=2)
    finally:
        signal.alarm(0)
        engine.close()
    assert tokensieve.load("tiny").generate("after", max_new_tokens=2).token_ids  # the process is usable again
