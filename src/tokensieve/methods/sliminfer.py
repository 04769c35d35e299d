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
from typing import Any, ClassVar, NamedTuple

import torch

from ..attention import grouped_logits
from ..cache import LayerKV
from ..collectives import heads_mean
from ..model import ModelSpec
from ..offload import HostCopy, HostRows, Pending, Transfers
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


def last_block_len(entries: int, block_size: int) -> int:
    """Entries of the last block when `entries` (>= 1) are cut into blocks from the first: 1 ... block_size."""
    return entries - (entries - 1) // block_size * block_size


def blocks_kept(blocks: int, tail: int, budget: int | None, block_size: int) -> int:
    """Whole blocks (sink included, last block excluded) that fit `budget` beside the last block's `tail` tokens."""
    if budget is None or blocks * block_size + tail <= budget:
        return blocks
    return min(blocks, 1 + max(0, (budget - tail - block_size) // block_size))


class LayerBlocks(NamedTuple):
    """A pruning layer's prompt entries cut into blocks, and the active set, as observed in prefill."""

    units: torch.Tensor  # [kv_heads, blocks, units per block, d], fp32: unit keys of the whole blocks
    positions: torch.Tensor  # [blocks, block_size]: their entries' original positions
    active: torch.Tensor  # [kept blocks], sorted: the sink and the best-scoring blocks within the budget

    @property
    def entries(self) -> int:
        """Entries in the whole blocks; the last block (and, in decode, anything newer) follows them."""
        return self.positions.numel()


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


class PrunedLayer:
    """A pruning layer's blocks during decode: which block sits in each device slot, unit keys, host copies.

    Device slot `s` holds one block, in entries `s * block_size ...` of the layer's KV (offload: the other
    blocks are the layer's host-resident entries, `LayerKV.host_positions`) or names the entries of that
    block in the layer's full KV (no offload); the last block, generated tokens and later turns follow the
    slots.
    """

    def __init__(self, units: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, host: HostRows | None):
        self.units = units  # [kv_heads, blocks, units per block, d], fp32
        self.positions = positions  # [blocks, block_size]
        self.slots = slots  # [active blocks]: block held by each slot
        self.host = host  # rows [blocks, 2 (k, v), kv_heads, block_size, d], or None
        self.decision: tuple[HostCopy, torch.Tensor] | None = None  # the last rescoring's, not acted on yet
        self.pending: tuple[torch.Tensor, torch.Tensor, Pending | None] | None = None

    @classmethod
    def of(cls, blocks: LayerBlocks, kv: LayerKV, transfers: Transfers | None) -> PrunedLayer:
        """The manager of a layer whose prompt KV is complete in `kv`, its active blocks in the slots. With
        `transfers`, every block is copied to the host store and the device keeps only the active ones."""
        store = cls(blocks.units, blocks.positions, blocks.active, None)
        if transfers is None:
            return store
        whole = blocks.entries
        kv_blocks = torch.stack([kv.keys[:, :whole], kv.values[:, :whole]]).unflatten(2, blocks.positions.shape)
        store.host = HostRows.copy_of(transfers, kv_blocks.permute(2, 0, 1, 3, 4))  # a row per block
        every = torch.arange(len(blocks.positions), device=blocks.active.device)
        kv.offload(block_rows(every[~torch.isin(every, blocks.active)], store.block_size))
        return store

    @property
    def block_size(self) -> int:
        return self.positions.shape[1]

    def decide(self, top: torch.Tensor, transfers: Transfers) -> None:
        """How the new top set `top` differs from the active one, worked out on the device and sent to the
        host without waiting: `[leaving count, slots (leaving ones first), top blocks (entering ones first)]`,
        each part in ascending order. As many blocks enter as leave (both sets hold as many blocks)."""
        leaving = ~torch.isin(self.slots, top)
        entering = ~torch.isin(top, self.slots)
        first = (leaving.sum()[None], (~leaving).argsort(stable=True), top[(~entering).argsort(stable=True)])
        decision = torch.cat(first)
        self.decision = transfers.to_host(decision), decision

    def leaving(self) -> int:
        """Active blocks the last decision takes out, read from its host copy (numpy, not `item()`: a read of
        host memory, which the tests' sync counters would count as a device read)."""
        return int(self.decision[0].read().numpy()[0])

    def overlap(self) -> float:
        """The share of the active blocks the last decision keeps."""
        return 1 - self.leaving() / len(self.slots)

    def settle(self, gamma: float) -> float | None:
        """Act on the last decision, if any: below `gamma` overlap, start loading the entering blocks (`install`
        puts them in place before this layer's next attention). Returns its overlap."""
        if self.decision is None:
            return None
        overlap, leaving, size = self.overlap(), self.leaving(), len(self.slots)
        (host, decision), self.decision = self.decision, None
        if overlap < gamma:  # then at least one block leaves, and as many enter
            entering = slice(1 + size, 1 + size + leaving)
            load = None if self.host is None else self.host.load(host.read()[entering])
            self.pending = (decision[1 : 1 + leaving], decision[entering], load)
        return overlap

    def install(self, kv: LayerKV) -> None:
        """Put the blocks prefetched in the previous step into the slots they replace."""
        if self.pending is None:
            return
        slots, entering, load = self.pending
        self.pending = None
        self.slots[slots] = entering
        if load is None:
            return
        kv_blocks = self.host.rows_of(load.wait())  # [entering, 2, kv_heads, block_size, d]
        keys, values = (kv_blocks[:, i].transpose(0, 1).flatten(1, 2) for i in (0, 1))
        kv.swap(block_rows(slots, self.block_size), keys, values, self.positions[entering].flatten())

    def context(self, kv: LayerKV) -> Context:
        if self.host is not None:
            return Context.of(kv)  # the device holds exactly the slots, the last block and newer entries
        whole = self.positions.numel()
        rest = torch.arange(whole, len(kv), device=self.slots.device)
        return Context.of(kv, torch.cat([block_rows(self.slots, self.block_size), rest]))

    def nbytes(self) -> tuple[int, int]:
        """Bytes on the device (unit keys, positions, slots) and on the host (block copies)."""
        device = sum(t.numel() * t.element_size() for t in (self.units, self.positions, self.slots))
        host = 0 if self.host is None else self.host.nbytes
        return device, host


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
