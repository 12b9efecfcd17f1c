"""`tunelab board`: the JSON it serves is what the work dirs hold (finished, running, crashed, older runs), and in a
real headless Chromium the page lists a run, draws its curves, grows them while a CPU training runs, draws a second
run on the same chart, and marks the run crashed once its process is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tests.train_helpers import child_env, identity_rows, tiny_cfg
from tests.test_web import CHROMIUM_ARGS, _browser_or_skip

CHROMIUM = "/usr/bin/chromium"


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_llama_dir):
    """A folder of work dirs: one finished run with evaluation answers, made by the real training loop."""
    from transformers import AutoTokenizer

    from tunelab.train.loop import train

    root = tmp_path_factory.mktemp("work_dirs")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = tiny_cfg(tiny_llama_dir, max_steps=6, logging_steps=1, evaluation_freq=3, lr=3e-3,
                   evaluation_inputs=["Who are you?"], eval_max_new_tokens=6)
    rows = identity_rows(tokenizer)
    train(cfg, root / "finished", train_rows=rows, eval_rows=rows[:4], device="cpu")
    return root


@pytest.fixture(scope="module")
def board_url(runs_root):
    from tunelab.board.app import create_board_app
    from tunelab.chat.http_server import BackgroundServer

    with BackgroundServer(create_board_app([runs_root])) as url:
        yield url


def _run(url: str, name: str) -> dict:
    runs = {r["name"]: r for r in _get(f"{url}/api/runs")["runs"]}
    return runs[name]


def test_api_serves_a_finished_run_from_its_work_dir(board_url, tiny_llama_dir):
    run = _run(board_url, "finished")
    assert run["state"] == "finished" and run["step"] == 6 and run["total_steps"] == 6
    assert run["summary"]["pretrained_model_name_or_path"] == str(tiny_llama_dir)
    assert run["summary"]["method"] == "full" and run["summary"]["max_steps"] == 6
    log = _get(f"{board_url}/api/runs/{run['id']}/log")
    assert [r["step"] for r in log["train"]] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "memory_gb"} <= set(log["train"][0])
    assert [r["step"] for r in log["eval"]] == [0, 3, 6] and run["eval_loss"] == log["eval"][-1]["eval_loss"]
    answers = _get(f"{board_url}/api/runs/{run['id']}/answers")
    assert [a["step"] for a in answers] == [0, 3, 6]
    assert answers[0]["answers"][0]["question"] == "Who are you?"


def test_api_marks_a_dead_run_crashed_and_reads_runs_without_run_json(board_url, runs_root):
    finished = runs_root / "finished"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = runs_root / "group" / "crashed"  # folders of folders are searched too
    crashed.mkdir(parents=True)
    status = json.loads((finished / "run.json").read_text())
    (crashed / "run.json").write_text(json.dumps({**status, "state": "running", "pid": dead.pid, "ended": None}))
    (crashed / "train_log.jsonl").write_text((finished / "train_log.jsonl").read_text().split("\n", 3)[0] + "\n")
    older = runs_root / "older"  # a run from before run.json: its settings come from resolved_config.py
    older.mkdir()
    (older / "resolved_config.py").write_text((finished / "resolved_config.py").read_text())
    assert _run(board_url, "crashed")["state"] == "crashed"
    run = _run(board_url, "older")
    assert run["state"] == "unknown" and run["summary"]["max_steps"] == 6 and run["step"] == 0
    with urllib.request.urlopen(f"{board_url}/", timeout=10) as response:
        assert "tunelab board" in response.read().decode()


def test_a_log_with_inf_or_nan_is_served_with_gaps(board_url, runs_root):
    """An fp16 step logs an overflowed gradient norm as Infinity (a loss gone wrong: NaN), which JSON cannot send: the
    run list and the run's curves still come (those values as null), and a record without a step is left out."""
    records = [json.loads(line) for line in (runs_root / "finished" / "train_log.jsonl").read_text().splitlines()]
    odd = runs_root / "odd"
    odd.mkdir()
    first, second = [r for r in records if "loss" in r][:2]
    (odd / "train_log.jsonl").write_text("\n".join([
        json.dumps({**first, "grad_norm": float("inf")}), json.dumps({**second, "loss": float("nan")}),
        json.dumps({"loss": 1.0})]) + "\n")
    run = _run(board_url, "odd")
    log = _get(f"{board_url}/api/runs/{run['id']}/log")
    assert [r["step"] for r in log["train"]] == [first["step"], second["step"]]
    assert log["train"][0]["grad_norm"] is None and log["train"][1]["loss"] is None and run["loss"] is None


