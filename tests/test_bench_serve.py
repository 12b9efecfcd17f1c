"""The serving benchmark, and the model shapes it shares with bench_scaling. bench_serve.py counts what the server
streamed: a wave's tokens/s comes from each reply's usage, so a server that stopped sending it (or a stream shape the
script misreads) must show here, not as a GPU row of zeros."""

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


def test_every_benchmark_shape_builds_its_config(tmp_path):
    """bench_scaling / bench_serve write random weights of these shapes on the GPU: each must at least make a config
    of the real sizes (a Qwen shape once failed there, its table entry naming model_type twice)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from bench_scaling import SHAPES, shape_config

    from tunelab.model.shapes import KNOWN_SHAPES
    from tunelab.model.tiny import make_tokenizer

    tokenizer = make_tokenizer(tmp_path)
    for shape, (model_type, dims) in SHAPES.items():
        config = shape_config(shape, tokenizer)
        sizes = dims if isinstance(dims, dict) else KNOWN_SHAPES[dims]
        assert config.model_type == model_type, shape
        assert (config.hidden_size, config.num_hidden_layers) == (sizes["hidden_size"], sizes["num_hidden_layers"])
        assert config.eos_token_id == tokenizer.eos_token_id
