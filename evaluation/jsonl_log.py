"""Crash-safe append-only JSONL logs: the resume store of `eval run` and `slidechat report`.

Every record is one line written with a single ``write`` + ``fsync`` (``slidechat.utils.io.append_jsonl``).
A process killed mid-write can leave a torn last line without a newline; ``repair_torn_tail``
cuts it off before the next append, so a new record is never glued onto a broken one, and
``read_jsonl`` ignores a torn line while reading.
"""

from __future__ import annotations

import os
from pathlib import Path

from slidechat.utils.io import append_jsonl, read_jsonl


def repair_torn_tail(path: str | Path) -> int:
    """Truncate ``path`` after its last newline; returns the number of bytes removed (0 if none)."""
    path = Path(path)
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as fh:
        block = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        if keep == size:
            return 0
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep


class JsonlLog:
    """An append-only JSONL file of records keyed by ``key(record)``; safe to reopen after a crash."""

    def __init__(self, path: str | Path, key=lambda r: r.get("id")) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.key = key
        repair_torn_tail(self.path)
        self.records: list[dict] = read_jsonl(self.path)
        self.done = {self.key(r) for r in self.records}

    def __contains__(self, key) -> bool:
        return key in self.done

    def append(self, record: dict) -> None:
        append_jsonl(self.path, record)
        self.records.append(record)
        self.done.add(self.key(record))

    def latest(self) -> dict:
        """{key: last record with that key} (a retried item keeps its newest record)."""
        return {self.key(r): r for r in self.records}
