"""`python -m tokensieve.serve.load`: the load measurement runs and prints one row per run."""

from __future__ import annotations

import pytest

from tokensieve.serve.load import HEADER, TURNS_HEADER, Load, main, overhead, prompts


def test_load_measurement_prints_a_row_per_run_and_the_overhead(capsys):
    main(["--model", "tiny", "--requests", "3", "--concurrency", "1,2", "--max-tokens", "4", "--prompt-tokens", "16"]
         + ["--repeats", "2"])  # fmt: skip
    table, notes = capsys.readouterr().out.strip().split("\n\n")
    lines = table.splitlines()
    assert "\n".join(lines[:2]) == HEADER
    assert notes.startswith("server overhead at concurrency 1, dense: ") and "medians of 2 alternating runs" in notes
    rows = [line.split(" | ") for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("| in-process stream, dense", "1"),
        ("| server, dense", "1"),
        ("| server, dense", "2"),
    ]
    for row in rows:
        rps, ttft50, ttft90, tpot50 = (float(v) for v in row[2:6])
        assert rps > 0 and 0 < ttft50 <= ttft90 and tpot50 >= 0  # a TPOT can round to 0.0 ms on tiny


def test_multi_turn_measurement_computes_less_with_reuse(capsys):
    main(["--model", "tiny", "--requests", "1", "--concurrency", "1", "--max-tokens", "3", "--prompt-tokens", "20"]
         + ["--turns", "3"])  # fmt: skip
    out = capsys.readouterr().out
    rows = [line.strip("| ").split(" | ") for line in out.split(TURNS_HEADER)[1].strip().splitlines()]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    computed = [(int(row[3]), int(row[5])) for row in rows]
    assert computed[0] == (21, 21)  # the first turn (and BOS) either way
    for reused, recomputed in computed[1:]:
        # the new turn and the last reply's last token; unless the reply's text dropped a trailing incomplete
        # character (the random model emits any bytes), and its session was not kept: then all of it
        assert reused == 21 or reused == recomputed
    assert any(reused == 21 < recomputed for reused, recomputed in computed[1:])


def test_load_measurement_of_a_running_server(live, capsys):
    main(["--model", "tiny", "--url", live.url, "--requests", "2", "--concurrency", "2", "--max-tokens", "3"])
    rows = capsys.readouterr().out.strip().split("\n\n")[0].splitlines()[2:]
    assert [row.split(" | ")[:2] for row in rows] == [["| in-process stream, dense", "1"], ["| server, dense", "2"]]


def test_load_timings():
    load = Load("x", 1, rates=[1.0])
    load.add(sent=0.0, pieces=[0.1, 0.2, 0.4], tokens=4)
    load.add(sent=1.0, pieces=[1.3], tokens=1)  # one token: a TTFT, no TPOT
    assert load.ttft_s == pytest.approx([0.1, 0.3]) and load.tpot_s == pytest.approx([0.1])
    assert load.row().startswith("| x | 1 | 1.00 | ")
    load.merge(Load("x", 1, rates=[3.0, 4.0], ttft_s=[0.5]))
    assert load.requests_per_s == 3.0 and len(load.ttft_s) == 3  # the median run; every request's TTFT


def test_overhead_compares_medians():
    local = Load("in-process stream, dense", 1, rates=[10.0, 12.0, 11.0], ttft_s=[0.1, 0.1])
    served = Load("server, dense", 1, rates=[10.0, 9.0, 10.5], ttft_s=[0.11, 0.11])
    assert overhead(local, served) == (
        "server overhead at concurrency 1, dense: +9.1% requests/s lost, TTFT p50 +10.0% "
        "(medians of 3 alternating runs)"
    )


def test_prompts_are_distinct_and_of_the_asked_length():
    texts = prompts(5, 32)
    assert len(set(texts)) == 5 and {len(t) for t in texts} == {32}
