"""Pruning-schedule calibration: how needle accuracy and fidelity vs dense change with SlimInfer's and
LazyLLM's pruning layers, budgets and scoring, on the user's own model, and the cheapest setting that holds.

The prompts are the eval harness's own `niah_single` samples (number needles in a haystack, through the
chat template when asked), each run by the eval's own `run_sample`: dense once per prompt, then every
candidate once per prompt, in an order rotated from prompt to prompt (as `tokensieve eval` does) so that
no setting always runs first on a shared machine. Per candidate, over the prompts:

- accuracy: the eval's scorer (the fraction of the needle's digits found, RULER's string match), mean;
- agreement: greedy agreement with dense's answer (share of equal tokens), mean;
- computed: the share of the prompt's token-layer work done in prefill (`Stats.prefill_fraction`, from the
  tokens each layer computed), mean;
- TTFT vs dense: the median over prompts of the candidate's TTFT over dense's on the same prompt.

The recommendation, per method, is the candidate computing the least of the prompt whose accuracy is at
least dense's on these prompts (shares within 0.1% tie, and the higher agreement wins); None, said plainly,
when no candidate holds, or when dense itself finds no needle (then accuracy ranks nothing).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..eval.fidelity import greedy_agreement
from ..eval.haystack import Haystack
from ..eval.runner import build_samples, run_sample, warm_up
from ..eval.tasks import Sample
from ..methods import spec_of
from .output import pyplot

TASK = "niah_single:numbers"
SHARE_TIE = 3  # decimals of the computed share below which two candidates cost the same


@dataclass
class Measured:
    """One setting (dense or a candidate) over every prompt."""

    method: str
    spec: str
    accuracy: float
    agreement: float
    computed: float
    ttft_s: float
    ttft_vs_dense: float
    scores: list[float]
    outputs: list[str]
    prompt_tokens: list[int]


def needle_prompts(
    tokenizer, tokens: int, count: int, haystack: Haystack | None = None, chat: bool = False, seed: int = 0
) -> list[Sample]:
    """`count` number-needle samples of about `tokens` tokens (templated, with `chat`), as `tokensieve eval`
    builds them."""
    return build_samples(tokenizer, [TASK], [tokens], count, seed, haystack, chat=chat)[TASK, tokens]


def measure(
    engine, samples: Sequence[Sample], candidates: dict[str, str], chat: bool = False, progress: bool = True
) -> tuple[Measured, list[Measured]]:
    """Dense and every candidate (spec -> method name) on every sample; dense's and the candidates' results."""
    specs = ["dense", *candidates]
    runs: dict[str, list] = {spec: [] for spec in specs}
    warm_up(engine, samples[0].context)
    with tqdm(total=len(samples) * len(specs), desc="calibrate-pruning", unit="run", disable=not progress) as bar:
        for index, sample in enumerate(samples):
            shift = index % len(specs)
            for spec in specs[shift:] + specs[:shift]:
                bar.set_postfix_str(spec[:40])
                # length 0: the record's label for a target length, which nothing here reads
                runs[spec].append(run_sample(engine, sample, spec, 0, index, None, chat))
                bar.update()
    dense = _summary("dense", "dense", runs["dense"], runs["dense"])
    return dense, [_summary(method, spec, runs[spec], runs["dense"]) for spec, method in candidates.items()]


def _summary(method: str, spec: str, runs: list, dense: list) -> Measured:
    """Means over prompts of one setting's records (`run_sample`'s (record, token ids per turn) pairs)."""
    records = [record for record, _ in runs]
    agreement = [greedy_agreement(sum(d, []), sum(ids, [])) for (_, d), (_, ids) in zip(dense, runs, strict=True)]
    ratios = [r.ttft_s / d.ttft_s for r, (d, _) in zip(records, dense, strict=True)]
    return Measured(
        method=method,
        spec=spec,
        accuracy=statistics.fmean(r.score for r in records),
        agreement=statistics.fmean(agreement),
        computed=statistics.fmean(r.prefill_fraction for r in records),
        ttft_s=statistics.fmean(r.ttft_s for r in records),
        ttft_vs_dense=statistics.median(ratios),
        scores=[r.score for r in records],
        outputs=[r.outputs[0] for r in records],
        prompt_tokens=[int(r.prompt_tokens) for r in records],
    )


def recommend(dense_accuracy: float, results: Sequence[Measured], method: str) -> tuple[Measured | None, str]:
    """`method`'s cheapest candidate whose accuracy is at least dense's (ties: the higher agreement), and a
    sentence saying why (or why there is none)."""
    own = [r for r in results if r.method == method]
    if dense_accuracy == 0:
        return None, f"{method}: dense finds no needle on these prompts, so accuracy cannot rank its settings"
    holding = [r for r in own if r.accuracy >= dense_accuracy - 1e-9]
    if not holding:
        best = max(own, key=lambda r: (r.accuracy, r.agreement), default=None)
        closest = f"; the closest is {best.spec} at {best.accuracy:.0%}" if best else ""
        return None, f"{method}: no candidate matches dense's accuracy ({dense_accuracy:.0%}){closest}"
    pick = min(holding, key=lambda r: (round(r.computed, SHARE_TIE), -r.agreement))
    return pick, (
        f"{method}: {pick.spec} computes {pick.computed:.1%} of the prompt at dense's accuracy "
        f"({pick.accuracy:.0%}, agreement {pick.agreement:.2f}, TTFT {pick.ttft_vs_dense:.2f}x dense's)"
    )


def calibrate_pruning(
    engine, samples: Sequence[Sample], candidates: dict[str, str], chat: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Measure and recommend: the JSON-ready result (`pruning.json`)."""
    dense, results = measure(engine, samples, candidates, chat, progress)
    methods = list(dict.fromkeys(candidates.values()))
    picks = {method: recommend(dense.accuracy, results, method) for method in methods}
    return {
        "task": TASK,
        "layers": engine.model.spec.num_layers,
        "prompts": len(samples),
        "prompt_tokens": dense.prompt_tokens,
        "chat": chat,
        "dense": asdict(dense),
        "candidates": [asdict(r) for r in results],
        "recommended": {m: (pick.spec if pick else None) for m, (pick, _) in picks.items()},
        # the same as explicit specs, ready to be a model's method defaults (a bare name may stand for them)
        "method_defaults": {m: spec_of(engine.resolve(pick.spec)) for m, (pick, _) in picks.items() if pick},
        "reasons": {m: reason for m, (_, reason) in picks.items()},
    }


