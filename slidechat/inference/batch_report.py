"""Batch report generation over many slides (`slidechat report`): reports.jsonl + index.html.

One record per slide (``id, case_id, slide_path, slide_sha256, model, prompt, report_text, fields,
heatmap_path, thumbnail_path, timing, status, error, shard, worker, created``), appended with fsync as soon as the
slide is done. Safe to kill at any moment: a rerun skips every id already recorded (ok *or* error; use
``retry_errors`` to redo failures), cuts off a torn last line, and never duplicates a record. A slide that
cannot be read or encoded becomes a ``status: "error"`` record and the batch goes on.

Cases (``cases=`` a cases CSV, ``slidechat report --cases``): one record per case, the report written over all its
slides in one conversation; ``slides`` lists each slide's path, label, sha256, thumbnail and heatmap. A slide that
cannot be read makes its case an error record naming the slide; the other cases go on.

Many workers, one folder: any number of processes (N shells, a Slurm array, several machines on a shared
filesystem) may run the same command on the same ``--out``. Each claims a slide with a lock file in
``<out>/.locks/`` (``slidechat.utils.locks``) before working on it and appends its record to the shared
``reports.jsonl`` (``slidechat.utils.io.append_jsonl``), so every slide is reported exactly once; a killed
worker's lock expires and its slide is taken by the next worker. ``num_shards``/``shard_id`` (or the
``WORLD_SIZE``/``RANK`` that ``accelerate launch`` and ``torchrun`` set) give each process every n-th slide
first. Whichever worker records the last slide puts ``reports.jsonl`` in input order (one record per slide)
and writes ``index.html``. While the model writes the report for slide i, a background thread already reads
and encodes slide i+1 (tiling + patch encoder + thumbnail), so extraction overlaps with generation.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from slidechat.errors import ConfigError, DataError, SlideChatError
from slidechat.slide.config import check_option
from slidechat.utils.io import (BadLines, JsonlLog, compact_jsonl, read_csv_rows, read_jsonl,
                                remove_stale_temp_files, sha256_file)
from slidechat.utils.locks import DEFAULT_STALE_AFTER_S, ItemLock, LockFolder, safe_file_name

log = logging.getLogger(__name__)

REPORTS_JSONL = "reports.jsonl"
INDEX_HTML = "index.html"
THUMB_DIR = "thumbnails"
HEATMAP_DIR = "heatmaps"
LOCK_DIR = ".locks"
PROMPT_COLUMNS = ("prompt", "clinical_prompt", "clinical_info", "clinical")


@dataclass
class SlideJob:
    """One slide to report on, or a case (``case_slides``: all its slides, ``slide_path`` the first)."""

    id: str
    slide_path: Path
    case_id: str | None = None
    prompt: str | None = None
    case_slides: list[Path] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)


@dataclass
class BatchReportConfig:
    inputs: list[str]
    out_dir: str
    checkpoint: str = "demo"
    device: str | None = None
    prompt: str | None = None  # clinical context for every slide (a CSV ``prompt`` column overrides it)
    num_shards: int | None = None  # None: WORLD_SIZE from the environment, else 1
    shard_id: int | None = None  # None: RANK from the environment, else 0
    cache_dir: str | None = None
    heatmaps: bool = True
    thumbnail_size: int = 512
    max_new_tokens: int = 64  # per targeted report question
    summary_max_new_tokens: int = 160  # for the free-text summary
    retry_errors: bool = False
    prefetch: bool = True
    thread_reader: bool | None = None  # read tiles with threads; None: only in the prefetch thread (see below)
    progress: bool = True
    mpp: float | None = None
    skip_bad_lines: bool = False  # skip (and count) malformed rows of input CSVs instead of stopping
    lock_stale_s: float = DEFAULT_STALE_AFTER_S  # a claim not refreshed for this long is taken over
    on_record: Callable[[dict], None] | None = field(default=None, repr=False)  # called after each append
    schema: str | None = None  # report template name or file (None: the SynthSlide template)
    cases: str | None = None  # a cases CSV: one report per case instead of per slide

    def __post_init__(self) -> None:
        checks = (("--max-new-tokens", self.max_new_tokens, 1, 4096),
                  ("--summary-max-new-tokens", self.summary_max_new_tokens, 1, 4096),
                  ("--thumbnail-size", self.thumbnail_size, 16, 8192))
        for name, value, lo, hi in checks:
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ConfigError(f"{name} must be an integer in [{lo}, {hi}]; got {value!r}")
        if self.mpp is not None:
            self.mpp = check_option("mpp", self.mpp)
        if not (isinstance(self.lock_stale_s, (int, float)) and 0 < self.lock_stale_s < float("inf")):
            raise ConfigError(f"--lock-stale-after must be a finite number of seconds > 0; got {self.lock_stale_s!r}")
        from slidechat.inference.report_schema import load_report_schema

        self.report_schema = load_report_schema(self.schema)  # a bad template stops here, before any slide


# ----------------------------------------------------------------------------------------------- inputs
def _jobs_from_csv(path: Path, bad_lines: BadLines | None) -> list[SlideJob]:
    jobs = []
    for r in read_csv_rows(path, bad_lines, required=("slide_path",)):
        r = {k: (v or "").strip() for k, v in r.items()}
        if not r.get("slide_path"):
            continue
        p = Path(r["slide_path"]).expanduser()
        p = p if p.is_absolute() else path.parent / p
        prompt = next((r[c] for c in PROMPT_COLUMNS if r.get(c)), None)
        jobs.append(SlideJob(id="", slide_path=p, case_id=r.get("case_id") or None, prompt=prompt))
    return jobs


def collect_jobs(inputs: list[str], prompt: str | None = None, bad_lines: BadLines | None = None) -> list[SlideJob]:
    """Files, folders, globs and CSVs (``slide_path`` + optional ``case_id``, ``prompt``) -> jobs with unique ids.

    The id is the ``case_id`` when given, else the file name without extension; repeated ids get a
    short hash of the path appended.
    """
    from slidechat.features.extract import expand_slide_inputs, slide_id_of

    jobs: list[SlideJob] = []
    plain: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() == ".csv" and p.is_file():
            if plain:
                jobs += [SlideJob(id="", slide_path=q) for q in expand_slide_inputs(plain)]
                plain = []
            jobs += _jobs_from_csv(p, bad_lines)
        else:
            plain.append(item)
    if plain:
        jobs += [SlideJob(id="", slide_path=q) for q in expand_slide_inputs(plain)]
    if not jobs:
        raise DataError(f"no slides found in {', '.join(inputs)}")
    counts: dict[str, int] = {}
    for job in jobs:
        job.id = job.case_id or slide_id_of(job.slide_path)
        job.prompt = job.prompt or prompt
        counts[job.id] = counts.get(job.id, 0) + 1
    seen: set[str] = set()
    for job in jobs:
        if counts[job.id] > 1:
            job.id = f"{job.id}-{hashlib.sha1(str(job.slide_path).encode()).hexdigest()[:8]}"
        if job.id in seen:
            raise DataError(f"slide {job.slide_path} is listed twice under the id {job.id!r}")
        seen.add(job.id)
    return jobs


def collect_case_jobs(path: str | Path, prompt: str | None = None, bad_lines: BadLines | None = None) -> list[SlideJob]:
    """One job per case of a cases CSV (``slidechat.inference.case.read_cases_csv``)."""
    from slidechat.inference.case import read_cases_csv

    jobs = [SlideJob(id=c.case_id, slide_path=c.slides[0], case_id=c.case_id, prompt=prompt,
                     case_slides=list(c.slides), labels=list(c.labels)) for c in read_cases_csv(path, bad_lines)]
    return jobs


def resolve_shard(num_shards: int | None, shard_id: int | None) -> tuple[int, int]:
    """(num_shards, shard_id) from the arguments, else from WORLD_SIZE/RANK (accelerate, torchrun), else (1, 0)."""
    try:
        n = num_shards if num_shards is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
        k = shard_id if shard_id is not None else int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE / RANK must be integers ({exc})") from exc
    if n < 1 or not 0 <= k < n:
        raise ConfigError(f"--shard-id must be in [0, {n}) with --num-shards {n} (>= 1); got {k}")
    return n, k


def shard_jobs(jobs: list[SlideJob], num_shards: int, shard_id: int) -> list[SlideJob]:
    """Every ``num_shards``-th job starting at ``shard_id`` (a deterministic split of a fixed list)."""
    return jobs[shard_id::num_shards]


def safe_name(job_id: str) -> str:
    """A file-name-safe version of an id (with a short hash when characters had to be replaced)."""
    return safe_file_name(job_id)


# ----------------------------------------------------------------------------------------------- work
def _device_for_process(device: str | None) -> str | None:
    if device is not None:
        return device
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(local_rank) % torch.cuda.device_count()}"
    return None


def _extract_with_threads(assistant, path: Path, cfg: BatchReportConfig) -> str | None:
    """Fill ``encode_slide``'s feature cache for ``path`` reading tiles with threads, not DataLoader processes.

    Forking DataLoader workers from the prefetch thread while the main thread runs the LLM can kill the
    workers (fork + a busy OpenMP pool); thread readers avoid the fork. ``encode_slide`` then finds the
    cached file (if the cache layout ever differs it simply extracts again, which is still correct).
    """
    from slidechat.inference import encode as inference_encode

    if path.suffix.lower() in inference_encode.FEATURE_SUFFIXES or assistant.config.patch_encoder is None:
        return None
    if not path.is_file():
        return None  # encode_slide raises the proper error
    from slidechat.features.extract import extract_slide
    from slidechat.slide.config import ExtractionConfig

    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else inference_encode.default_feature_cache()
    sha = sha256_file(path)
    h5 = cache / inference_encode.encoder_cache_key(assistant) / f"{sha}.h5"
    if h5.is_file():
        return sha
    ref = assistant.config.patch_encoder
    config = ExtractionConfig(target_mpp=ref.target_mpp, patch_size=ref.patch_size, mpp=cfg.mpp, num_workers=2,
                              reader_mode="threads")
    extract_slide(path, inference_encode.load_patch_encoder(assistant), h5, config, sha256=sha)
    return sha


def _encode_and_thumbnail(assistant, path: Path, job_id: str, cfg: BatchReportConfig, out: Path,
                          in_thread: bool) -> dict:
    sha = None
    if in_thread if cfg.thread_reader is None else cfg.thread_reader:
        sha = _extract_with_threads(assistant, path, cfg)
    prep = {"enc": assistant.encode_slide(path, mpp=cfg.mpp, cache_dir=cfg.cache_dir, sha256=sha),
            "thumb": None, "size0": None}
    try:
        from slidechat.utils.figures import save_image_atomic, slide_thumbnail

        thumb, size0 = slide_thumbnail(path, cfg.thumbnail_size)
        rel = Path(THUMB_DIR) / f"{safe_name(job_id)}.jpg"
        save_image_atomic(thumb, out / rel, quality=85)
        prep.update(thumb=thumb, size0=size0, thumbnail_path=str(rel))
    except Exception as exc:  # features given directly, or an odd file: no thumbnail, still a report
        log.debug("no thumbnail for %s: %s", job_id, exc)
    return prep


def _prepare(assistant, job: SlideJob, cfg: BatchReportConfig, out: Path, in_thread: bool = False) -> dict:
    """Encode a slide (every slide of a case) and draw its thumbnail (in the prefetch thread when ``in_thread``)."""
    t0 = time.perf_counter()
    if not job.case_slides:
        prep = _encode_and_thumbnail(assistant, job.slide_path, job.id, cfg, out, in_thread)
        prep["encode_s"] = time.perf_counter() - t0
        return prep
    from slidechat.inference.case import Case

    slides = []
    for i, path in enumerate(job.case_slides):
        try:
            slides.append(_encode_and_thumbnail(assistant, path, f"{job.id}-{i + 1}", cfg, out, in_thread))
        except SlideChatError as exc:
            raise type(exc)(f"slide {i + 1} of case {job.id} ({path}): {exc}") from exc
    case = Case(job.id, [p["enc"] for p in slides], job.labels)
    return {"enc": case, "slides": slides, "encode_s": time.perf_counter() - t0,
            "thumb": slides[0]["thumb"], "size0": slides[0]["size0"], "thumbnail_path": slides[0].get("thumbnail_path")}


def _ood(enc) -> dict | None:
    """The slide's out-of-distribution check for the record (None when the checkpoint has no statistics)."""
    ood = getattr(enc, "ood", None)
    return None if ood is None else ood.to_dict()


