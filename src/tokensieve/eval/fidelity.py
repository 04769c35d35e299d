"""Fidelity vs dense: how closely a method reproduces the dense model, for any model and any text.

- Greedy agreement: the fraction of generated positions where the method's token equals dense's, and the
  common prefix (tokens before the first difference) as a fraction of dense's length.
- Mean KL(dense || method) of next-token distributions, teacher-forced along dense's tokens
  (`engine.next_token_logits`): at every step both see the same context, so the KL measures the method's
  approximation alone, not the drift that follows a first different token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..methods import Method


@dataclass
class Fidelity:
    """One method against dense, averaged over prompts (KL: over every generated step of every prompt)."""

    method: str
    agreement: float
    prefix_agreement: float
    mean_kl: float
    max_kl: float
    steps: int


def greedy_agreement(reference: Sequence[int], candidate: Sequence[int]) -> float:
    """Fraction of positions holding the same token; a sequence that stops early differs at the rest."""
    length = max(len(reference), len(candidate))
    if length == 0:
        return 1.0
    return sum(a == b for a, b in zip(reference, candidate, strict=False)) / length


def common_prefix(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Number of leading tokens the two sequences share."""
    for i, (a, b) in enumerate(zip(reference, candidate, strict=False)):
        if a != b:
            return i
    return min(len(reference), len(candidate))


def kl_divergence(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(candidate)) for each row of `[steps, vocab]` logits, in fp32."""
    if reference_logits.shape != candidate_logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(reference_logits.shape)} vs {tuple(candidate_logits.shape)}")
    ref = reference_logits.float().log_softmax(-1)
    cand = candidate_logits.float().log_softmax(-1)
    return (ref.exp() * (ref - cand)).sum(-1).clamp_min(0)  # clamp: rounding can give -1e-9


def fidelity(
    engine, prompts: Sequence[str | Sequence[int]], methods: Sequence[str | Method], max_new_tokens: int = 32
) -> dict[str, Fidelity]:
    """Greedy agreement and teacher-forced KL of each method (a name or an instance) against dense, by name."""
    if not prompts:
        raise ValueError("fidelity needs at least one prompt")
    dense = [engine.generate(prompt, max_new_tokens=max_new_tokens, method="dense").token_ids for prompt in prompts]
    # Row i is the distribution the i-th dense token was picked from.
    dense_logits = [forced_logits(engine, p, ids, "dense") for p, ids in zip(prompts, dense, strict=True)]
    results = {}
    for method in methods:
        runs = [engine.generate(p, max_new_tokens=max_new_tokens, method=method).token_ids for p in prompts]
        kl = torch.cat(
            [
                kl_divergence(ref, forced_logits(engine, p, ids, method))
                for p, ids, ref in zip(prompts, dense, dense_logits, strict=True)
            ]
        )
        pairs = list(zip(dense, runs, strict=True))
        name = method if isinstance(method, str) else method.name
        results[name] = Fidelity(
            method=name,
            agreement=sum(greedy_agreement(d, r) for d, r in pairs) / len(pairs),
            prefix_agreement=sum(common_prefix(d, r) / max(1, len(d)) for d, r in pairs) / len(pairs),
            mean_kl=float(kl.mean()),
            max_kl=float(kl.max()),
            steps=len(kl),
        )
    return results


def forced_logits(engine, prompt, tokens: Sequence[int], method: str | Method) -> torch.Tensor:
    """The logits `method` picks each of `tokens` from, feeding `tokens` (not its own picks): `[len(tokens), vocab]`."""
    return engine.next_token_logits(prompt, list(tokens[:-1]), method=method)
