"""scripts/gpu_check.py on the CPU: its arguments, its step runner (timeouts kill, never hang), its summary,
and the clear refusal on a machine without CUDA. The GPU itself runs it with `make gpu-check`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up by name
spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_without_cuda_it_says_so_and_exits_2():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "gpu-check: cannot run: no CUDA device here" in done.stderr and "CUDA build of torch" in done.stderr


def test_plan_passes_the_options_to_pytest_and_bench(tmp_path):
    args = gpu_check.parse_args(["--lengths", "8k", "--methods", "omnikv", "--out", str(tmp_path), "--budget", "100"])
    tests, bench = gpu_check.plan(args)
    assert tests.argv[-1] == "tests/cuda" and "-m" in tests.argv and "cuda" in tests.argv
    assert tests.timeout_s == 100  # never more than the whole budget
    assert bench.argv[bench.argv.index("--lengths") + 1] == "8k"
    assert bench.argv[bench.argv.index("--methods") + 1] == "omnikv"
    assert bench.argv[bench.argv.index("--model") + 1] == "llama3-8b"
    assert bench.argv[bench.argv.index("--device") + 1] == "cuda"
    only_bench = gpu_check.plan(gpu_check.parse_args(["--skip-tests"]))
    assert [step.name for step in only_bench] == ["bench llama3-8b 16k,32k"]


@pytest.mark.parametrize("argv", [["--budget", "0"], ["--new-tokens", "1"], ["--repeats", "0"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2 and "must be" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux's /proc")
def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); "
        "print('working on omnikv @ 32768', flush=True); time.sleep(60)"
    )
    step = gpu_check.Step("slow", [sys.executable, "-c", child], 60, tmp_path / "slow.log")
    start = time.monotonic()
    result = gpu_check.run_step(step, timeout_s=3)
    assert time.monotonic() - start < 20
    assert result.status == "TIMEOUT" and "killed after 3 s" in result.detail
    assert "working on omnikv @ 32768" in result.detail  # where it was when it ran out of time
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the orphan is reaped by init shortly after the kill
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the step's child process survived the timeout")


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, killed and not yet reaped, does not); Linux's /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_failing_step_reports_its_exit_status_and_last_line(tmp_path):
    argv = [
        sys.executable,
        "-c",
        "print('FAILED tests/cuda/test_cuda.py::test_x - assert 1 == 2'); raise SystemExit(1)",
    ]
    result = gpu_check.run_step(gpu_check.Step("cuda tests", argv, 30, tmp_path / "t.log"), timeout_s=30)
    assert result.status == "FAIL" and result.detail.startswith("exit 1: FAILED tests/cuda/test_cuda.py::test_x")
    assert gpu_check.failed_tests((tmp_path / "t.log").read_text()) == [
        "FAILED tests/cuda/test_cuda.py::test_x - assert 1 == 2"
    ]
    ok = gpu_check.run_step(
        gpu_check.Step("ok", [sys.executable, "-c", "print('3 passed')"], 30, tmp_path / "o.log"), 30
    )
    assert ok.status == "PASS" and ok.detail == "3 passed"


def test_last_line_reads_through_progress_bar_redraws():
    assert gpu_check.last_line("start\nbench: 10%|x| dense @ 16384\rbench: 40%|xx| omnikv @ 32768\n\n") == (
        "bench: 40%|xx| omnikv @ 32768"
    )
    assert gpu_check.last_line("") == "(no output)"


def test_summary_has_pass_fail_lines_and_the_speedup_table(tmp_path):
    rows = [
        {"method": m, "length": n, "speedup_vs_transformers": {"ttft": t, "tpot": p, "e2e": 1.0}}
        for m, n, t, p in [
            ("transformers", 16384, 1.0, 1.0),
            ("dense", 16384, 1.05, 1.5),
            ("sliminfer", 16384, 1.6, 1.7),
            ("transformers", 32768, 1.0, 1.0),
            ("sliminfer", 32768, 1.9, 2.0),
            ("sliminfer", 1000, 1.1, 1.0),
        ]
    ]
    bench = tmp_path / "bench.json"
    bench.write_text(gpu_check.json.dumps({"results": rows}))
    results = [
        gpu_check.Result("cuda tests", "PASS", 41.0, "27 passed in 40.2s"),
        gpu_check.Result("bench llama3-8b 16k,32k", "TIMEOUT", 300.0, "killed after 300 s"),
    ]
    text = gpu_check.summary(results, "NVIDIA H200", bench)
    lines = text.splitlines()
    assert lines[0] == "tokensieve gpu-check on NVIDIA H200"
    assert lines[1].startswith("PASS    cuda tests") and "27 passed" in lines[1]
    assert lines[2].startswith("TIMEOUT bench llama3-8b 16k,32k")
    assert "1000 TTFT/TPOT" in text and "16K TTFT/TPOT" in text and "32K TTFT/TPOT" in text
    sliminfer = next(line for line in lines if line.startswith("sliminfer"))
    assert sliminfer.split() == ["sliminfer", "1.10x", "/", "1.00x", "1.60x", "/", "1.70x", "1.90x", "/", "2.00x"]
    dense = next(line for line in lines if line.startswith("dense"))
    assert dense.split()[1] == "-" and dense.split()[-1] == "-"  # dense ran at 16K only
    assert lines[-1] == "overall: FAIL"
    assert gpu_check.summary(results[:1], "x", tmp_path / "none.json").endswith("overall: PASS")


def test_a_test_step_passes_only_when_tests_passed():
    skipped = gpu_check.Result("cuda tests", "PASS", 2.0, "15 skipped in 1.2s")
    gpu_check.check_tests(skipped, "15 skipped in 1.2s\n")
    assert skipped.status == "FAIL" and skipped.detail.startswith("no CUDA test ran")
    failed = gpu_check.Result("cuda tests", "FAIL", 9.0, "exit 1: 1 failed, 14 passed in 8s")
    gpu_check.check_tests(failed, "FAILED tests/cuda/test_cuda.py::test_x - boom\n1 failed, 14 passed in 8s\n")
    assert failed.detail.splitlines()[1].strip() == "FAILED tests/cuda/test_cuda.py::test_x - boom"
    passed = gpu_check.Result("cuda tests", "PASS", 9.0, "15 passed in 8s")
    gpu_check.check_tests(passed, "15 passed in 8s\n")
    assert passed.status == "PASS" and passed.detail == "15 passed in 8s"
