"""LazyLLM's aux cache: the hidden states of prompt tokens pruned at a boundary, kept so that a later step
can revive them from there instead of recomputing the layers before it."""

from __future__ import annotations

import torch


class AuxCache:
    """Hidden states (outputs of one boundary layer) of the prompt tokens pruned there, by position.

    A token enters a boundary's aux cache at most once (it only leaves by being revived past that
    boundary, after which it has KV there), so entries are appended and taken, never overwritten.
    """

    def __init__(self, prompt_len: int, device: torch.device):
        self.h: torch.Tensor | None = None
        self.pos = torch.empty(0, dtype=torch.long, device=device)
        self.slot = torch.full((prompt_len,), -1, dtype=torch.long, device=device)
        self.live = 0

    def __len__(self) -> int:
        return self.live

    def put(self, h: torch.Tensor, pos: torch.Tensor) -> None:
        if len(pos) == 0:
            return
        self.slot[pos] = torch.arange(len(self.pos), len(self.pos) + len(pos), device=pos.device)
        self.h = h.clone() if self.h is None else torch.cat([self.h, h])
        self.pos = torch.cat([self.pos, pos])
        self.live += len(pos)

    def lacks(self, pos: torch.Tensor) -> torch.Tensor:
        """Bool per prompt position of `pos`: not in the cache (checked before `take`, on the device)."""
        return self.slot[pos] < 0

    def take(self, pos: torch.Tensor) -> torch.Tensor:
        """The hidden states of `pos` (every one in the cache: see `lacks`), which leave the cache."""
        h = self.h[self.slot[pos]]
        self.slot[pos] = -1
        self.live -= len(pos)
        if 2 * self.live < len(self.pos):  # drop the holes once they are the majority
            alive = torch.nonzero_static(self.slot[self.pos] >= 0, size=self.live).squeeze(1)
            self.h, self.pos = self.h[alive], self.pos[alive]
            self.slot[self.pos] = torch.arange(len(self.pos), device=self.pos.device)
        return h

    @property
    def nbytes(self) -> int:
        return 0 if self.h is None else self.h.numel() * self.h.element_size()
