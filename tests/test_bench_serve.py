"""benchmarks/bench_serve.py counts what the server streamed: a wave's tokens/s comes from each reply's usage, so a
server that stopped sending it (or a stream shape the script misreads) must show here, not as a GPU row of zeros."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_serve_counts_every_streamed_token_plain_and_under_a_json_schema(tmp_path):
    pytest.importorskip("xgrammar")
    out = tmp_path / "serve.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_serve.py"), "--shape", "tiny", "--dtype", "fp32",
           "--threads", "1", "--clients", "2", "--rounds", "1", "--max-tokens", "8", "--structured",
           "--batched-only", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["mode"] for row in rows] == ["batched (max 32)", "batched (max 32), JSON schema"]
    for row in rows:
        assert (row["requests"], row["errors"]) == (2, 0), row["first_error"]
    plain, schema = rows
    assert round(plain["tok_per_s"] * plain["wall_s"]) == 2 * 8  # ignore_eos: every reply runs to max_tokens
    assert 2 <= round(schema["tok_per_s"] * schema["wall_s"]) <= 2 * 8  # a JSON reply may close before it
