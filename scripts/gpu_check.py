"""The prepared GPU check: the CUDA tests, then `tokensieve bench` on the `llama3-8b` preset, one compact summary.

Written to be run blind, in one call, on a machine lent for a few minutes: `make gpu-check` (or
`python scripts/gpu_check.py`) from the repository root. Each step runs in its own process group with a
timeout taken from one overall budget (default 450 s, under 8 minutes on one H200), so the check never
hangs; a step that runs out of time is killed and reported with the last thing it printed. The full
output of each step is kept in `--out` (default results/gpu-check). Without CUDA it says so and exits 2.
Exit status: 0 when every step passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "tqdm", "pytest")


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    log: Path


@dataclass
class Result:
    name: str
    status: str  # "PASS", "FAIL" or "TIMEOUT"
    seconds: float
    detail: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, prog="gpu_check.py"
    )
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for every step together (default 450)")
    parser.add_argument("--tests-timeout", type=float, default=150.0, help="seconds for the CUDA tests (default 150)")
    parser.add_argument("--lengths", default="16k,32k", help="bench context lengths (default 16k,32k)")
    parser.add_argument(
        "--methods", default="sliminfer,lazyllm,omnikv", help="bench methods; transformers and dense always run"
    )
    parser.add_argument(
        "--model", default="llama3-8b", help="bench model: a preset or a checkpoint (default llama3-8b)"
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="bench tokens per run (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="bench timed runs per method and length (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu-check", help="logs and bench.json")
    parser.add_argument("--skip-tests", action="store_true", help="run the bench only")
    parser.add_argument("--skip-bench", action="store_true", help="run the CUDA tests only")
    args = parser.parse_args(argv)
    if args.budget <= 0 or args.tests_timeout <= 0:
        parser.error("--budget and --tests-timeout must be > 0 seconds")
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be >= 2 and --repeats >= 1")
    return args


def environment_problem() -> str | None:
    """Why this machine cannot run the check (missing packages, no CUDA), or None."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        return f"missing Python packages: {', '.join(missing)} (install them into {sys.executable})"
    import torch

    if not torch.cuda.is_available():
        return (
            f"no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}): run it on a "
            "machine with an NVIDIA GPU and a CUDA build of torch"
        )
    return None


def plan(args: argparse.Namespace) -> list[Step]:
    """The steps to run, in order, each with its command line and its own timeout."""
    python = [sys.executable]
    steps = []
    if not args.skip_tests:
        tests = [*python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rf", "tests/cuda"]
        steps.append(Step("cuda tests", tests, min(args.tests_timeout, args.budget), args.out / "tests.log"))
    if not args.skip_bench:
        bench = [*python, "-m", "tokensieve.cli", "bench", "--model", args.model, "--device", "cuda"]
        bench += ["--methods", args.methods, "--lengths", args.lengths, "--new-tokens", str(args.new_tokens)]
        bench += ["--repeats", str(args.repeats), "--out", str(args.out / "bench")]
        steps.append(Step(f"bench {args.model} {args.lengths}", bench, args.budget, args.out / "bench.log"))
    return steps


def run_step(step: Step, timeout_s: float) -> Result:
    """Run one step in its own process group, its output in `step.log`; killed (the group) at the timeout."""
    step.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    with step.log.open("w") as log:
        process = subprocess.Popen(
            step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    seconds = time.monotonic() - start
    last = last_line(step.log.read_text(errors="replace"))
    if code is None:
        return Result(step.name, "TIMEOUT", seconds, f"killed after {timeout_s:.0f} s; last output: {last}")
    return Result(step.name, "PASS" if code == 0 else "FAIL", seconds, last if code == 0 else f"exit {code}: {last}")


def last_line(text: str) -> str:
    """The last non-empty line of a log, after any carriage return (progress bars redraw with one)."""
    lines = [line.split("\r")[-1].strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:160] if lines else "(no output)"


def failed_tests(text: str) -> list[str]:
    """The `FAILED ...` lines of a pytest log (its -rf summary)."""
    return [line.strip() for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]


def check_tests(result: Result, log: str) -> None:
    """A test step passes only if some test passed (all skipped means CUDA was not used); failures listed."""
    if result.status == "PASS" and " passed" not in f" {result.detail}":
        result.status, result.detail = "FAIL", f"no CUDA test ran: {result.detail}"
    if result.status == "FAIL":
        result.detail += "".join(f"\n{'':<8}{line}" for line in failed_tests(log))


def speedup_table(rows: list[dict]) -> str:
    """Methods x lengths: TTFT and TPOT speedups vs transformers, from bench.json's results."""
    lengths = sorted({row["length"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    cells = {(row["method"], row["length"]): row["speedup_vs_transformers"] for row in rows}
    header = f"{'method':<28}" + "".join(f"{f'{_tokens(n)} TTFT/TPOT':>20}" for n in lengths)
    lines = ["speedup vs transformers (above 1 = faster)", header]
    for method in methods:
        parts = []
        for length in lengths:
            cell = cells.get((method, length))
            parts.append(f"{cell['ttft']:.2f}x / {cell['tpot']:.2f}x" if cell else "-")
        lines.append(f"{method[:27]:<28}" + "".join(f"{part:>20}" for part in parts))
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def summary(results: list[Result], device: str, bench_json: Path) -> str:
    lines = [f"tokensieve gpu-check on {device}"]
    for r in results:
        lines.append(f"{r.status:<8}{r.name:<34}{r.seconds:>6.0f} s   {r.detail}")
    if bench_json.is_file():
        lines += ["", speedup_table(json.loads(bench_json.read_text())["results"])]
    lines.append(f"\noverall: {'PASS' if all(r.status == 'PASS' for r in results) else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = environment_problem()
    if problem:
        print(f"gpu-check: cannot run: {problem}", file=sys.stderr)
        return 2
    import torch

    device = f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    deadline = time.monotonic() + args.budget
    bench_json = args.out / "bench" / "bench.json"
    bench_json.unlink(missing_ok=True)  # a table from an earlier run must not pass for this one's
    results = []
    for step in plan(args):
        left = deadline - time.monotonic()
        if left < 10:
            results.append(Result(step.name, "TIMEOUT", 0.0, "not started: the overall --budget was spent"))
            continue
        result = run_step(step, min(step.timeout_s, left))
        if step.name == "cuda tests":
            check_tests(result, step.log.read_text())
        results.append(result)
    print(summary(results, device, bench_json))
    return 0 if all(r.status == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