def _heatmap_files(assistant, job: SlideJob, prep: dict, out: Path) -> list[str | None]:
    """Heatmap overlay paths, one per slide (a case: each slide's share of one conversation)."""
    from slidechat.utils.figures import heatmap_overlay, save_image_atomic

    conv = assistant.chat(prep["enc"])
    slides = prep.get("slides") or [prep]
    paths: list[str | None] = []
    for i, sp in enumerate(slides):
        hm = conv.heatmap(slide=i) if len(slides) > 1 else conv.heatmap()
        if sp.get("thumb") is None:
            paths.append(None)
            continue
        name = safe_name(job.id) if len(slides) == 1 else f"{safe_name(job.id)}-{i + 1}"
        rel = Path(HEATMAP_DIR) / f"{name}.png"
        save_image_atomic(heatmap_overlay(sp["thumb"], sp["size0"], hm), out / rel)
        paths.append(str(rel))
    return paths


def _generate(assistant, job: SlideJob, prep: dict, cfg: BatchReportConfig, out: Path) -> dict:
    """Report + heatmap(s) for a prepared slide or case; returns the record fields."""
    enc = prep["enc"]
    t0 = time.perf_counter()
    rep = assistant.report(enc, max_new_tokens=cfg.max_new_tokens, summary_max_new_tokens=cfg.summary_max_new_tokens,
                           schema=cfg.report_schema, context=job.prompt or None)
    report_s = time.perf_counter() - t0
    slides = prep.get("slides")
    encs = [s["enc"] for s in slides] if slides else [enc]
    rec = {"slide_sha256": encs[0].sha256, "schema": cfg.report_schema.name, "report_text": rep.text,
           "report_markdown": rep.to_markdown(),
           "fields": rep.fields, "raw_answers": getattr(rep, "raw_answers", {}),
           "num_patches": sum(e.num_patches for e in encs),
           "thumbnail_path": prep.get("thumbnail_path"), "heatmap_path": None, "ood": _ood(encs[0])}
    if slides:
        rec["slides"] = [{"slide_path": str(p), "label": lab, "slide_sha256": s["enc"].sha256,
                          "num_patches": s["enc"].num_patches, "thumbnail_path": s.get("thumbnail_path"),
                          "heatmap_path": None, "ood": _ood(s["enc"])}
                         for p, lab, s in zip(job.case_slides, job.labels, slides)]
        rec["ood"] = None
    heat_s = 0.0
    if cfg.heatmaps:
        t1 = time.perf_counter()
        try:
            paths = _heatmap_files(assistant, job, prep, out)
            rec["heatmap_path"] = paths[0]
            for entry, path in zip(rec.get("slides", []), paths):
                entry["heatmap_path"] = path
        except Exception as exc:
            log.warning("heatmap for %s failed: %s", job.id, exc)
            rec["heatmap_error"] = f"{type(exc).__name__}: {exc}"
        heat_s = time.perf_counter() - t1
    rec["timing"] = {"encode_s": round(prep["encode_s"], 3), "report_s": round(report_s, 3),
                     "heatmap_s": round(heat_s, 3)}
    return rec


