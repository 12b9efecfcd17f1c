"""Checksums of a checkpoint's files, so resume never reads a damaged one (flipped bytes, a cut-off copy).

`write_manifest` writes WORK_DIR/iter_N/checksums.json, the size and hash of every file but tunelab.json (which a
user may edit), as the last file of a save; `verify_checkpoint` reads every listed file again and compares. The hash
is xxHash's XXH3-128: not a defence against someone who forges files, but it catches any damage, and it runs about as
fast as the file can be read from the page cache (a few GB/s), so a multi-GB full fine-tuning checkpoint costs
seconds, not minutes (docs/TRAINING.md has the measurement).
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.train.layout import MANIFEST_FILE, META_FILE

HASH = "xxh3_128"


def _hash_file(path: Path) -> str:
    import xxhash

    digest, buffer = xxhash.xxh3_128(), bytearray(16 << 20)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """checksums.json: size and hash of every file of the checkpoint but tunelab.json (which a user may edit)."""
    files = {}
    for path in sorted(p for p in Path(checkpoint).rglob("*") if p.is_file()):
        name = path.relative_to(checkpoint).as_posix()
        if name not in (MANIFEST_FILE, META_FILE):
            files[name] = {"size": path.stat().st_size, "hash": _hash_file(path)}
    (Path(checkpoint) / MANIFEST_FILE).write_text(json.dumps({"algorithm": HASH, "files": files}, indent=1))


def verify_checkpoint(checkpoint: Path, *, under: str | None = None) -> str | None:
    """None when every file listed in checksums.json is there with its size and hash, or when the checkpoint has no
    checksums.json (nothing to check it against); otherwise what is wrong, in words. `under` checks only the files
    in that folder of the checkpoint (export and chat read `model/` alone, and may find training_state.pt deleted
    to save room)."""
    manifest_path = Path(checkpoint) / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        files, algorithm = manifest["files"], manifest["algorithm"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} cannot be read"
    if algorithm != HASH:
        return f"{MANIFEST_FILE} uses {algorithm!r}, which this tunelab does not know"
    for name, expected in files.items():
        if under is not None and not name.startswith(under.rstrip("/") + "/"):
            continue
        path = Path(checkpoint) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {MANIFEST_FILE} says {expected['size']}"
        if _hash_file(path) != expected["hash"]:
            return f"{name} does not match its checksum"
    return None
