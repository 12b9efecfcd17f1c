"""`tunelab serve` under concurrent clients: requests/s and latency, one request at a time against continuous batching.

    python benchmarks/bench_serve.py --shape tiny --dtype fp32 --threads 1     # tries it out on a CPU
    python benchmarks/bench_serve.py --shape qwen2_5_1_5b --max-tokens 128     # on a GPU

Each mode is the user's command in its own process, `tunelab serve MODEL --max-batch-size N` on 127.0.0.1: N = 1
answers requests one after the other (tunelab's server before continuous batching), N = --batch (default 32) decodes
them together. For each number of clients (1, 8, 32), every client sends --rounds streamed requests one after another;
each request has its own prompt of about --prompt-tokens tokens and generates exactly --max-tokens tokens
(`ignore_eos`), so both modes do the same work. Each server first answers one untimed request, and the batched one an
untimed wave as wide and as long as the widest timed one (its first batches of each size). Reported per mode and
client count: requests/s and generated tokens/s over the whole wave, p50 / p95 of the request latency (send → last
token) and of the time to the first token. With --structured each wave runs twice on the same server, the second with
every request held to a JSON schema (`response_format`, xgrammar masking the logits of the real shape's whole
vocabulary each step); such a reply ends where its JSON does, so compare tokens/s. The model is a random-initialised
model of a real shape (bench_scaling.py's shapes and writer, the tests' tokenizer; output rows of ids past that
tokenizer zeroed, so what it generates can be streamed), or --model DIR. Rows go to --out as JSON too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

WORDS = ("the quick brown fox jumps over the lazy dog give three tips for staying healthy what is the capital of "
         "china translate the following sentence into french hello who are you please introduce yourself").split()


def prompt(i: int, words: int) -> str:
    """A different prompt for every request (so nothing could be shared between them), about `words` words long."""
    return f"Request {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


def keep_to_tokenizer(model_dir: Path) -> None:
    """Zero the output rows of token ids the small tokenizer does not have: the random model then generates text that
    streams (an id past the tokenizer decodes to nothing), while every matmul keeps the real shape's size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                 device_map="cuda" if torch.cuda.is_available() else None)
    with torch.no_grad():
        model.get_output_embeddings().weight[size:] = 0
    model.save_pretrained(model_dir)


def start_server(model: str, port: int, batch: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunelab", "serve", model, "--port", str(port), "--max-batch-size", str(batch),
           "--prompt-template", "qwen_chat", "--dtype", args.dtype, "--max-tokens-limit", str(args.max_tokens)]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # wheels carried in stay found
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:  # on a small shared CPU, torch's threads fighting over the cores cost more than they bring
        env["OMP_NUM_THREADS"] = str(args.threads)
    server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server did not start:\n{server.stdout.read()}")
            time.sleep(0.5)


SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {
    "type": "string"}}, "score": {"type": "number"}}, "required": ["title", "tags", "score"]}
"""What --structured holds replies to: strings and an array, so a reply can run to max_tokens inside it."""


def one_request(url: str, i: int, args) -> dict:
    """A streamed request: (latency, time to the first token, tokens generated)."""
    import httpx

    body = {"messages": [{"role": "user", "content": prompt(i, args.prompt_tokens)}], "max_tokens": args.max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if args.schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if event.get("usage"):  # the last chunk (stream_options.include_usage)
                tokens = event["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - start, "ttft": first if first is not None else float("nan"),
            "tokens": tokens}


def wave(url: str, clients: int, args, offset: int) -> dict:
    """`clients` threads, each sending --rounds requests back to back."""
    results, errors = [], []

    def client(c: int) -> None:
        for r in range(args.rounds):
            try:
                results.append(one_request(url, offset + c * args.rounds + r, args))
            except Exception as exc:  # noqa: BLE001 (reported in the row, the wave goes on)
                errors.append(str(exc))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latency = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "errors": len(errors), "wall_s": wall,
            "req_per_s": len(results) / wall, "tok_per_s": sum(r["tokens"] for r in results) / wall,
            "p50_s": statistics.median(latency) if latency else float("nan"), "p95_s": pct(latency, 0.95),
            "ttft_p50_s": statistics.median(ttft) if ttft else float("nan"), "ttft_p95_s": pct(ttft, 0.95),
            "first_error": errors[0] if errors else None}


def run_mode(model: str, batch: int, args) -> list[dict]:
    from tunelab.chat.http_server import free_port

    port = free_port()
    server = start_server(model, port, batch, args)
    url = f"http://127.0.0.1:{port}"
    rows = []
    schemas = (False, True) if args.structured else (False,)
    try:
        for schema in schemas:
            warm = argparse.Namespace(**{**vars(args), "schema": schema})
            one_request(url, 10**6, warm)  # warm-up: first-call allocations, kernel choices, the grammar compiled
            if batch > 1:  # and the batched shapes: an untimed wave as wide and as long as the widest timed one (a
                # wave of 8 tokens left the first timed wave of 32 at half the speed of the next, on an H100)
                wave(url, max(args.clients), argparse.Namespace(**{**vars(warm), "rounds": 1}), 2 * 10**6)
        mode = "one at a time" if batch == 1 else f"batched (max {batch})"
        for k, clients in enumerate(args.clients):
            for schema in schemas:
                timed = argparse.Namespace(**{**vars(args), "schema": schema})
                row = {"mode": mode + (", JSON schema" if schema else ""), **wave(url, clients, timed, k * 10**4)}
                print(fmt(row), flush=True)
                rows.append(row)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return rows


HEADER = ("| mode | clients | requests | req/s | tok/s | p50 latency s | p95 latency s | p50 first token s | "
          "p95 first token s | errors |\n|---|---|---|---|---|---|---|---|---|---|")


def fmt(row: dict) -> str:
    return (f"| {row['mode']} | {row['clients']} | {row['requests']} | {row['req_per_s']:.2f} | {row['tok_per_s']:.0f}"
            f" | {row['p50_s']:.2f} | {row['p95_s']:.2f} | {row['ttft_p50_s']:.2f} | {row['ttft_p95_s']:.2f} | "
            f"{row['errors']} |")


def main(argv=None) -> int:
    from bench_scaling import SHAPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="random weights of this shape")
    parser.add_argument("--model", help="serve this model directory instead of a random-weight shape")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--prompt-tokens", type=int, default=100, help="about this many words of prompt")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--batch", type=int, default=32, help="--max-batch-size of the batched mode")
    parser.add_argument("--structured", action="store_true",
                        help="time each wave a second time with every reply held to a JSON schema (needs xgrammar)")
    parser.add_argument("--batched-only", action="store_true", help="leave out the one-at-a-time server")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (CPU runs)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_serve.json"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from bench_scaling import write_model

            model = str(Path(tmp) / args.shape)
            write_model(args.shape, Path(model))
            keep_to_tokenizer(Path(model))
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(f"{model} ({args.model or args.shape}) on {device}; {args.rounds} requests per client, "
              f"~{args.prompt_tokens}-word prompts, {args.max_tokens} tokens each\n{HEADER}", flush=True)
        rows = ([] if args.batched_only else run_mode(model, 1, args)) + run_mode(model, args.batch, args)
    print(f"\n{HEADER}\n" + "\n".join(fmt(r) for r in rows))
    Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