def _error_fields(job: SlideJob, exc: BaseException) -> dict:
    sha = None
    try:
        if job.slide_path.is_file():
            sha = sha256_file(job.slide_path)
    except OSError:
        pass
    kind = "user" if isinstance(exc, SlideChatError) else "internal"
    return {"slide_sha256": sha, "error": f"{type(exc).__name__}: {exc}".strip(), "error_kind": kind,
            "report_text": None, "fields": None, "heatmap_path": None, "thumbnail_path": None}


# ----------------------------------------------------------------------------------------------- claims
class _Claims:
    """Hands out the next job this worker may do: not recorded yet (or an error, with ``retry_errors``) and
    claimed with a lock file that no live worker holds."""

    def __init__(self, todo: list[SlideJob], log_: JsonlLog, locks: LockFolder, retry_errors: bool,
                 retried: set[str]) -> None:
        self.todo, self.log, self.locks = list(todo), log_, locks
        self.retry_errors, self.retried = retry_errors, retried
        self.pos = 0

    def _needed(self, job: SlideJob) -> bool:
        rec = self.log.latest().get(job.id)
        if rec is None:
            return True
        return self.retry_errors and rec.get("status") != "ok" and job.id not in self.retried

    def next(self) -> tuple[SlideJob, ItemLock] | None:
        while self.pos < len(self.todo):
            job = self.todo[self.pos]
            self.pos += 1
            lock = self.locks.try_acquire(job.id)
            if lock is None:
                continue  # another worker has it
            self.log.refresh()  # it may have been finished (and released) just before we took the lock
            if self._needed(job):
                self.retried.add(job.id)
                return job, lock
            lock.release()
        return None


