"""SlimInfer (arXiv 2508.06447): prune whole blocks of prompt hidden states at a few deep layers.

Information diffusion: past the first third of the network a key token's information has spread into
many other tokens' hidden states, so deeper layers can run on a subset. At each pruning layer, after its
attention, the prompt is scored in blocks of 64 tokens (each block = 8 units of 8 tokens):

    unit key   = mean of the unit's post-RoPE keys, per KV head
    query      = mean of the queries of the last `query_window` prompt tokens, per query head
    unit score = mean over query heads h of |q_h . k_unit(kv_head(h))|      (GQA by reshaping, no repeat)
    block      = max over its units

The top blocks that fit the budget, the first block (attention sink) and the last block (it holds the
query window and produces the first output token) continue into the layer's MLP and all later layers;
they keep their original positions. The pruned blocks' KV at the pruning layer is not dropped: it goes to a
host store, and in decode an *active* block set is re-chosen at every step with the new token's query,
swapping blocks in and out of the device only when the new top set overlaps the active set by less than
`gamma`.

Our choices where the paper leaves details open:
- Blocks are cut on original positions (block = position // block_size). Pruning keeps whole blocks, so
  at a later pruning layer the rows present are whole blocks plus the last one, and are scored again.
- The first and last blocks count within the budget; the budget buys whole blocks (a budget below two
  blocks still keeps those two).
- The last block is always kept, so it is never scored and never leaves the device.
- Decode rescoring uses the new token's query at the pruning layer. The swap it decides is a prefetch for
  the next step: the copies start at once (side stream on CUDA) and the entering blocks are installed just
  before that layer's attention in the next step, so the copy overlaps the rest of this step (the MLP, the
  later layers). The current step attends to the active set chosen before it.
- The host store keeps a copy of every scored block of a pruning layer: prompt KV never changes, so a
  block leaving the device needs no copy back, only its device slot is reused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, NamedTuple

import torch

from ..attention import grouped_logits
from ..cache import LayerKV
from ..collectives import heads_mean
from ..model import ModelSpec
from ..offload import HostRows, Pending
from .base import Context, LayerStep, Method, Policy, Run, require_int, resolve_budget, scaled_layers

PAPER_LAYERS = (10, 20, 30)  # Llama-3.1-8B's pruning layers ...
PAPER_DEPTH = 32  # ... out of its 32 layers


def unit_keys(block_keys: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Representative keys `[kv_heads, blocks, units, d]` (fp32 means) of block keys `[kv_heads, blocks, size, d]`."""
    return block_keys.float().unflatten(2, (-1, unit_size)).mean(3)


