"""Fidelity vs dense: agreement and KL on hand-made cases, and on the real stories260k model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from conftest import STORIES, needs_stories
from tokensieve.eval.fidelity import common_prefix, fidelity, greedy_agreement, kl_divergence
from tokensieve.methods import Method, Policy


def test_greedy_agreement_and_common_prefix():
    assert greedy_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert greedy_agreement([1, 2, 3, 4], [1, 9, 3, 9]) == 0.5
    assert greedy_agreement([1, 2, 3, 4], [1, 2]) == 0.5  # stopping early differs at the rest
    assert greedy_agreement([], []) == 1.0
    assert common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_kl_hand_computed():
    same = torch.tensor([[0.3, -1.0, 2.0]])
    assert kl_divergence(same, same).item() == pytest.approx(0.0, abs=1e-7)
    # p = (1/2, 1/2), q = (e / (e + 1), 1 / (e + 1)): KL = sum p log(p / q).
    p, q = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    q1 = math.e / (math.e + 1)
    expected = 0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1))
    assert kl_divergence(p, q).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 4))


class _LastTokensPolicy(Policy):
    def prefill_keep_after_layer(self, step):
        return torch.arange(len(step.rows) - 4, len(step.rows)) if step.layer == 0 else None


@dataclass
class LastTokensOnly(Method):
    """Test-only: after layer 0, only the last 4 prompt tokens go on (a crude pruning that must show)."""

    name: ClassVar[str] = "last4"

    def start(self, run):
        return _LastTokensPolicy(run)


@pytest.fixture(scope="module")
def stories_engine():
    import tokensieve

    return tokensieve.load(STORIES, device="cpu", dtype="float32")


PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog.",
    "Tom had a big red ball. One day he went to the beach with his mom and saw a crab on the sand.",
]


@needs_stories()
def test_dense_against_itself_is_perfect(stories_engine):
    result = fidelity(stories_engine, PROMPTS, ["dense"], max_new_tokens=12)["dense"]
    assert result.agreement == 1.0 and result.prefix_agreement == 1.0
    assert result.mean_kl == pytest.approx(0.0, abs=1e-6) and result.steps == 24


@needs_stories()
def test_crude_pruning_shows_as_lower_agreement_and_positive_kl(stories_engine):
    result = fidelity(stories_engine, PROMPTS, [LastTokensOnly()], max_new_tokens=12)["last4"]
    assert result.agreement < 1.0
    assert result.mean_kl > 0.01 and result.max_kl >= result.mean_kl


def test_fidelity_needs_prompts(deep_engine):
    with pytest.raises(ValueError, match="at least one prompt"):
        fidelity(deep_engine, [], ["dense"])