def _start_prepare(pool, assistant, claim, cfg: BatchReportConfig, out: Path) -> cf.Future | None:
    """Encode the claimed slide (in the prefetch thread when there is one); None when nothing is claimed."""
    if claim is None:
        return None
    job = claim[0]
    if pool is not None:
        return pool.submit(_prepare, assistant, job, cfg, out, True)
    fut: cf.Future = cf.Future()
    try:
        fut.set_result(_prepare(assistant, job, cfg, out))
    except BaseException as exc:  # noqa: BLE001 - handed to the caller like a pool future
        fut.set_exception(exc)
    return fut


def _report_one(assistant, job: SlideJob, fut: cf.Future, cfg: BatchReportConfig, out: Path, shard: str) -> dict:
    """The record for one claimed slide (an error record when it cannot be read or reported)."""
    t0 = time.perf_counter()
    record = {"id": job.id, "case_id": job.case_id, "slide_path": str(job.slide_path), "model": str(cfg.checkpoint),
              "prompt": job.prompt}
    if job.case_slides:
        record["slides"] = [{"slide_path": str(p), "label": lab} for p, lab in zip(job.case_slides, job.labels)]
    try:
        prep = fut.result()
        wait_s = time.perf_counter() - t0
        record.update(_generate(assistant, job, prep, cfg, out), status="ok", error=None)
        record["timing"]["prefetch_wait_s"] = round(wait_s, 3)
    except Exception as exc:
        log.warning("%s: %s", job.slide_path, exc)
        record.update(_error_fields(job, exc), status="error")
        record["timing"] = {}
    record["timing"]["total_s"] = round(time.perf_counter() - t0, 3)
    record["shard"] = shard
    record["worker"] = f"{socket.gethostname()}:{os.getpid()}"  # several workers may share --out
    record["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return record


def _work(assistant, claims: _Claims, cfg: BatchReportConfig, out: Path, shard: str, counts: dict) -> None:
    """Claim, encode (the next slide in the prefetch thread), report and record slides until none is left."""
    from tqdm.auto import tqdm

    pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if cfg.prefetch else None
    bar = tqdm(total=len(claims.todo), unit="slide", desc="report" if shard == "0/1" else f"report {shard}",
               disable=not cfg.progress)
    held: list[ItemLock] = []
    try:
        current = claims.next()
        fut = _start_prepare(pool, assistant, current, cfg, out)
        while current is not None:
            job, lock = current
            held.append(lock)
            upcoming = claims.next() if pool is not None else None  # queued behind this slide in the pool
            if upcoming is not None:
                held.append(upcoming[1])
            upcoming_fut = _start_prepare(pool, assistant, upcoming, cfg, out)
            record = _report_one(assistant, job, fut, cfg, out, shard)
            claims.log.append(record)  # recorded before the claim is released: no other worker redoes it
            lock.release()
            held.remove(lock)
            counts[record["status"]] += 1
            bar.update(1)
            bar.set_postfix(ok=counts["ok"], error=counts["error"])
            if cfg.on_record is not None:
                cfg.on_record(record)
            if pool is not None:
                current, fut = upcoming, upcoming_fut
                if upcoming is not None:
                    held.remove(upcoming[1])
            else:
                current = claims.next()
                fut = _start_prepare(None, assistant, current, cfg, out)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for lock in held:
            lock.release()


def _finish(out: Path, all_jobs: list[SlideJob], log_: JsonlLog, locks: LockFolder, model: str) -> dict:
    """Put reports.jsonl in input order and write index.html once every slide has a record."""
    from slidechat.inference.report_index import write_index

    log_.refresh()
    latest = log_.latest()
    complete = all(j.id in latest for j in all_jobs)
    if complete:
        order = [j.id for j in all_jobs]
        if [r.get("id") for r in log_.records] != order:
            compact_jsonl(log_.path, key=lambda r: r.get("id"), order=order)
        write_index(out, [latest[j.id] for j in all_jobs], model)
        locks.remove_folder_if_empty()
        remove_stale_temp_files(out)  # from workers killed mid-write
    done = [latest[j.id] for j in all_jobs if j.id in latest]
    return {"records": len(done), "ok_total": sum(r.get("status") == "ok" for r in done),
            "error_total": sum(r.get("status") != "ok" for r in done), "merged": complete,
            "reports": str(log_.path), "index": str(out / INDEX_HTML) if complete else None}


def run_batch(cfg: BatchReportConfig) -> dict:
    """Generate (or resume, or join other workers on) the reports of this process's shard; counts and paths."""
    import slidechat

    bad_lines = BadLines(skip=cfg.skip_bad_lines)
    # before --out exists: a bad input leaves nothing
    all_jobs = (collect_case_jobs(cfg.cases, cfg.prompt, bad_lines) if cfg.cases
                else collect_jobs(cfg.inputs, cfg.prompt, bad_lines))
    num_shards, shard_id = resolve_shard(cfg.num_shards, cfg.shard_id)
    jobs = shard_jobs(all_jobs, num_shards, shard_id)
    out = Path(cfg.out_dir)
    reports = out / REPORTS_JSONL
    existing = {r.get("id"): r for r in read_jsonl(reports)}
    todo = [j for j in jobs if j.id not in existing or (cfg.retry_errors and existing[j.id].get("status") != "ok")]
    counts = {"total": len(all_jobs), "shard": len(jobs), "skipped": len(jobs) - len(todo), "ok": 0, "error": 0,
              "bad_lines": bad_lines.count, "bad_lines_summary": bad_lines.summary()}
    log.info("%d slide(s) in shard %d/%d: %d done before, %d to do", len(jobs), shard_id, num_shards,
             counts["skipped"], len(todo))
    assistant = slidechat.load(cfg.checkpoint, device=_device_for_process(cfg.device)) if todo else None
    out.mkdir(parents=True, exist_ok=True)
    plog = JsonlLog(reports)
    locks = LockFolder(out / LOCK_DIR, stale_after_s=cfg.lock_stale_s)
    if todo:
        claims = _Claims(todo, plog, locks, cfg.retry_errors, retried=set())
        _work(assistant, claims, cfg, out, f"{shard_id}/{num_shards}", counts)
    counts["skipped"] = len(jobs) - counts["ok"] - counts["error"]
    counts.update(_finish(out, all_jobs, plog, locks, str(cfg.checkpoint)))
    return counts
