"""File helpers: atomic writes, crash-safe shared JSONL logs, strict record readers, content hashes.

Readers (``read_jsonl``, ``read_csv_rows``, ``read_json_records``, ``read_records``) are strict: a malformed
line, row or record is a ``DataError`` naming the file and its line (or record) number. The one exception is
a *torn last line* of a JSONL file (no trailing newline and not valid JSON: what a killed writer leaves),
which is ignored. Pass ``bad_lines=BadLines(skip=True)`` to skip malformed entries instead; the object
then counts and lists what was skipped so the caller can report it (``--skip-bad-lines`` in the CLI).

Shared logs: ``append_jsonl`` takes an exclusive ``flock`` on the file, cuts off a torn tail and appends one
whole line with fsync, so several processes (or machines on a shared filesystem whose client supports
``flock``, as NFSv4 and Lustre do) can append to one file. ``write_jsonl_atomic`` replaces a log under the
same lock; appenders notice the replaced file and append to the new one.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from slidechat.errors import DataError

log = logging.getLogger(__name__)

SKIP_HINT = "fix or delete that {unit}, or pass --skip-bad-lines to skip malformed {unit}s"
JSON_LIST_KEYS = ("questions", "data", "items", "predictions", "records")


# ------------------------------------------------------------------------------------------ atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temp file is removed, so a reader never sees a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's host and pid in the name let a later run remove what a killed writer left
    prefix = f".{path.name}.{_safe_host(socket.gethostname())}-{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def remove_stale_temp_files(folder: str | os.PathLike, older_than_s: float = 3600.0) -> int:
    """Delete temp files of atomic writes (``.NAME.HOST-PID.XXXXXXXX.SUFFIX``) under ``folder`` whose writer is
    gone: a process of this host that no longer runs, or one of another host older than ``older_than_s``."""
    import time

    from slidechat.utils.locks import process_alive

    host, now, removed = socket.gethostname(), time.time(), 0
    for tmp in Path(folder).rglob(".*"):
        m = re.search(r"\.([A-Za-z0-9_]+)-(\d+)\.[a-z0-9_]{8}\.[A-Za-z0-9]+$", tmp.name)
        if m is None or not tmp.is_file():
            continue
        with contextlib.suppress(OSError):
            mine = m.group(1) == _safe_host(host)
            if (mine and not process_alive(int(m.group(2)))) or (not mine and now - tmp.stat().st_mtime > older_than_s):
                tmp.unlink()
                removed += 1
    return removed


def _safe_host(host: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", host) or "host"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _jsonl_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------------------------------ shared JSONL logs
@contextlib.contextmanager
def locked_log(path: str | os.PathLike) -> Iterator[int]:
    """An fd of ``path`` (created if missing) opened for appending, under an exclusive ``flock``.

    If another process replaced the file (``write_jsonl_atomic``) while we waited, the lock is taken again
    on the new file, so nothing is ever appended to a file that is no longer at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield fd
                return
        finally:
            os.close(fd)  # closing releases the flock


