"""Train the testbed model: `python -m tokensieve.testbed.train [--device cpu|cuda] [--seed] [--steps] [--out DIR]`.

Recipe: a BPE tokenizer trained on the suite's text, then a small Llama (GQA, RoPE, tied embeddings)
trained on task samples of growing length (a curriculum: retrieval heads form quickly on short prompts,
then longer prompts teach them to ignore more haystack), with positional skip-wise training (PoSE) so that
the relative distances of 8K prompts are seen while sequences stay short. Everything is drawn from `--seed`.

`DIR` ends up a Hugging Face checkpoint directory (`config.json`, `model.safetensors`, tokenizer files),
rewritten every `--save-every` steps, plus `train_log.jsonl`, `train_curve.png` and `state.pt` (resume).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import model_path
from .data import ANSWER, TEXT, collate, draw_examples, stretched_positions, task_example
from .tokenizer import save_tokenizer, task_specs, train_tokenizer

VALIDATION_SEEDS = 500_000  # model selection samples: neither training (>= 1e6) nor evaluation (0, 1, ...)


@dataclass
class TrainConfig:
    """Model shape and training schedule (defaults: the embedded model's recipe)."""

    steps: int = 2300
    seed: int = 0
    # model
    vocab_size: int = 2048
    tokenizer_samples: int = 40  # corpus samples per task spec for the tokenizer
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256  # retrieval lives in attention; a narrow MLP saves CPU time
    rope_theta: float = 100_000.0  # slow rotations: attention can match keys thousands of tokens apart
    max_positions: int = 16_384
    # optimisation
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    tokens_per_step: int = 2048
    micro_batch: int = 4  # examples per forward pass; neighbours in length, so little padding
    text_loss_weight: float = 0.1  # language modelling on the haystack, next to the answer loss
    text_loss_stride: int = 8  # the text loss reads every 8th position: the output layer costs less
    # Copy examples (repeated random tokens) grow the induction heads that retrieval builds on: most of the
    # first stage, so they form within a few hundred steps, then enough to keep them. The repeated segment
    # stays 32 tokens while the gap before its repeat grows with the prompts (when the segment grew with
    # them, the copy heads collapsed at the stage change; with no gap, they never reached past 32 tokens).
    first_stage_copy_fraction: float = 0.7
    copy_fraction: float = 0.3
    copy_segment: int = 32
    haystack_fraction: float = 0.05  # share of plain haystack text
    # curriculum: (fraction of the steps at which a stage ends, prompt length in tokens); a stage may give a
    # list of lengths instead, one drawn per step (mixing lengths keeps short-range skills while adding long)
    curriculum: list[tuple[float, int | list[int]]] = field(
        default_factory=lambda: [(0.15, 64), (0.35, 128), (0.55, 256), (0.75, 512), (0.92, 1024), (1.0, 2048)]
    )
    # Share of batches whose positions are stretched (PoSE), once past the first stage. Off: on our CPU budget
    # (a run at 0.5) the stretched batches wiped out the freshly formed copy heads.
    pose_fraction: float = 0.0
    pose_max_position: int = 9216  # stretched positions reach 8K prompts plus their answers
    # bookkeeping
    log_every: int = 5
    validate_every: int = 50
    save_every: int = 25

    def stage_at(self, step: int) -> int:
        """Index of the curriculum stage that `step` belongs to."""
        for stage, (end, _) in enumerate(self.curriculum):
            if step < end * self.steps:
                return stage
        return len(self.curriculum) - 1

    def length_at(self, step: int) -> int:
        """The prompt length of `step`: its stage's, or one of its stage's lengths drawn from the seed."""
        lengths = self.curriculum[self.stage_at(step)][1]
        if isinstance(lengths, int):
            return lengths
        return random.Random(f"{self.seed}|length|{step}").choice(lengths)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_positions,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def losses(model, ids, targets, roles, positions=None, text_stride: int = 1) -> tuple[torch.Tensor, ...]:
    """Mean cross-entropy over answer targets and over (every `text_stride`-th) text target, and whether
    each answer target is the argmax. Logits are computed only where a loss reads them."""
    hidden = model.model(input_ids=ids, position_ids=positions).last_hidden_state
    answer = roles == ANSWER
    text = (roles == TEXT) & (torch.arange(ids.shape[1], device=ids.device) % text_stride == 0)
    answer_logits = model.lm_head(hidden[answer]).float()
    text_logits = model.lm_head(hidden[text]).float()
    hits = answer_logits.argmax(-1) == targets[answer]
    return _cross_entropy(answer_logits, targets[answer]), _cross_entropy(text_logits, targets[text]), hits


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets) if len(targets) else logits.sum()  # an empty selection: 0


@torch.no_grad()
def validate(model, tokenizer, length: int, samples: int = 1) -> dict[str, float]:
    """Teacher-forced exact match of the whole answer (every answer token argmax-right), per task family."""
    model.eval()
    per_family: dict[str, list[float]] = defaultdict(list)
    for spec in task_specs():
        for i in range(samples):
            example = task_example(tokenizer, spec, length, VALIDATION_SEEDS + i)
            ids, targets, roles = collate([example], tokenizer.pad_token_id)
            _, _, hits = losses(model, ids, targets, roles)
            per_family[spec.split(":")[0]].append(float(hits.all()))
    model.train()
    return {family: sum(v) / len(v) for family, v in per_family.items()}


