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

Two halves on one observation. At each pruning layer `prefill_observe` cuts the entries the layer holds
into blocks, scores them and picks the active set (`LayerBlocks`); the prefill pruning (`prune_prefill`)
keeps those blocks' rows, and the decode block manager (`kv_manager`, one `PrunedLayer` per pruning layer)
starts from the same set when the layer's prompt KV is complete (`prefill_layer_done`). Standalone
SlimInfer runs both halves; `as_prefill_side` keeps only the pruning, `as_decode_side` only the manager:
after another method's prefill (`"dense+sliminfer"`, `"lazyllm+sliminfer"`, `"sliminfer+sliminfer"`) it
prunes no hidden states, and at each pruning layer of its schedule keeps the active set of the entries that
layer holds on the device, offloads the rest to the host store and rescores and swaps in decode exactly as
standalone SlimInfer does. SnapKV's per-head prefill cannot be followed (`needs_shared_kv`): a block is a
run of entries every KV head holds alike.

Our choices where the paper leaves details open:
- Blocks are cut on the entries a layer holds, in position order (prefill appends them sorted): block b is
  held entries b * block_size ... (b + 1) * block_size - 1, and the last 1 ... block_size entries are the
  last block. When a layer holds the whole prompt (standalone, or after a dense prefill) that is exactly
  block = position // block_size; SlimInfer's own pruning keeps whole blocks, so a later pruning layer holds
  whole position blocks plus the last one and cuts them again the same way. After LazyLLM's prefill a layer
  holds a sorted subset of positions, and a block is block_size consecutive held entries (it may span more
  positions): uniform blocks keep one row shape in the host store and one slot size on the device, with no
  padding or masks. Each entry keeps its original position; nothing is renumbered.