def test_board_cli_defaults_to_localhost_and_names_a_missing_folder(tmp_path, capsys):
    from tunelab.cli.main import build_parser, main

    args = build_parser().parse_args(["board", "a", "b"])
    assert args.host == "127.0.0.1" and args.paths == ["a", "b"]
    assert main(["board", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["board", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000: must be from 1 to 65535" in capsys.readouterr().err
    import socket  # a port in use: one line, before the board starts

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["board", str(tmp_path), "--port", str(taken.getsockname()[1])]) == 2
    assert "already in use" in capsys.readouterr().err


LIVE_CONFIG = """\
pretrained_model_name_or_path = {model!r}
method = "lora"
lora_r = 8
lora_alpha = 16
data_path = "identity.json"
prompt_template = "qwen_chat"
max_length = 64
batch_size = 1
max_steps = 400
lr = 1e-2
save_steps = 1000
logging_steps = 1
evaluation_freq = 1000
evaluation_inputs = ["Who are you?"]
eval_max_new_tokens = 4
"""


def _points(page, key: str) -> int:
    return int(page.get_attribute(f".chart[data-key='{key}'] svg", "data-points") or 0)


@pytest.mark.browser
def test_page_shows_live_curves_that_grow_and_compares_two_runs(board_url, runs_root, tiny_llama_dir, tmp_path):
    sync_playwright = _browser_or_skip()
    from PIL import Image

    records = [{"instruction": q, "input": "", "output": "I am Tuna."} for q in ["Who are you?", "Your name?"]]
    (tmp_path / "identity.json").write_text(json.dumps(records))
    (tmp_path / "live.py").write_text(LIVE_CONFIG.format(model=str(tiny_llama_dir)))
    env = child_env(TUNELAB_CACHE=str(tmp_path))
    trainer = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(tmp_path / "live.py"), "--work-dir",
                                str(runs_root / "live"), "--device", "cpu"], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=open(tmp_path / "train.err", "w"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1100})
                page.goto(board_url)
                # the run appears by itself once training starts, running
                page.wait_for_selector("#runs tr:has(.run-name:text-is('live')) .state.running", timeout=120000)
                page.click("#runs tr:has(.run-name:text-is('live'))")
                page.wait_for_function("Number(document.querySelector(\".chart[data-key='loss'] svg\")"
                                       "?.dataset.points) >= 3", timeout=120000)
                first = _points(page, "loss")
                # the curve grows while the training runs, without reloading the page
                page.wait_for_function(f"Number(document.querySelector(\".chart[data-key='loss'] svg\")"
                                       f".dataset.points) >= {first + 3}", timeout=120000)
                assert trainer.poll() is None, "the training ended before the page saw it grow"
                for key in ("lr", "grad_norm", "tokens_per_s", "memory_gb"):
                    assert _points(page, key) >= first
                # evaluation answers before training, shown from the run's eval_outputs_iter_0.json
                page.wait_for_selector("#answers td.q:text-is('Who are you?')", timeout=30000)
                # a second run on the same charts
                page.click("#runs tr:has(.run-name:text-is('finished')) input[type=checkbox]")
                page.wait_for_function("document.querySelectorAll(\".chart[data-key='loss'] polyline.series\")"
                                       ".length === 2", timeout=30000)
                names = page.eval_on_selector_all(".chart[data-key='loss'] polyline.series",
                                                  "lines => lines.map(l => l.dataset.run)")
                assert sorted(names) == ["finished", "live"]
                shot = tmp_path / "board.png"
                page.screenshot(path=str(shot), full_page=True)
                page.locator(".chart[data-key='loss']").screenshot(path=str(tmp_path / "loss_chart.png"))
                # the chart is drawn: pixels of both runs' colours (the page's first two colours)
                chart = np.asarray(Image.open(tmp_path / "loss_chart.png").convert("RGB"), dtype=int)
                colours = {colour: int((np.abs(chart - colour).sum(axis=-1) < 60).sum())
                           for colour in ((9, 105, 218), (207, 34, 46))}
                assert all(n > 50 for n in colours.values()), colours
                assert Image.open(shot).convert("L").getextrema()[0] < 100  # not a blank page
                # killed without a word: the page says crashed
                trainer.send_signal(signal.SIGKILL)
                trainer.wait()
                page.wait_for_selector("#runs tr:has(.run-name:text-is('live')) .state.crashed", timeout=30000)
                # a finished run: its answers before training next to the last evaluation's, any step selectable
                page.click("#runs tr:has(.run-name:text-is('finished')) .run-name")
                page.wait_for_selector("#answers th:text-is('after step 6')", timeout=30000)
                assert page.inner_text("#answers thead").strip().split("\t") == ["question", "before training",
                                                                         "after step 6"]
                page.select_option("#answers-step", "3")
                page.wait_for_selector("#answers th:text-is('after step 3')", timeout=30000)
                answers = json.loads((runs_root / "finished" / "eval_outputs_iter_3.json").read_text())["answers"]
                assert page.inner_text("#answers td.now") == answers[0]["answer"]
                if os.environ.get("TUNELAB_BOARD_SCREENSHOT"):  # to look at it: TUNELAB_BOARD_SCREENSHOT=out.png
                    page.screenshot(path=os.environ["TUNELAB_BOARD_SCREENSHOT"], full_page=True)
            finally:
                browser.close()
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