def table(result: dict[str, Any]) -> str:
    """The candidates as a numbered table (numbers as in the plot), dense first, then the recommendations."""
    rows = [result["dense"], *result["candidates"]]
    width = max(len(r["spec"]) for r in rows)
    lines = [f"{'#':>2}  {'setting':<{width}}  {'computed':>8}  {'accuracy':>8}  {'agree':>5}  {'TTFT vs dense':>13}"]
    for number, r in enumerate(rows):
        mark = "*" if r["spec"] in result["recommended"].values() else " "
        lines.append(
            f"{number or '-':>2}{mark} {r['spec']:<{width}}  {r['computed']:>8.1%}  {r['accuracy']:>8.0%}  "
            f"{r['agreement']:>5.2f}  {r['ttft_vs_dense']:>12.2f}x"
        )
    return "\n".join([*lines, "", "recommended (*):", *(f"  {reason}" for reason in result["reasons"].values())])


def plot(result: dict[str, Any], path: str | Path, title: str) -> None:
    """Accuracy and agreement vs share computed: one numbered point per candidate (numbers as in the
    table), dense at 100%, each recommendation ringed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    markers = {"sliminfer": "o", "lazyllm": "s"}
    panels = (("accuracy", "needle accuracy"), ("agreement", "greedy agreement with dense"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.scatter([1.0], [result["dense"][key]], marker="*", s=180, color="black", label="dense", zorder=3)
        for method in dict.fromkeys(c["method"] for c in result["candidates"]):
            own = [(n, c) for n, c in enumerate(result["candidates"], 1) if c["method"] == method]
            xs, ys = [c["computed"] for _, c in own], [c[key] for _, c in own]
            ax.scatter(xs, ys, marker=markers.get(method, "^"), s=50, alpha=0.8, label=method, zorder=2)
            for (number, _), x, y in zip(own, xs, ys, strict=True):
                ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        picked = [c for c in result["candidates"] if c["spec"] in result["recommended"].values()]
        ax.scatter(
            [c["computed"] for c in picked], [c[key] for c in picked], s=260, facecolors="none",
            edgecolors="tab:red", linewidths=2, label="recommended", zorder=4,
        )  # fmt: skip
        ax.set_xlabel("share of the prompt computed in prefill")
        ax.set_ylabel(label)
        ax.set_ylim(-0.05, 1.08)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
