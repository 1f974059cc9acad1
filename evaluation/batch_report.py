"""Batch report generation over many slides (`slidechat report`): reports.jsonl + index.html.

One record per slide (``id, case_id, slide_path, slide_sha256, model, prompt, report_text, fields,
heatmap_path, thumbnail_path, timing, status, error``), appended with fsync as soon as the slide is
done. Safe to kill at any moment: a rerun skips every id already recorded (ok *or* error; use
``retry_errors`` to redo failures), cuts off a torn last line, and never duplicates a record. A slide
that cannot be read or encoded becomes an ``status: "error"`` record and the batch goes on.

Scale-out: ``num_shards``/``shard_id`` (or the ``WORLD_SIZE``/``RANK`` that ``accelerate launch`` and
``torchrun`` set) give each process every n-th slide; each shard appends to its own
``reports.shard-K-of-N.jsonl`` and whichever shard finishes last merges them into ``reports.jsonl``.
While the model writes the report for slide i, a background thread already reads and encodes slide
i+1 (tiling + patch encoder + thumbnail), so extraction overlaps with generation.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import datetime as _dt
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from slidechat.evaluation.jsonl_log import JsonlLog, repair_torn_tail
from slidechat.errors import ConfigError, DataError, SlideChatError
from slidechat.utils.io import read_jsonl, sha256_file

log = logging.getLogger(__name__)

REPORTS_JSONL = "reports.jsonl"
INDEX_HTML = "index.html"
THUMB_DIR = "thumbnails"
HEATMAP_DIR = "heatmaps"
PROMPT_COLUMNS = ("prompt", "clinical_prompt", "clinical_info", "clinical")


@dataclass
class SlideJob:
    """One slide to report on."""

    id: str
    slide_path: Path
    case_id: str | None = None
    prompt: str | None = None


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
    on_record: Callable[[dict], None] | None = field(default=None, repr=False)  # called after each append


# ----------------------------------------------------------------------------------------------- inputs
def _jobs_from_csv(path: Path) -> list[SlideJob]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        names = [n.strip() for n in (reader.fieldnames or [])]
        if "slide_path" not in names:
            raise DataError(f"{path}: CSV needs a 'slide_path' column (has {names})")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    jobs = []
    for r in rows:
        if not r.get("slide_path"):
            continue
        p = Path(r["slide_path"]).expanduser()
        p = p if p.is_absolute() else path.parent / p
        prompt = next((r[c] for c in PROMPT_COLUMNS if r.get(c)), None)
        jobs.append(SlideJob(id="", slide_path=p, case_id=r.get("case_id") or None, prompt=prompt))
    return jobs


def collect_jobs(inputs: list[str], prompt: str | None = None) -> list[SlideJob]:
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
            jobs += _jobs_from_csv(p)
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


def resolve_shard(num_shards: int | None, shard_id: int | None) -> tuple[int, int]:
    """(num_shards, shard_id) from the arguments, else from WORLD_SIZE/RANK (accelerate, torchrun), else (1, 0)."""
    n = num_shards if num_shards is not None else int(os.environ.get("WORLD_SIZE", "1") or 1)
    k = shard_id if shard_id is not None else int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    if n < 1 or not 0 <= k < n:
        raise ConfigError(f"--shard-id must be in [0, {n}) with --num-shards {n}; got {k}")
    return n, k


def shard_jobs(jobs: list[SlideJob], num_shards: int, shard_id: int) -> list[SlideJob]:
    """Every ``num_shards``-th job starting at ``shard_id`` (a deterministic split of a fixed list)."""
    return jobs[shard_id::num_shards]


def safe_name(job_id: str) -> str:
    """A file-name-safe version of an id (with a short hash when characters had to be replaced)."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", job_id).strip("._") or "slide"
    return clean if clean == job_id else f"{clean}-{hashlib.sha1(job_id.encode()).hexdigest()[:6]}"


def shard_log_name(num_shards: int, shard_id: int) -> str:
    return REPORTS_JSONL if num_shards == 1 else f"reports.shard-{shard_id:03d}-of-{num_shards:03d}.jsonl"


def all_records(out_dir: Path) -> dict[str, dict]:
    """{id: latest record} over reports.jsonl and every shard file in ``out_dir``."""
    latest: dict[str, dict] = {}
    for path in [out_dir / REPORTS_JSONL, *sorted(out_dir.glob("reports.shard-*-of-*.jsonl"))]:
        for rec in read_jsonl(path):
            if "id" in rec:
                latest[str(rec["id"])] = rec
    return latest


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


