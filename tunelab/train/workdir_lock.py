"""One run per work dir: an advisory lock on WORK_DIR/tunelab.lock, held while training.

`fcntl.flock` belongs to the open file, so the operating system releases it when the process ends, however it ends
(a `kill -9` included): a killed run never leaves the work dir locked. The file keeps the holder's pid, host and
start time, for the message a second run gets. Under torchrun only rank 0 takes it (the ranks of one run share
the work dir). Where `fcntl` does not exist (Windows) nothing is locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.train.layout import LOCK_FILE

try:
    import fcntl
except ImportError:  # not on this platform: no lock
    fcntl = None


@contextlib.contextmanager
def hold_work_dir(work_dir: Path, *, enabled: bool = True):
    """Hold the work dir's lock for the body; a TunelabError names the holder when another run has it."""
    if not enabled or fcntl is None:
        yield
        return
    work_dir = Path(work_dir)
    path = work_dir / LOCK_FILE
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise TunelabError(f"{work_dir}: cannot write there ({exc.strerror}). Choose a --work-dir you can write to, "
                           f"or fix its permissions.") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TunelabError(f"{work_dir} is in use by another training run ({_holder(path)}). Wait for it to "
                               f"finish or stop it, or train into another --work-dir.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock; the file stays (removing it would race with the next run's open)


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is writing it right now
        return f"see {path}"