def train(
    cfg: TrainConfig,
    out: str | Path,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    plot: bool = True,
    init: str | Path | None = None,
) -> Path:
    """Train (or resume) into `out`; returns the path of the Hugging Face directory (`out` itself).

    `init`: a Hugging Face checkpoint directory (e.g. the embedded testbed) whose weights and tokenizer
    the run starts from instead of fresh ones: a continuation with a new schedule and a fresh optimizer.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if init is not None:
        tokenizer, model = _initial_checkpoint(Path(init), cfg)
    else:
        tokenizer = train_tokenizer(cfg.vocab_size, seed=cfg.seed, samples_per_task=cfg.tokenizer_samples)
        model = build_model(cfg, tokenizer)
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    start, elapsed = 0, 0.0
    state_path, log_path = out / "state.pt", out / "train_log.jsonl"
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed_s"]
    elif log_path.exists():
        log_path.unlink()
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    model.train()
    began = time.perf_counter() - elapsed
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress)
    for step in bar:
        length = cfg.length_at(step)
        first_stage = cfg.stage_at(step) == 0
        copy = cfg.first_stage_copy_fraction if first_stage else cfg.copy_fraction
        seed = cfg.seed * 1_000_003 + step
        examples = draw_examples(
            tokenizer, length, cfg.tokens_per_step, seed, cfg.haystack_fraction, copy, cfg.copy_segment
        )
        rng = random.Random(f"{cfg.seed}|pose|{step}")
        pose = rng.random() < cfg.pose_fraction and not first_stage
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        answer_loss = text_loss = 0.0
        for first in range(0, len(examples), cfg.micro_batch):  # gradient accumulation over micro-batches
            micro = examples[first : first + cfg.micro_batch]
            ids, targets, roles = (t.to(device) for t in collate(micro, tokenizer.pad_token_id))
            positions = None
            if pose:
                positions = torch.tensor([stretched_positions(ids.shape[1], cfg.pose_max_position, rng)] * len(micro))
                positions = positions.to(device)
            answer, text, _ = losses(model, ids, targets, roles, positions, cfg.text_loss_stride)
            share = len(micro) / len(examples)
            ((answer + cfg.text_loss_weight * text) * share).backward()
            answer_loss, text_loss = answer_loss + answer.item() * share, text_loss + text.item() * share
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(length=length, answer_loss=f"{answer_loss:.3f}")
        done = step + 1
        record = None
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = dict(step=done, length=length, lr=cfg.lr_at(step), answer_loss=answer_loss,
                          text_loss=text_loss, pose=pose,
                          elapsed_s=round(time.perf_counter() - began, 1))  # fmt: skip
        if done % cfg.validate_every == 0 or done == cfg.steps:
            record = record or dict(step=done, length=length, elapsed_s=round(time.perf_counter() - began, 1))
            record["validation"] = validate(model, tokenizer, length)
        if record:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if done % cfg.save_every == 0 or done == cfg.steps:
            save(model, tokenizer, optimizer, done, time.perf_counter() - began, out)
    if plot:
        plot_curve(log_path, out / "train_curve.png")
    return out


def _initial_checkpoint(path: Path, cfg: TrainConfig):
    """Tokenizer and model of a checkpoint directory, checked against the configured shape."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--init {path}: no config.json there; pass a Hugging Face checkpoint directory")
    model = LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
    )
    shape = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
             "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads}  # fmt: skip
    differs = {k: (getattr(model.config, k), v) for k, v in shape.items() if getattr(model.config, k) != v}
    if differs:
        raise ValueError(f"--init {path} has a different shape from the config (checkpoint, config): {differs}")
    return AutoTokenizer.from_pretrained(path), model


def save(model, tokenizer, optimizer, step: int, elapsed_s: float, out: Path) -> None:
    """The Hugging Face directory and the resume state, each written to a temporary file then renamed."""
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "elapsed_s": elapsed_s}
    torch.save(state, out / "state.pt.tmp")
    (out / "state.pt.tmp").replace(out / "state.pt")


def plot_curve(log_path: Path, png: Path) -> Path | None:
    """Answer and text loss against steps, and validation exact match per task family (if matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    logged = [r for r in records if "answer_loss" in r]
    for key in ("answer_loss", "text_loss"):
        left.plot([r["step"] for r in logged], [r[key] for r in logged], label=key.replace("_", " "))
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy")
    left.legend()
    left.grid(alpha=0.3)
    validated = [r for r in records if "validation" in r]
    for family in validated[0]["validation"] if validated else []:
        right.plot([r["step"] for r in validated], [r["validation"][family] for r in validated], label=family)
    right.set_xlabel("step (prompt length grows with the curriculum)")
    right.set_ylabel("answer exact match (teacher-forced)")
    right.set_ylim(-0.05, 1.05)
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m tokensieve.testbed.train", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="testbed-run", help="output directory (a Hugging Face checkpoint)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/state.pt")
    parser.add_argument("--init", default=None, help="start from a checkpoint's weights ('testbed': embedded)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--no-plot", action="store_true", help="skip the training-curve PNG")
    parser.add_argument("--config", default=None, help="JSON file of TrainConfig fields to override")
    scalars = [f for f in fields(TrainConfig) if f.name != "curriculum"]
    for f in scalars:
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, help=f"({f.default})")
    args = parser.parse_args(argv)
    overrides = json.loads(Path(args.config).read_text()) if args.config else {}
    overrides |= {f.name: getattr(args, f.name) for f in scalars if getattr(args, f.name) is not None}
    if "curriculum" in overrides:
        overrides["curriculum"] = [tuple(stage) for stage in overrides["curriculum"]]
    cfg = TrainConfig(**overrides)
    if cfg.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {cfg.steps}")
    return cfg, args


def main(argv=None) -> None:
    cfg, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    init = model_path() if args.init == "testbed" else args.init
    out = train(cfg, args.out, args.device, args.resume, not args.quiet, not args.no_plot, init)
    print(f"model written to {out}")


if __name__ == "__main__":
    main()
