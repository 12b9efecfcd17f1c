"""WORK_DIR/run.json: is this run going, finished, stopped, interrupted or crashed? (read by `tunelab board`).

Written by the main process only, atomically (a temp file renamed over it): "running" with the pid, host and start
time when training starts, then "finished", "stopped" (SIGINT / SIGTERM: saved, resumable), "interrupted" (a second
SIGINT / SIGTERM: stopped at once without saving; resumable from the newest checkpoint, losing the steps after it) or
"failed" (an exception, named in "error") when it ends. A process killed outright (SIGKILL, the kernel's OOM killer,
a lost machine) writes nothing more: a "running" record whose pid is gone from this host reads back as "crashed".
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

STATUS_FILE = "run.json"


def _write(work_dir: Path, record: dict) -> None:
    path = Path(work_dir) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def mark_running(work_dir: Path, *, total_steps: int, start_step: int, settings: dict) -> None:
    _write(work_dir, {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.time(), "ended": None, "start_step": start_step,
                      "total_steps": total_steps, "error": None, "settings": settings})


def mark_ended(work_dir: Path, state: str, *, error: str | None = None) -> None:
    record = read_status(work_dir, resolve=False) or {}
    record.update(state=state, ended=time.time(), error=error)
    _write(work_dir, record)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    try:  # a zombie (exited, its parent has not reaped it yet) still answers kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_status(work_dir: Path, *, resolve: bool = True) -> dict | None:
    """run.json's record (None if there is none or it cannot be read); with `resolve`, a "running" record whose
    process is gone from this host becomes "crashed" (on another host it stays "running": we cannot tell)."""
    path = Path(work_dir) / STATUS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if resolve and record.get("state") == "running" and record.get("host") == socket.gethostname() \
            and isinstance(record.get("pid"), int) and not _pid_alive(record["pid"]):
        record["state"] = "crashed"
    return record