- The query window is the prompt rows present at the layer whose positions are among the last
  `query_window`; the last prompt token is always among them (after LazyLLM's prefill it may be alone).
- The first and last blocks count within the budget; the budget buys whole blocks (a budget below two
  blocks still keeps those two). A layer holding no more than its budget keeps everything (no manager).
- The last block is always kept, so it is never scored and never leaves the device.
- Decode rescoring uses the new token's query at the pruning layer. The swap it decides is a prefetch for
  the next step, decided on the device (`PrunedLayer.decide`) and read by the host at the next step's start
  (`decode_step_start`), once that step's token was read: no pruning layer makes the host wait. The copies
  start there (side stream on CUDA) and the entering blocks are installed just before that layer's
  attention, so the copy overlaps the layers before it. The current step attends to the active set chosen
  before it; a call's last decision is acted on by the session's next call (or a later turn).
- The host store keeps a copy of every scored block of a pruning layer: prompt KV never changes, so a
  block leaving the device needs no copy back, only its device slot is reused. The copies (loads, blocks,
  bytes) are counted by the session's `Transfers`, where they happen, and reported as `Stats` fields.
- `sliminfer+sliminfer` is allowed: where both sides prune at a layer, the decode side sees every row that
  entered it (both observe before any decision) and, with equal settings, chooses the prefill side's
  blocks, so it equals standalone SlimInfer (a test); with other settings it manages what the prefill
  side left.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from ..model import ModelSpec
from .base import Context, LayerStep, Method, Policy, Run, require_int, resolve_budget, scaled_layers
from .sliminfer_blocks import (
    LayerBlocks,
    PrunedLayer,
    block_rows,
    block_scores,
    blocks_kept,
    last_block_len,
    top_blocks,
    unit_keys,
)

PAPER_LAYERS = (10, 20, 30)  # Llama-3.1-8B's pruning layers ...
PAPER_DEPTH = 32  # ... out of its 32 layers


@dataclass
class SlimInfer(Method):
    """SlimInfer's settings; the defaults are the paper's for Llama-3.1-8B."""

    name: ClassVar[str] = "sliminfer"
    needs_shared_kv: ClassVar[bool] = True  # a block is a run of entries that every KV head holds alike

    prune_layers: tuple[int, ...] | None = None
    """Layers after whose attention blocks are pruned; None = 10, 20, 30 of 32 scaled to the model's depth."""
    budgets: tuple[int | float, ...] = (8192, 4096, 2048)
    """Tokens kept at each pruning layer (of those it holds): counts, or fractions of the prompt in (0, 1]."""
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
    prune_prefill: bool = True
    """Drop the hidden states of the blocks left out in prefill (the paper). False: prefill computes every row
    that enters a layer and only the block manager acts; this is SlimInfer on the decode side of a composition."""
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
        if not (self.prune_prefill or self.kv_manager):
            raise ValueError("prune_prefill=False and kv_manager=False leave SlimInfer nothing to do: use dense")

    def as_prefill_side(self) -> SlimInfer:
        return replace(self, kv_manager=False, offload=False)

    def as_decode_side(self) -> SlimInfer:
        """The block manager alone: it chooses and swaps blocks among the entries each pruning layer holds."""
        return replace(self, prune_prefill=False)

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

        The policy prunes by the same rule, so this is also the memory model (e.g. for a 32K prompt). For the
        decode side (`prune_prefill=False`) it is the model after a dense prefill.
        """
        schedule = self.schedule(num_layers, prompt_len, spec)
        size, present = self.block_size, prompt_len
        entering, on_device = [], []
        for layer in range(num_layers):
            entering.append(present)
            tail = last_block_len(present, size)
            kept = blocks_kept((present - tail) // size, tail, schedule.get(layer), size) * size + tail
            on_device.append(kept if self.offload and self.kv_manager else present)
            if self.prune_prefill:
                present = kept
        return entering, on_device

    def start(self, run: Run) -> SlimInferPolicy:
        return SlimInferPolicy(self, run)


class SlimInferPolicy(Policy):
    """One generation under SlimInfer: chooses blocks at each pruning layer in prefill, prunes their hidden
    states (`prune_prefill`) and manages their KV in decode (`kv_manager`); see the module docstring."""

    def __init__(self, method: SlimInfer, run: Run):
        super().__init__(run)
        self.method = method
        self.schedule = method.schedule(run.spec.num_layers, run.prompt_len, run.spec)
        self.transfers = run.transfers if method.offload else None
        self.left_out: dict[int, int] = {}  # pruning layer -> prompt entries outside its active set
        self.observed: dict[int, LayerBlocks] = {}  # until the layer's KV is done
        self.layers: dict[int, PrunedLayer] = {}
        self.overlaps: list[float] = []  # one per decode rescoring acted on; `stats` adds the last step's

    # -- prefill ---------------------------------------------------------------------------------------
    def prefill_observe(self, step: LayerStep) -> None:
        """At a pruning layer: the entries it holds as blocks, their scores and the active set (no action)."""
        layer, kv, size = step.layer, step.kv, self.method.block_size
        if layer not in self.schedule:
            return
        tail = last_block_len(len(kv), size)
        blocks = (len(kv) - tail) // size
        kept = blocks_kept(blocks, tail, self.schedule[layer], size)
        self.left_out[layer] = (blocks - kept) * size
        if kept == blocks:
            return
        window = step.rows.pos >= self.run.prompt_len - self.method.query_window
        query = step.q[:, window].float().mean(1)
        whole = blocks * size
        units = unit_keys(kv.keys[:, :whole].unflatten(1, (blocks, size)), self.method.unit_size)
        active = top_blocks(block_scores(query, units), kept)
        self.observed[layer] = LayerBlocks(units, kv.positions[:whole].view(blocks, size), active)

    def prefill_keep_after_attention(self, step: LayerStep) -> torch.Tensor | None:
        observed = self.observed.get(step.layer)
        if observed is None or not self.method.prune_prefill:
            return None
        # In prefill a layer's entries are its rows, in order, so a block's entries are its rows.
        rest = torch.arange(observed.entries, len(step.rows), device=observed.active.device)
        return torch.cat([block_rows(observed.active, self.method.block_size), rest])

    def prefill_layer_done(self, step: LayerStep) -> None:
        observed = self.observed.pop(step.layer, None)
        if observed is not None and self.method.kv_manager:
            self.layers[step.layer] = PrunedLayer.of(observed, step.kv, self.transfers)

    # -- decode ----------------------------------------------------------------------------------------
    def decode_step_start(self, position: int) -> None:
        """Act on the previous step's decisions: their host copies arrived with that step's token, and the
        loads they start overlap the layers before each pruning layer."""
        for store in self.layers.values():
            self._settle(store)

    def decode_context(self, step: LayerStep) -> Context:
        context = self.extend_context(step)
        store = self.layers.get(step.layer)
        if store is not None:
            self.rescore(store, step.q[:, -1])
        return context

    def extend_context(self, step: LayerStep) -> Context:
        """At a pruning layer, the active blocks (installing last step's prefetch first); elsewhere, all."""
        store = self.layers.get(step.layer)
        if store is None:
            return Context.of(step.kv)
        self._settle(store)  # a later turn after the last decode step's decision (in decode: done already)
        store.install(step.kv)
        return store.context(step.kv)

    def rescore(self, store: PrunedLayer, query: torch.Tensor) -> None:
        """Score every block with `query` and decide on the device how the top set drifted from the active set;
        the next step acts on it (`decode_step_start`), so this step reads nothing back."""
        store.decide(top_blocks(block_scores(query.float(), store.units), len(store.slots)), self.run.transfers)

    def _settle(self, store: PrunedLayer) -> None:
        overlap = store.settle(self.method.gamma)
        if overlap is not None:
            self.overlaps.append(overlap)

    # -- accounting ------------------------------------------------------------------------------------
    def device_bytes(self) -> int:
        return sum(store.nbytes()[0] for store in self.layers.values())

    def host_bytes(self) -> int:
        return sum(store.nbytes()[1] for store in self.layers.values())

    def stats(self) -> dict[str, Any]:
        """The decisions: the schedule, what each pruning layer left out, the decode rescorings. The swaps'
        copies are the engine's figures (`Stats.host_loads_per_step`, `host_rows_loaded_per_step`)."""
        layers = sorted(self.schedule)
        left_out = [self.left_out.get(layer, 0) for layer in layers]
        nothing = [0] * len(layers)
        overlaps = self.overlaps + [store.overlap() for store in self.layers.values() if store.decision is not None]
        return {
            "prune_layers": layers,
            "prune_layers_asked": sorted(self.method.schedule(self.run.spec.num_layers, self.run.prompt_len)),
            "budget_tokens": [self.schedule[layer] for layer in layers],
            "pruned_tokens": left_out if self.method.prune_prefill else nothing,
            "inactive_tokens": left_out if self.method.kv_manager else nothing,
            "decode_rescorings": len(overlaps),
            "mean_overlap": sum(overlaps) / len(overlaps) if overlaps else None,
        }
