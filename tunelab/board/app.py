"""`tunelab board`: a local web page of training runs, live.

A FastAPI app (the `web` extra, like `tunelab web`) with one static page at `/` and three JSON endpoints the page
polls every few seconds:

  GET /api/runs                  every run found under the given folders (searched again at each call, so a run
                                 started after the board shows up): name, state, settings, step, last loss
  GET /api/runs/{id}/log         its curves (train_log.jsonl)
  GET /api/runs/{id}/answers     its evaluation answers by step

Everything is read from the work dirs (tunelab/board/runs.py); the board writes nothing. It binds 127.0.0.1
unless told otherwise: work dirs hold paths and settings the user may not want to publish.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from tunelab.board import DEFAULT_PORT
from tunelab.board.runs import find_runs, run_answers, run_id, run_log, run_summary

PAGE = Path(__file__).parent / "static" / "board.html"


def create_board_app(paths: list[Path]) -> FastAPI:
    app = FastAPI(title="tunelab board")
    page = PAGE.read_text(encoding="utf-8")
    roots = [Path(p) for p in paths]

    def lookup(rid: str) -> Path:
        for work_dir in find_runs(roots):
            if run_id(work_dir) == rid:
                return work_dir
        raise HTTPException(404, f"no run {rid!r} under {', '.join(map(str, roots))}")

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    @app.get("/api/runs")
    def runs():
        return {"roots": [str(r.resolve()) for r in roots], "runs": [run_summary(w) for w in find_runs(roots)]}

    @app.get("/api/runs/{rid}/log")
    def log(rid: str):
        return run_log(lookup(rid))

    @app.get("/api/runs/{rid}/answers")
    def answers(rid: str):
        return run_answers(lookup(rid))

    return app


def serve_board(paths: list[Path], *, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    import uvicorn

    from tunelab.chat.http_server import listen_sockets

    sockets = listen_sockets(host, port)  # a port in use is one line, before anything is read
    found = find_runs(paths)
    print(f"{len(found)} run(s) under {', '.join(map(str, paths))}; runs started later show up too", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine sees these runs", flush=True)
    print(f"tunelab board on http://{host}:{port}  (Ctrl-C to stop)", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(create_board_app(paths), host=host, port=port, log_level="warning")).run(
            sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()