def _extract_with_threads(assistant, path: Path, cfg: BatchReportConfig) -> None:
    """Fill ``encode_slide``'s feature cache for ``path`` reading tiles with threads, not DataLoader processes.

    Forking DataLoader workers from the prefetch thread while the main thread runs the LLM can kill the
    workers (fork + a busy OpenMP pool); thread readers avoid the fork. ``encode_slide`` then finds the
    cached file (if the cache layout ever differs it simply extracts again, which is still correct).
    """
    from slidechat.inference import encode as inference_encode

    if path.suffix.lower() in inference_encode.FEATURE_SUFFIXES or assistant.config.patch_encoder is None:
        return
    if not path.is_file():
        return  # encode_slide raises the proper error
    from slidechat.features.extract import extract_slide

    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else inference_encode.default_feature_cache()
    h5 = cache / inference_encode.encoder_cache_key(assistant) / f"{sha256_file(path)}.h5"
    if h5.is_file():
        return
    ref = assistant.config.patch_encoder
    extract_slide(path, inference_encode.load_patch_encoder(assistant), h5, target_mpp=ref.target_mpp,
                  patch_size=ref.patch_size, mpp=cfg.mpp, num_workers=2, reader_mode="threads")


def _prepare(assistant, job: SlideJob, cfg: BatchReportConfig, out: Path, in_thread: bool = False) -> dict:
    """Encode a slide and draw its thumbnail (runs in the prefetch thread when ``in_thread``)."""
    t0 = time.perf_counter()
    if in_thread if cfg.thread_reader is None else cfg.thread_reader:
        _extract_with_threads(assistant, job.slide_path, cfg)
    enc = assistant.encode_slide(job.slide_path, mpp=cfg.mpp, cache_dir=cfg.cache_dir)
    prep = {"enc": enc, "encode_s": time.perf_counter() - t0, "thumb": None, "size0": None}
    try:
        from slidechat.evaluation.figures import save_image_atomic, slide_thumbnail

        thumb, size0 = slide_thumbnail(job.slide_path, cfg.thumbnail_size)
        rel = Path(THUMB_DIR) / f"{safe_name(job.id)}.jpg"
        save_image_atomic(thumb, out / rel, quality=85)
        prep.update(thumb=thumb, size0=size0, thumbnail_path=str(rel))
    except Exception as exc:  # features given directly, or an odd file: no thumbnail, still a report
        log.debug("no thumbnail for %s: %s", job.id, exc)
    return prep


def _report_questions(prompt: str | None) -> dict[str, str] | None:
    if not prompt:
        return None
    from slidechat import prompts

    questions = dict(prompts.REPORT_QUESTIONS)
    questions["summary"] = f"Clinical information: {prompt.strip()}\n{questions['summary']}"
    return questions


def _generate(assistant, job: SlideJob, prep: dict, cfg: BatchReportConfig, out: Path) -> dict:
    """Report + heatmap for a prepared slide; returns the record fields."""
    enc = prep["enc"]
    t0 = time.perf_counter()
    kwargs = {"max_new_tokens": cfg.max_new_tokens, "summary_max_new_tokens": cfg.summary_max_new_tokens}
    questions = _report_questions(job.prompt)
    if questions:
        kwargs["questions"] = questions
    rep = assistant.report(enc, **kwargs)
    report_s = time.perf_counter() - t0
    rec = {"slide_sha256": enc.sha256, "report_text": rep.text, "report_markdown": rep.to_markdown(),
           "fields": rep.fields, "raw_answers": getattr(rep, "raw_answers", {}), "num_patches": enc.num_patches,
           "thumbnail_path": prep.get("thumbnail_path"), "heatmap_path": None}
    heat_s = 0.0
    if cfg.heatmaps:
        t1 = time.perf_counter()
        try:
            hm = assistant.chat(enc).heatmap()
            if prep.get("thumb") is not None:
                from slidechat.evaluation.figures import heatmap_overlay, save_image_atomic

                rel = Path(HEATMAP_DIR) / f"{safe_name(job.id)}.png"
                save_image_atomic(heatmap_overlay(prep["thumb"], prep["size0"], hm), out / rel)
                rec["heatmap_path"] = str(rel)
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


