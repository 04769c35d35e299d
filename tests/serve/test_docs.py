"""docs/serve.md's examples run against a live server (serving the tiny preset under the docs' model name)."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import CHAT_TEMPLATE, live_server

DOC = (Path(__file__).resolve().parents[2] / "docs" / "serve.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", DOC, re.S)
CURL = [block for block in re.findall(r"```bash\n(.*?)```", DOC, re.S) if block.lstrip().startswith("curl")]
DOC_URL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def docs_server():
    with live_server(model_name="testbed") as running:
        yield running


@pytest.mark.parametrize("code", PYTHON, ids=[f"python{i}" for i in range(len(PYTHON))])
def test_python_example_runs(docs_server, code, capsys):
    exec(compile(code.replace(DOC_URL, docs_server.url), "docs/serve.md", "exec"), {})
    assert capsys.readouterr().out


@pytest.mark.parametrize("script", CURL, ids=[f"curl{i}" for i in range(len(CURL))])
def test_curl_example_runs(docs_server, script):
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace(DOC_URL, docs_server.url)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert '"error"' not in done.stdout
    for shown in ('"object":"text_completion"', '"usage":', "data: [DONE]", "tokensieve_requests_total{"):
        assert shown in done.stdout


def test_the_documented_chat_template_is_the_tested_one():
    assert CHAT_TEMPLATE in DOC


def test_examples_exist():
    assert len(PYTHON) >= 2 and CURL


def test_every_serve_flag_is_in_the_flag_table():
    from tokensieve.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = [a.option_strings[-1] for a in sub.choices["serve"]._actions if a.option_strings and a.dest != "help"]
    table = DOC.split("## Flags", 1)[1].split("\n## ", 1)[0]
    assert [flag for flag in flags if f"`{flag}" not in table] == []