def _repair_tail_fd(fd: int) -> int:
    """Truncate the open file after its last newline; returns the number of bytes removed."""
    size = os.fstat(fd).st_size
    pos, keep = size, 0
    while pos > 0:
        start = max(0, pos - (1 << 16))
        chunk = os.pread(fd, pos - start, start)
        idx = chunk.rfind(b"\n")
        if idx >= 0:
            keep = start + idx + 1
            break
        pos = start
    if keep == size:
        return 0
    os.ftruncate(fd, keep)
    os.fsync(fd)
    return size - keep


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Cut ``path`` after its last newline (under the log lock); returns the number of bytes removed."""
    if not Path(path).exists():
        return 0
    with locked_log(path) as fd:
        return _repair_tail_fd(fd)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line with fsync under the log lock; a torn tail left by a killed writer is cut first."""
    data = _jsonl_line(record).encode("utf-8")
    with locked_log(path) as fd:
        removed = _repair_tail_fd(fd)
        if removed:
            log.warning("%s: removed a torn last line (%d bytes) left by an interrupted write", path, removed)
        os.write(fd, data)
        os.fsync(fd)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Replace ``path`` with ``records`` as JSONL in one atomic step (under the log lock when it exists)."""
    path = Path(path)
    lock = locked_log(path) if path.exists() else contextlib.nullcontext()
    with lock, atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(_jsonl_line(r))


def compact_jsonl(path: str | os.PathLike, key: Callable[[dict], object], order: list | None = None) -> int:
    """Rewrite a shared log with the latest record per key (in ``order`` when given, keys not in it last);
    read and written under the log lock, so no concurrent append is lost. Returns the number of records."""
    path = Path(path)
    if not path.exists():
        return 0
    with locked_log(path):
        latest = {key(r): r for r in read_jsonl(path)}
        rank = {k: i for i, k in enumerate(order or [])}
        keys = sorted(latest, key=lambda k: rank.get(k, len(rank))) if order is not None else list(latest)
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                for k in keys:
                    fh.write(_jsonl_line(latest[k]))
    return len(latest)


# ------------------------------------------------------------------------------------------ strict readers
@dataclass
class BadLine:
    source: str
    line: int  # 1-based line number (JSONL, CSV) or record number (JSON list)
    reason: str


@dataclass
class BadLines:
    """How a reader treats malformed entries: ``skip=False`` raises, ``skip=True`` skips and lists them here."""

    skip: bool = False
    skipped: list[BadLine] = field(default_factory=list)

    def handle(self, source: str, line: int, reason: str, unit: str = "line") -> None:
        """Record a skip (once per source and line, however often the file is read), or raise when skipping is off."""
        if not self.skip:
            raise DataError(f"{source}:{line}: {reason}; {SKIP_HINT.format(unit=unit)}")
        if not any(b.source == source and b.line == line for b in self.skipped):
            self.skipped.append(BadLine(source, line, reason))

    @property
    def count(self) -> int:
        return len(self.skipped)

    def summary(self, limit: int = 5) -> str:
        """'skipped 2 malformed line(s): a.jsonl:5 (not valid JSON), ...' or '' when none."""
        if not self.skipped:
            return ""
        shown = ", ".join(f"{b.source}:{b.line} ({b.reason})" for b in self.skipped[:limit])
        more = f" and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"skipped {len(self.skipped)} malformed line(s): {shown}{more}"


def _strict(bad_lines: BadLines | None) -> BadLines:
    return bad_lines if bad_lines is not None else BadLines(skip=False)


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def parse_jsonl_text(text: str, source: str, bad_lines: BadLines | None = None) -> list[dict]:
    """Records of JSONL ``text``; a torn last line (no newline, not JSON) is ignored, see the module docstring."""
    policy = _strict(bad_lines)
    lines = text.split("\n")
    torn_candidate = len(lines) - 1 if lines and lines[-1].strip() else None  # the text does not end in \n
    records = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if n - 1 == torn_candidate:
                log.warning("%s:%d: ignoring a torn last line (an interrupted write)", source, n)
                continue
            policy.handle(source, n, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            policy.handle(source, n, f"expected a JSON object, got {type(obj).__name__}")
            continue
        records.append(obj)
    return records


def read_jsonl(path: str | os.PathLike, bad_lines: BadLines | None = None) -> list[dict]:
    """Records of a JSONL file ([] when it does not exist); strict, see the module docstring."""
    p = Path(path)
    if not p.exists():
        return []
    return parse_jsonl_text(_read_text(p), str(p), bad_lines)


def read_csv_rows(path: str | os.PathLike, bad_lines: BadLines | None = None, delimiter: str = ",",
                  required: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a CSV/TSV file (BOM and stray header spaces tolerated); a row with more or fewer fields than the
    header is malformed (line numbers count the header as line 1). ``required`` columns must be in the header."""
    policy = _strict(bad_lines)
    p = Path(path)
    text = _read_text(p, encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise DataError(f"{p}:1: malformed CSV header ({exc})") from exc
    names = [h.strip() for h in header or []]
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{p}: CSV needs a {', '.join(repr(c) for c in missing)} column (has {names})")
    if header is None:
        return []
    rows: list[dict] = []
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            policy.handle(str(p), reader.line_num, f"malformed CSV ({exc})", unit="row")
            continue
        if not values or (len(values) == 1 and not values[0].strip()):
            continue
        if len(values) != len(names):
            policy.handle(str(p), reader.line_num, f"{len(values)} field(s), the header has {len(names)}",
                          unit="row")
            continue
        rows.append(dict(zip(names, values)))
    return rows


def _json_records(data, source: str, policy: BadLines, list_keys: tuple[str, ...]) -> list[dict]:
    if isinstance(data, dict):
        data = next((data[k] for k in list_keys if isinstance(data.get(k), list)), None)
        if data is None:
            raise DataError(f"{source}: expected a JSON list of records (or {{'{list_keys[0]}': [...]}})")
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of records, got {type(data).__name__}")
    records = []
    for i, obj in enumerate(data, 1):
        if isinstance(obj, dict):
            records.append(obj)
        else:
            policy.handle(source, i, f"record {i} is a {type(obj).__name__}, not a JSON object", unit="record")
    return records


def read_json_records(path: str | os.PathLike, bad_lines: BadLines | None = None,
                      list_keys: tuple[str, ...] = JSON_LIST_KEYS, jsonl_fallback: bool = False) -> list[dict]:
    """Objects of a JSON list (or of the list under one of ``list_keys``); a non-object entry is malformed.

    With ``jsonl_fallback`` a file of one JSON object per line (JSONL saved as .json) is read as JSONL.
    """
    policy = _strict(bad_lines)
    p = Path(path)
    text = _read_text(p, encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if jsonl_fallback and exc.msg == "Extra data":
            return parse_jsonl_text(text, str(p), policy)
        raise DataError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    return _json_records(data, str(p), policy, list_keys)


def read_records(path: str | os.PathLike, bad_lines: BadLines | None = None) -> list[dict]:
    """Records of a .csv / .tsv / .jsonl / .json file (a .json file holding JSON lines is read as JSONL)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return read_csv_rows(p, bad_lines, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix == ".jsonl":
        return read_jsonl(p, bad_lines)
    if suffix == ".json":
        return read_json_records(p, bad_lines, jsonl_fallback=True)
    raise DataError(f"{p}: unsupported file type {suffix!r}; use .csv, .tsv, .json or .jsonl")


# ------------------------------------------------------------------------------------------ resume logs
class JsonlLog:
    """An append-only JSONL file of records keyed by ``key(record)``; shared by processes, safe after a crash."""

    def __init__(self, path: str | os.PathLike, key: Callable[[dict], object] = lambda r: r.get("id")) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.records: list[dict] = []
        self.refresh()

    def refresh(self) -> None:
        """Re-read the file (other processes may have appended)."""
        self.records = read_jsonl(self.path)
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