def merge_shards(out_dir: Path, jobs: list[SlideJob]) -> bool:
    """Write reports.jsonl (job order, one record per id) once every job has a record; True if written."""
    from slidechat.evaluation.output_folder import write_predictions

    latest = all_records(out_dir)
    if any(j.id not in latest for j in jobs):
        return False
    write_predictions(out_dir / REPORTS_JSONL, [latest[j.id] for j in jobs])
    return True


def run_batch(cfg: BatchReportConfig) -> dict:
    """Generate (or resume) reports for this process's shard; returns counts and paths."""
    import slidechat
    from tqdm.auto import tqdm

    from slidechat.evaluation.report_index import write_index

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_shards, shard_id = resolve_shard(cfg.num_shards, cfg.shard_id)
    all_jobs = collect_jobs(cfg.inputs, cfg.prompt)
    jobs = shard_jobs(all_jobs, num_shards, shard_id)
    shard_log = JsonlLog(out / shard_log_name(num_shards, shard_id))
    if num_shards > 1:
        repair_torn_tail(out / REPORTS_JSONL)
    existing = all_records(out)
    todo = [j for j in jobs if j.id not in existing
            or (cfg.retry_errors and existing[j.id].get("status") != "ok")]
    model_name = str(cfg.checkpoint)
    counts = {"total": len(all_jobs), "shard": len(jobs), "skipped": len(jobs) - len(todo), "ok": 0, "error": 0}
    log.info("%d slide(s) in shard %d/%d: %d done before, %d to do", len(jobs), shard_id, num_shards,
             counts["skipped"], len(todo))
    assistant = slidechat.load(cfg.checkpoint, device=_device_for_process(cfg.device)) if todo else None
    pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if cfg.prefetch else None

    def submit(job: SlideJob):
        if pool is not None:
            return pool.submit(_prepare, assistant, job, cfg, out, True)
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(_prepare(assistant, job, cfg, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller like a pool future
            fut.set_exception(exc)
        return fut

    bar = tqdm(total=len(todo), unit="slide", desc=f"report {shard_id + 1}/{num_shards}" if num_shards > 1
               else "report", disable=not cfg.progress)
    try:
        nxt = submit(todo[0]) if (todo and pool is not None) else None
        for i, job in enumerate(todo):
            t0 = time.perf_counter()
            record = {"id": job.id, "case_id": job.case_id, "slide_path": str(job.slide_path), "model": model_name,
                      "prompt": job.prompt}
            fut = nxt if pool is not None else submit(job)
            wait0 = time.perf_counter()
            try:
                prep = fut.result()
                wait_s = time.perf_counter() - wait0
                nxt = submit(todo[i + 1]) if (pool is not None and i + 1 < len(todo)) else None
                record.update(_generate(assistant, job, prep, cfg, out), status="ok", error=None)
                record["timing"]["prefetch_wait_s"] = round(wait_s, 3)
            except Exception as exc:
                if pool is not None and i + 1 < len(todo) and (nxt is None or nxt is fut):
                    nxt = submit(todo[i + 1])
                log.warning("%s: %s", job.slide_path, exc)
                record.update(_error_fields(job, exc), status="error")
                record["timing"] = {}
            record["timing"]["total_s"] = round(time.perf_counter() - t0, 3)
            record["shard"] = f"{shard_id}/{num_shards}"
            record["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            shard_log.append(record)
            counts[record["status"]] += 1
            bar.update(1)
            bar.set_postfix(ok=counts["ok"], error=counts["error"])
            if cfg.on_record is not None:
                cfg.on_record(record)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    merged = True
    if num_shards > 1:
        merged = merge_shards(out, all_jobs)
    elif len(shard_log.records) != len(shard_log.latest()):  # --retry-errors appended newer records
        from slidechat.evaluation.output_folder import write_predictions

        write_predictions(shard_log.path, list(shard_log.latest().values()))
    latest = all_records(out)
    if merged:
        write_index(out, [latest[j.id] for j in all_jobs if j.id in latest], model_name)
    done = [latest[j.id] for j in all_jobs if j.id in latest]
    counts.update(records=len(done), ok_total=sum(r.get("status") == "ok" for r in done),
                  error_total=sum(r.get("status") != "ok" for r in done), merged=merged,
                  reports=str(out / REPORTS_JSONL), index=str(out / INDEX_HTML) if merged else None)
    return counts