def block_scores(query: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Score `[blocks]` of each block for one query `[heads, d]`: max over units of mean over heads of |q.k|."""
    kv_heads, blocks, per_block, d = units.shape
    logits = grouped_logits(query[:, None], units.reshape(kv_heads, blocks * per_block, d), 1.0)
    return heads_mean(logits.abs().mean(0)).view(blocks, per_block).amax(-1)


def top_blocks(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The sink block 0 and the `count - 1` best-scoring other blocks, sorted."""
    best = scores[1:].topk(count - 1).indices + 1
    return torch.cat([best.new_zeros(1), best]).sort().values


def block_rows(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Row indices of whole blocks, block `b` being rows `b * block_size ... (b + 1) * block_size - 1`."""
    return (blocks[:, None] * block_size + torch.arange(block_size, device=blocks.device)).flatten()


def blocks_kept(blocks: int, tail: int, budget: int | None, block_size: int) -> int:
    """Whole blocks (sink included, last block excluded) that fit `budget` beside the last block's `tail` tokens."""
    if budget is None or blocks * block_size + tail <= budget:
        return blocks
    return min(blocks, 1 + max(0, (budget - tail - block_size) // block_size))


class Decision(NamedTuple):
    """One decode rescoring at a pruning layer: the overlap of the new top set with the active set."""

    step: int
    layer: int
    overlap: float
    blocks_in: int  # blocks swapped in (0 when overlap >= gamma)


@dataclass
class SlimInfer(Method):
    """SlimInfer's settings; the defaults are the paper's for Llama-3.1-8B."""

    name: ClassVar[str] = "sliminfer"

    prune_layers: tuple[int, ...] | None = None
    """Layers after whose attention blocks are pruned; None = 10, 20, 30 of 32 scaled to the model's depth."""
    budgets: tuple[int | float, ...] = (8192, 4096, 2048)
    """Tokens kept at each pruning layer: counts, or fractions of the prompt in (0, 1]."""
    block_size: int = 64
    """Tokens per block, the unit of pruning and of swapping."""
    unit_size: int = 8
    """Tokens per unit, the unit of scoring (a block scores as its best unit)."""
    query_window: int = 4
    """Last prompt tokens whose mean query scores the blocks in prefill."""
    gamma: float = 0.9
    """Decode swaps blocks only when the new top set overlaps the active set by less than this."""
    offload: bool = True
    """Keep a pruning layer's inactive blocks in host memory (False: all on the device, compute savings only)."""
    kv_manager: bool = True
    """Swap blocks in decode (the paper). False: prune in prefill only, and decode attends to every key the
    layers hold; this is SlimInfer on the prefill side of a composition (`Compose`)."""

    def __post_init__(self):
        self.budgets = tuple(self.budgets)
        if not self.budgets:
            raise ValueError("budgets is empty: give one budget (tokens or a fraction) per pruning layer")
        for budget in self.budgets:
            resolve_budget(budget, 1, "SlimInfer budget")
        require_int(self.block_size, "block_size")
        require_int(self.unit_size, "unit_size")
        if self.block_size % self.unit_size:
            raise ValueError(f"unit_size {self.unit_size} must divide block_size {self.block_size}")
        require_int(self.query_window, "query_window")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma is an overlap threshold in [0, 1], got {self.gamma}")
        if self.prune_layers is not None:
            self.prune_layers = tuple(self.prune_layers)
            if len(self.prune_layers) != len(self.budgets):
                raise ValueError(
                    f"{len(self.prune_layers)} prune_layers but {len(self.budgets)} budgets: give one each"
                )
            if list(self.prune_layers) != sorted(set(self.prune_layers)) or min(self.prune_layers) < 0:
                raise ValueError(f"prune_layers must be distinct layer indices >= 0 in order, got {self.prune_layers}")
        elif len(self.budgets) != len(PAPER_LAYERS):
            raise ValueError(f"{len(self.budgets)} budgets need prune_layers (the default layers take 3 budgets)")

    def as_prefill_side(self) -> SlimInfer:
        return replace(self, kv_manager=False, offload=False)

    def as_decode_side(self) -> Method:
        raise ValueError(
            "SlimInfer's decode swaps the blocks its own prefill pruned, so it cannot follow another prefill: "
            "use method='sliminfer' alone, or put SlimInfer on the prefill side (e.g. 'sliminfer+omnikv')"
        )

    @classmethod
    def keep_all(cls) -> SlimInfer:
        return cls(budgets=(1.0, 1.0, 1.0))

    def schedule(self, num_layers: int, prompt_len: int, spec: ModelSpec | None = None) -> dict[int, int]:
        """Pruning layer -> budget in tokens, for a model depth and prompt length.

        Paper layers that land on the same layer of a shallow model merge there, with the smaller budget.
        With the model's `spec`, each pruning layer moves to its nearest global layer (a windowed layer's
        query sees only its window, not the blocks it scores); layers that meet there merge the same way.
        """
        if self.prune_layers is None:
            layers = [scaled_layers((layer,), PAPER_DEPTH, num_layers)[0] for layer in PAPER_LAYERS]
        else:
            layers = list(self.prune_layers)
            if layers[-1] >= num_layers:
                raise ValueError(f"prune_layers {self.prune_layers} reach beyond this model's {num_layers} layers")
        if spec is not None:
            layers = [spec.nearest_global_layer(layer) for layer in layers]
        schedule: dict[int, int] = {}
        for layer, budget in zip(layers, self.budgets, strict=True):
            tokens = resolve_budget(budget, prompt_len, "SlimInfer budget")
            schedule[layer] = min(tokens, schedule.get(layer, tokens))
        return schedule

    def plan(self, num_layers: int, prompt_len: int, spec: ModelSpec | None = None) -> tuple[list[int], list[int]]:
        """Prompt tokens entering each layer in prefill, and prompt tokens whose KV each layer keeps on the device.

        The policy prunes by the same rule, so this is also the memory model (e.g. for a 32K prompt).
        """
        schedule = self.schedule(num_layers, prompt_len, spec)
        tail = prompt_len - (prompt_len - 1) // self.block_size * self.block_size
        present = prompt_len
        entering, on_device = [], []
        for layer in range(num_layers):
            entering.append(present)
            blocks = (present - tail) // self.block_size
            kept = blocks_kept(blocks, tail, schedule.get(layer), self.block_size) * self.block_size + tail
            on_device.append(kept if self.offload else present)
            present = kept
        return entering, on_device

    def start(self, run: Run) -> SlimInferPolicy:
        return SlimInferPolicy(self, run)


class PrunedLayer:
    """A pruning layer's blocks during decode: which block sits in each device slot, unit keys, host copies.

    Device slot `s` holds one block, in rows `s * block_size ...` of the layer's KV (offload) or names the
    rows of that block in the full KV (no offload); the last block and generated tokens follow the slots.
    """

    def __init__(self, units: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, host: HostRows | None):
        self.units = units  # [kv_heads, blocks, units per block, d], fp32
        self.positions = positions  # [blocks, block_size]
        self.slots = slots  # [active blocks]: block held by each slot
        self.host = host  # rows [blocks, 2 (k, v), kv_heads, block_size, d], or None
        self.pending: tuple[torch.Tensor, torch.Tensor, Pending | None] | None = None

    @property
    def block_size(self) -> int:
        return self.positions.shape[1]

    def install(self, kv: LayerKV) -> None:
        """Put the blocks prefetched in the previous step into the slots they replace."""
        if self.pending is None:
            return
        slots, entering, load = self.pending
        self.pending = None
        self.slots[slots] = entering
        if load is None:
            return
        rows = block_rows(slots, self.block_size)
        kv_blocks = self.host.rows_of(load.wait())  # [entering, 2, kv_heads, block_size, d]
        kv.keys[:, rows] = kv_blocks[:, 0].transpose(0, 1).flatten(1, 2)
        kv.values[:, rows] = kv_blocks[:, 1].transpose(0, 1).flatten(1, 2)
        kv.positions[rows] = self.positions[entering].flatten()

    def context(self, kv: LayerKV) -> Context:
        if self.host is not None:
            return Context.of(kv)  # the device holds exactly the slots, the last block and generated tokens
        full = self.positions.numel()
        rest = torch.arange(full, len(kv), device=self.slots.device)
        return Context.of(kv, torch.cat([block_rows(self.slots, self.block_size), rest]))

    def nbytes(self) -> tuple[int, int]:
        """Bytes on the device (unit keys, positions, slots) and on the host (block copies)."""
        device = sum(t.numel() * t.element_size() for t in (self.units, self.positions, self.slots))
        host = 0 if self.host is None else self.host.nbytes
        return device, host


class SlimInferPolicy(Policy):
    """One generation under SlimInfer: prunes blocks in prefill, re-selects active blocks in decode."""

    def __init__(self, method: SlimInfer, run: Run):
        super().__init__(run)
        self.method = method
        self.schedule = method.schedule(run.spec.num_layers, run.prompt_len, run.spec)
        self.tail = run.prompt_len - (run.prompt_len - 1) // method.block_size * method.block_size
        self.transfers = run.transfers if method.offload else None
        self.pruned_tokens: dict[int, int] = {}  # pruning layer -> tokens whose hidden states stop there
        self.chosen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # until the layer's KV is done
        self.layers: dict[int, PrunedLayer] = {}
        self.decisions: list[Decision] = []
        self.steps = 0

    # -- prefill ---------------------------------------------------------------------------------------
    def prefill_keep_after_attention(self, step: LayerStep) -> torch.Tensor | None:
        layer, rows, q, k = step.layer, step.rows, step.q, step.k
        if layer not in self.schedule:
            return None
        size = self.method.block_size
        blocks = (len(rows) - self.tail) // size  # rows present: whole blocks, then the last block
        kept = blocks_kept(blocks, self.tail, self.schedule[layer], size)
        self.pruned_tokens[layer] = (blocks - kept) * size
        if kept == blocks:
            return None
        window = rows.pos >= self.run.prompt_len - self.method.query_window
        query = q[:, window].float().mean(1)
        units = unit_keys(k[:, : blocks * size].unflatten(1, (blocks, size)), self.method.unit_size)
        chosen = top_blocks(block_scores(query, units), kept)
        if self.method.kv_manager:  # the decode block manager needs the scored blocks
            self.chosen[layer] = (chosen, units, rows.pos[: blocks * size].view(blocks, size))
        tail_rows = torch.arange(blocks * size, len(rows), device=chosen.device)
        return torch.cat([block_rows(chosen, size), tail_rows])

    def prefill_layer_done(self, step: LayerStep) -> None:
        layer, kv = step.layer, step.kv
        if layer not in self.chosen:
            return
        chosen, units, positions = self.chosen.pop(layer)
        store = PrunedLayer(units, positions, chosen.clone(), None)
        if self.transfers is not None:
            full = positions.numel()
            blocks = torch.stack([kv.keys[:, :full], kv.values[:, :full]]).unflatten(2, positions.shape)
            store.host = HostRows.copy_of(self.transfers, blocks.permute(2, 0, 1, 3, 4))  # a row per block
            keep = torch.cat([block_rows(chosen, store.block_size), torch.arange(full, len(kv), device=chosen.device)])
            kv.replace(kv.keys[:, keep], kv.values[:, keep], kv.positions[keep])
        self.layers[layer] = store

    # -- decode ----------------------------------------------------------------------------------------
    def decode_context(self, step: LayerStep) -> Context:
        context = self.extend_context(step)
        store = self.layers.get(step.layer)
        if store is not None:
            self.rescore(step.layer, store, step.q[:, -1])
        return context

    def extend_context(self, step: LayerStep) -> Context:
        """At a pruning layer, the active blocks (installing last step's prefetch first); elsewhere, all."""
        store = self.layers.get(step.layer)
        if store is None:
            return Context.of(step.kv)
        store.install(step.kv)
        return store.context(step.kv)

    def rescore(self, layer: int, store: PrunedLayer, query: torch.Tensor) -> None:
        """Score every block with `query`; prefetch a swap when the top set drifted from the active set."""
        top = top_blocks(block_scores(query.float(), store.units), len(store.slots))
        leaving = ~torch.isin(store.slots, top)
        overlap = 1 - int(leaving.sum()) / len(store.slots)
        entering = top[~torch.isin(top, store.slots)] if overlap < self.method.gamma else top[:0]
        self.decisions.append(Decision(self.steps, layer, overlap, len(entering)))
        if len(entering):
            load = None if store.host is None else store.host.load(entering)
            store.pending = (leaving.nonzero()[:, 0], entering, load)

    def decode_step_done(self) -> None:
        self.steps += 1

    # -- accounting ------------------------------------------------------------------------------------
    def device_bytes(self) -> int:
        return sum(store.nbytes()[0] for store in self.layers.values())

    def host_bytes(self) -> int:
        return sum(store.nbytes()[1] for store in self.layers.values())

    def stats(self) -> dict[str, Any]:
        layers = sorted(self.schedule)
        swaps = [d for d in self.decisions if d.blocks_in]
        blocks_in = sum(d.blocks_in for d in swaps)
        return {
            "prune_layers": layers,
            "prune_layers_asked": sorted(self.method.schedule(self.run.spec.num_layers, self.run.prompt_len)),
            "budget_tokens": [self.schedule[layer] for layer in layers],
            "pruned_tokens": [self.pruned_tokens.get(layer, 0) for layer in layers],
            "decode_rescorings": len(self.decisions),
            "swaps": len(swaps),
            "blocks_swapped_in": blocks_in,
            "swaps_per_step": len(swaps) / max(1, self.steps),
            "mean_overlap": sum(d.overlap for d in self.decisions) / len(self.decisions) if self.decisions else None,
        }
