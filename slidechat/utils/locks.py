"""Per-item lock files, so several workers (processes, or machines on a shared filesystem) split one work list.

A worker claims item ``key`` by creating ``<folder>/<key>.lock`` with ``O_CREAT | O_EXCL`` (atomic on local
filesystems and NFSv3+). The file holds one JSON object ``{"pid", "host", "token", "created", "stale_after_s"}``.
While the holder works, a heartbeat thread refreshes the file's mtime every ``stale_after_s / 4`` seconds; the
holder deletes the file when the item is done. A lock is *stale*, and the next worker takes it over, when

- its holder ran on this host and that process is gone (a killed worker: taken over at once), or
- its mtime is older than ``stale_after_s`` (a worker on another machine that stopped heart-beating).

Stale locks are removed under a short-lived ``<key>.lock.break`` guard (itself created with ``O_EXCL``), so two
workers never both take over one stale lock. A claim is not a record of work done: after taking a lock the
worker re-checks its output log, because another worker may have finished the item and released it just before.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

LOCK_SUFFIX = ".lock"
BREAK_SUFFIX = ".lock.break"
DEFAULT_STALE_AFTER_S = 120.0
BREAK_GUARD_STALE_S = 30.0


def safe_file_name(key: str) -> str:
    """A file-name-safe version of ``key`` (with a short hash when characters had to be replaced)."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "item"
    return clean if clean == key else f"{clean}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: gone for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder (empty fields when the file was unreadable)."""

    pid: int | None
    host: str
    token: str
    created: str
    age_s: float  # seconds since the last heartbeat (file mtime)


def read_lock(path: str | os.PathLike) -> LockInfo | None:
    """The holder of a lock file, or None when there is no such file."""
    path = Path(path)
    try:
        age = time.time() - path.stat().st_mtime
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        return LockInfo(int(data["pid"]), str(data["host"]), str(data["token"]), str(data.get("created", "")), age)
    except (ValueError, KeyError, TypeError):  # created but not yet written, or written by a killed worker
        return LockInfo(None, "", "", "", age)


class ItemLock:
    """A held lock: refreshed by a heartbeat thread until ``release()`` (also a context manager)."""

    def __init__(self, path: Path, token: str, heartbeat_s: float) -> None:
        self.path = path
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"lock-heartbeat-{path.stem}")
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours."""
        if self._stop.is_set():
            return
        self._stop.set()
        info = read_lock(self.path)
        if info is not None and info.token == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "ItemLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class LockFolder:
    """Lock files for the items of one output folder (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        if stale_after_s <= 0:
            raise ValueError("stale_after_s must be > 0")
        self.folder = Path(folder)
        self.stale_after_s = float(stale_after_s)
        self.host = socket.gethostname()

    def path_for(self, key: str) -> Path:
        return self.folder / f"{safe_file_name(key)}{LOCK_SUFFIX}"

    def is_stale(self, info: LockInfo) -> bool:
        if info.pid is not None and info.host == self.host and not process_alive(info.pid):
            return True
        return info.age_s > self.stale_after_s

    def _create(self, path: Path) -> str | None:
        """Create the lock file exclusively; its token, or None when it exists."""
        token = uuid.uuid4().hex
        body = json.dumps({"pid": os.getpid(), "host": self.host, "token": token,
                           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "stale_after_s": self.stale_after_s}).encode() + b"\n"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                return None
            except FileNotFoundError:  # the folder was removed by a worker that finished
                path.parent.mkdir(parents=True, exist_ok=True)
        else:
            return None
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        return token

    def _break_stale(self, path: Path, seen: LockInfo) -> None:
        """Remove ``path`` if it is still the stale lock ``seen``, under the break guard."""
        guard = path.with_name(path.name[: -len(LOCK_SUFFIX)] + BREAK_SUFFIX)
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > BREAK_GUARD_STALE_S:
                guard.unlink()  # left by a worker killed while breaking a lock
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return
        try:
            now = read_lock(path)
            if now is not None and now.token == seen.token and now.pid == seen.pid and self.is_stale(now):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        finally:
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()

    def try_acquire(self, key: str) -> ItemLock | None:
        """Claim ``key``; None when a live worker holds it."""
        path = self.path_for(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            token = self._create(path)
            if token is not None:
                return ItemLock(path, token, heartbeat_s=self.stale_after_s / 4)
            info = read_lock(path)
            if info is None:
                continue  # released in the meantime
            if not self.is_stale(info):
                return None
            self._break_stale(path, info)
        return None

    def holder(self, key: str) -> LockInfo | None:
        """Who holds ``key`` now (None when nobody, or only a stale lock)."""
        info = read_lock(self.path_for(key))
        return None if info is None or self.is_stale(info) else info

    def remove_folder_if_empty(self) -> None:
        with contextlib.suppress(OSError):
            self.folder.rmdir()
