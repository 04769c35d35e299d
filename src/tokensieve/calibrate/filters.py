"""OmniKV filter-layer calibration: a model's own filter layers from its decode attention.

OmniKV's filter layers are a property of the model: a good filter layer's top-K tokens carry most of
the attention of the layers after it. To find them, decode a few steps after a few long prompts with
the dense model and record, at every layer and step, the new token's attention over the prompt (mean
over heads). For a candidate layer c and a later layer l, the *capture* is the share of layer l's prompt
attention that falls on layer c's top-K tokens; a layer's score is its mean capture over every later
layer. The recommended filter layers are the highest local peaks of that curve (as many as the paper's
2, 8, 18 of 32 scale to at this depth, unless `--filters` says otherwise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..attention import last_query_probs
from ..methods.base import Context, LayerStep, Method, Policy, Run, resolve_budget, scaled_layers
from ..methods.omnikv import PAPER_DEPTH, PAPER_FILTER_LAYERS
from .output import pyplot

PAPER_TOP_K_FRACTION = 0.067  # OmniKV's default budget as a fraction of the prompt


@dataclass
class RecordAttention(Method):
    """Dense decode that records each layer's attention of the new token over the prompt."""

    name: ClassVar[str] = "record-attention"

    def start(self, run: Run) -> Policy:
        return AttentionRecorder(run)


class AttentionRecorder(Policy):
    """Collects `[layers, prompt]` attention per decode step; `stats()["attention"]` is `[steps, layers, prompt]`."""

    def __init__(self, run: Run):
        super().__init__(run)
        self.step: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []

    def decode_context(self, step: LayerStep) -> Context:
        probs = last_query_probs(step.q[:, -1], step.kv.keys, self.run.scale)  # over prompt and generated keys
        self.step.append(probs[: self.run.prompt_len].cpu())
        return Context.of(step.kv)

    def decode_step_done(self) -> None:
        self.steps.append(torch.stack(self.step))
        self.step = []

    def stats(self) -> dict[str, Any]:
        return {"attention": torch.stack(self.steps) if self.steps else None}


def capture_matrix(attention: torch.Tensor, top_k: int) -> torch.Tensor:
    """`[layers, layers]`: entry (c, l) is the mean over steps of layer l's prompt attention on c's top-K set.

    `attention` is `[steps, layers, prompt]`; each row is renormalised to the prompt's attention mass.
    """
    mass = attention / attention.sum(-1, keepdim=True)
    top = attention.topk(top_k, dim=-1).indices  # [steps, layers, K]
    layers = attention.shape[1]
    captured = [mass.gather(-1, top[:, c : c + 1].expand(-1, layers, -1)).sum(-1) for c in range(layers)]
    return torch.stack(captured, 1).mean(0)


def capture_curve(matrix: torch.Tensor) -> list[float | None]:
    """Each layer's mean capture over all later layers; None for the last layer (nothing follows it)."""
    layers = matrix.shape[0]
    return [float(matrix[c, c + 1 :].mean()) if c < layers - 1 else None for c in range(layers)]


def recommend_filters(curve: list[float | None], count: int) -> list[int]:
    """The `count` highest local maxima of `curve` (topped up with the next best layers), ascending."""
    scored = [(c, v) for c, v in enumerate(curve) if v is not None]
    values = dict(scored)
    peaks = [c for c, v in scored if v >= values.get(c - 1, -1.0) and v >= values.get(c + 1, -1.0)]
    rest = [c for c, _ in scored if c not in peaks]
    by_value = sorted(peaks, key=lambda c: -values[c]) + sorted(rest, key=lambda c: -values[c])
    return sorted(by_value[:count])


def record(engine, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Per prompt, the recorded attention `[steps, layers, prompt]` (dense decoding, greedy)."""
    recorded = []
    for ids in prompts:
        gen = engine.generate(ids, max_new_tokens=steps + 1, method=RecordAttention())
        attention = gen.stats.method_stats["attention"]
        if attention is not None:  # None when the first token was EOS: no decode step ran
            recorded.append(attention)
    if not recorded:
        raise ValueError("every prompt ended at its first token (EOS): give other prompts with --prompts")
    return recorded


def calibrate(engine, prompts: list[list[int]], steps: int = 8, top_k: int | float = PAPER_TOP_K_FRACTION) -> dict:
    """Record the attention, compute the capture matrix and curve, and recommend filter layers."""
    num_layers = engine.model.spec.num_layers
    matrices = []
    for attention in record(engine, prompts, steps):
        matrices.append(capture_matrix(attention, resolve_budget(top_k, attention.shape[-1], "top-k")))
    matrix = torch.stack(matrices).mean(0)
    curve = capture_curve(matrix)
    default = scaled_layers(PAPER_FILTER_LAYERS, PAPER_DEPTH, num_layers)
    return {
        "layers": num_layers,
        "prompts": len(matrices),
        "prompt_tokens": [len(ids) for ids in prompts],
        "decode_steps": steps,
        "top_k": top_k,
        "capture_curve": curve,
        "capture_matrix": [[round(float(x), 6) for x in row] for row in matrix],
        "recommended_filter_layers": recommend_filters(curve, len(default)),
        "paper_filter_layers_scaled": list(default),
    }


def plot(result: dict, path: Path, title: str) -> None:
    """The capture curve with the recommended and the paper's (scaled) filter layers marked."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    curve = result["capture_curve"]
    layers = [c for c, v in enumerate(curve) if v is not None]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(layers, [curve[c] for c in layers], marker="o", label="capture of later layers' attention")
    for c in result["recommended_filter_layers"]:
        ax.axvline(c, color="tab:red", linestyle="--", alpha=0.7)
    for c in result["paper_filter_layers_scaled"]:
        ax.axvline(c, color="tab:gray", linestyle=":", alpha=0.7)
    ax.plot([], [], color="tab:red", linestyle="--", label="recommended filter layers")
    ax.plot([], [], color="tab:gray", linestyle=":", label="paper's 2, 8, 18 of 32, scaled")
    ax.set_xlabel("candidate filter layer")
    top_k = result["top_k"]
    top = f"{top_k:.1%} of the prompt" if isinstance(top_k, float) else f"{top_k} tokens"
    ax.set_ylabel(f"later layers' attention on the top {top}", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_prompts(engine, path: str | None, tokens: int, count: int) -> list[list[int]]:
    """Token ids of the prompts, each cut to `tokens`: from a file, or `count` random-token prompts.

    A `.jsonl` file holds one prompt per line (a JSON string, or an object with "prompt" or "text");
    any other file is one prompt.
    """
    if path is None:
        vocab = engine.model.spec.vocab_size
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (tokens,), generator=gen).tolist() for _ in range(count)]
    file = Path(path)
    if file.suffix == ".jsonl":
        items = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        texts = [item if isinstance(item, str) else item.get("prompt", item.get("text")) for item in items]
        if any(not isinstance(text, str) for text in texts):
            raise ValueError(f"{path}: each line must be a JSON string or an object with a 'prompt' or 'text' field")
    else:
        texts = [file.read_text()]
    return [engine.encode(text)[:tokens] for text in texts]
