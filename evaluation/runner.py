"""`slidechat eval run`: run a checkpoint on a benchmark, log raw predictions, score, write the folder.

Tasks (each item asked in a fresh conversation about its slide):
- ``closed_vqa``: the question with its options (``format_mcq_prompt``), parsed by ``answer_parser``;
- ``open_vqa``: the question as is; ``captioning``: "Describe this slide."; both scored with caption metrics;
- ``reports``: ``assistant.report(slide)``: its text vs the reference report, its fields vs the truth;
- ``grounding`` (SynthSlide slides with a lesion): ``conv.heatmap()`` vs the lesion mask, plus overlays;
- ``retrieval``: slide<->caption recall@K and zero-shot dominant-tissue accuracy, only when the checkpoint
  has stage-0 retrieval heads (``slidechat.inference.retrieval.Retriever``); otherwise skipped with a note.

Resume: every answer is appended (fsync) to ``predictions.jsonl`` keyed by (task, id); a rerun with the same
``--out`` skips what is there (a torn last line from a kill is cut off) and only scores at the end.
Several workers (processes or machines on a shared filesystem) may run the same command on the same ``--out``:
each claims a slide with a lock file in ``<out>/.locks/`` before answering its items, and the worker that
logs the last item writes the results.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from slidechat.evaluation.benchmark_data import BenchmarkData, case_slides, load_benchmark
from slidechat.evaluation.closed_vqa import BootstrapConfig, score_closed_vqa
from slidechat.evaluation.output_folder import PREDICTIONS_JSONL, write_results_folder
from slidechat.evaluation.scoring import TextScoreConfig, score_text
from slidechat.evaluation.slidebench import format_mcq_prompt
from slidechat.errors import ConfigError, DataError, SlideChatError
from slidechat.synth.dataset import SLIDE_LABELS_COLUMN
from slidechat.utils.io import (BadLines, JsonlLog, read_jsonl, remove_stale_temp_files, write_json_atomic,
                                write_jsonl_atomic)
from slidechat.utils.locks import DEFAULT_STALE_AFTER_S, LockFolder

log = logging.getLogger(__name__)

CAPTION_PROMPT = "Describe this slide."
RUN_JSON = "run.json"
SCORES_JSONL = "scores.jsonl"
LOCK_DIR = ".locks"
TASK_ORDER = ("closed_vqa", "open_vqa", "captioning", "reports", "grounding", "retrieval")


@dataclass
class EvalRunConfig:
    checkpoint: str
    data: str
    out_dir: str
    tasks: list[str] | None = None  # None: all the data supports
    limit: int | None = None  # at most this many items per task
    features_dir: str | None = None
    slides_dir: str | None = None
    max_new_tokens: int = 256
    mcq_max_new_tokens: int = 32
    device: str | None = None
    n_overlays: int = 4
    plots: bool = True
    cache_dir: str | None = None
    caption_prompt: str = CAPTION_PROMPT
    progress: bool = True
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    text: TextScoreConfig = field(default_factory=TextScoreConfig)
    skip_bad_lines: bool = False  # skip (and count) malformed lines of the benchmark files instead of stopping
    lock_stale_s: float = DEFAULT_STALE_AFTER_S  # a slide claim not refreshed for this long is taken over

    def __post_init__(self) -> None:
        for name, value in (("--max-new-tokens", self.max_new_tokens), ("--mcq-max-new-tokens", self.mcq_max_new_tokens)):
            if not isinstance(value, int) or not 1 <= value <= 8192:
                raise ConfigError(f"{name} must be an integer in [1, 8192]; got {value!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1; got {self.limit}")
        if self.n_overlays < 0:
            raise ConfigError(f"--overlays must be >= 0; got {self.n_overlays}")
        if not self.lock_stale_s > 0:
            raise ConfigError(f"--lock-stale-after must be > 0 seconds; got {self.lock_stale_s!r}")


def _key(record: dict) -> tuple[str, str]:
    return (record["task"], str(record["id"]))


def _work_items(data: BenchmarkData, tasks: list[str], limit: int | None) -> list[dict]:
    """All (task, id, slide_id, prompt, reference...) units, in slide order so each slide is encoded once."""
    per_task: dict[str, list[dict]] = {t: [] for t in tasks}
    if "closed_vqa" in tasks:
        per_task["closed_vqa"] = [{"task": "closed_vqa", "id": it.id, "slide_id": it.slide,
                                   "prompt": format_mcq_prompt(it), **_slide_labels(it)} for it in data.closed_vqa]
    if "open_vqa" in tasks:
        per_task["open_vqa"] = [{"task": "open_vqa", "id": str(r["id"]), "slide_id": r["slide_id"],
                                 "prompt": r["question"]} for r in data.open_vqa]
    if "captioning" in tasks:
        per_task["captioning"] = [{"task": "captioning", "id": sid, "slide_id": sid} for sid in data.captions]
    if "reports" in tasks:
        per_task["reports"] = [{"task": "reports", "id": sid, "slide_id": sid} for sid in data.reports]
    if "grounding" in tasks:
        per_task["grounding"] = [{"task": "grounding", "id": sid, "slide_id": sid}
                                 for sid in data.truth if data.lesion_mask_path(sid) is not None]
    order = {sid: i for i, sid in enumerate(data.slides)}
    units = []
    for task in tasks:
        units += per_task.get(task, [])[: limit or None]
    # units of one slide (or one case, whose id lists its slides) run together so each is encoded once
    return sorted(units, key=lambda u: (order.get(u["slide_id"], len(order)),
                                        "" if u["slide_id"] in order else u["slide_id"]))


def _check_run_meta(out: Path, meta: dict, create: bool = True) -> None:
    """Refuse a folder that holds another checkpoint's or data set's run; record ours when ``create``."""
    path = out / RUN_JSON
    if path.exists():
        import json

        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: corrupt ({exc.msg}); delete the folder to start over") from exc
        for key in ("checkpoint", "data"):
            if old.get(key) != meta.get(key):
                raise ConfigError(f"{out} holds a run with {key}={old.get(key)!r}, not {meta.get(key)!r}; "
                                  "use another --out (or delete the folder) to start over")
    elif create:
        write_json_atomic(path, {k: v for k, v in meta.items() if k != "skipped_lines"})


def _answer(assistant, enc, unit: dict, cfg: EvalRunConfig, data: BenchmarkData, out: Path,
            overlay_slides: set[str]) -> dict:
    """Run one unit; returns the fields to log (output text, fields, grounding metrics...)."""
    task = unit["task"]
    if task == "closed_vqa":
        return {"output": assistant.chat(enc).ask(unit["prompt"], max_new_tokens=cfg.mcq_max_new_tokens)}
    if task == "open_vqa":
        return {"output": assistant.chat(enc).ask(unit["prompt"], max_new_tokens=cfg.max_new_tokens)}
    if task == "captioning":
        return {"prompt": cfg.caption_prompt,
                "output": assistant.chat(enc).ask(cfg.caption_prompt, max_new_tokens=cfg.max_new_tokens)}
    if task == "reports":
        rep = assistant.report(enc, max_new_tokens=min(64, cfg.max_new_tokens),
                               summary_max_new_tokens=cfg.max_new_tokens)
        return {"output": rep.text, "fields": rep.fields}
    if task == "grounding":
        from slidechat.evaluation.metrics.grounding import grounding_metrics, load_mask

        truth = data.truth[unit["slide_id"]]
        hm = assistant.chat(enc).heatmap()
        metrics = grounding_metrics(hm.scores, hm.coords, hm.patch_size_level0,
                                    load_mask(data.lesion_mask_path(unit["slide_id"])), float(truth["mask_downsample"]))
        if unit["slide_id"] in overlay_slides and data.slides.get(unit["slide_id"]):
            try:
                from slidechat.utils.figures import heatmap_overlay, save_image_atomic, slide_thumbnail

                thumb, size0 = slide_thumbnail(data.slides[unit["slide_id"]], 768)
                img = heatmap_overlay(thumb, size0, hm, boxes_level0=[truth["lesion"]["bbox_level0"]])
                rel = Path("overlays") / f"{unit['slide_id']}.png"
                save_image_atomic(img, out / rel)
                metrics["overlay"] = str(rel)
            except Exception as exc:  # a figure never fails the metric
                log.warning("overlay for %s failed: %s", unit["slide_id"], exc)
        return metrics
    raise ConfigError(f"unknown task {task!r}")


def _run_retrieval(assistant, data: BenchmarkData, cfg: EvalRunConfig) -> dict:
    """Recall@K slide<->caption and zero-shot dominant tissue; {"skipped": reason} when unsupported."""
    try:
        from slidechat.inference.retrieval import Retriever

        retriever = Retriever(assistant)
    except (ImportError, SlideChatError, AttributeError, OSError) as exc:
        return {"skipped": f"checkpoint has no retrieval heads ({exc})", "n": 0}
    import numpy as np

    from slidechat.evaluation.metrics.retrieval import retrieval_metrics, zero_shot_accuracy

    sids = [s for s in data.captions if data.slides.get(s)][: cfg.limit or None]
    slides = [assistant.encode_slide(data.slides[s], cache_dir=cfg.cache_dir) for s in sids]
    s_emb = retriever.embed_slides(slides)
    t_emb = retriever.embed_texts([data.captions[s] for s in sids])
    out = retrieval_metrics((s_emb @ t_emb.T).cpu().numpy())
    dominant = [data.truth.get(s, {}).get("dominant_class") for s in sids]
    if all(dominant):
        labels = sorted(set(dominant))
        names = [lab.replace("_", " ") for lab in labels]
        sim = (s_emb @ retriever.embed_texts(names).T).cpu().numpy()
        out["zero_shot_accuracy"] = zero_shot_accuracy(sim, np.array([labels.index(d) for d in dominant]))
        out["zero_shot_task"] = f"dominant tissue, {len(labels)} classes"
    return out


def _score_facts(task: str, data: BenchmarkData, outs: dict[str, str], ids: list[str], cfg: EvalRunConfig
                 ) -> tuple[dict | None, dict[str, dict]]:
    """Fact-level scores of one text task against SynthSlide truth (None when the data has no truth)."""
    from slidechat.evaluation.metrics.facts import score_facts

    questions = {str(r["id"]): r for r in data.open_vqa}
    gold = {}
    for rid in ids:
        sid = questions[rid]["slide_id"] if task == "open_vqa" else rid
        if sid not in data.truth or (task == "open_vqa" and "category" not in questions[rid]):
            continue
        gold[rid] = {"truth": data.truth[sid]}
        if task == "open_vqa":
            gold[rid].update(category=questions[rid]["category"], question=questions[rid]["question"])
    if not gold:
        return None, {}
    return score_facts(task, outs, gold, cfg.bootstrap, 100.0 * cfg.text.numeric_tolerance)


def score_run(data: BenchmarkData, records: dict, cfg: EvalRunConfig) -> tuple[dict, list[dict]]:
    """Results + per-item score records from the logged predictions (latest record per key)."""
    results: dict = {}
    scored: list[dict] = []
    by_task: dict[str, dict[str, dict]] = {}
    for (task, rid), rec in records.items():
        by_task.setdefault(task, {})[rid] = rec
    if "closed_vqa" in by_task:
        outs = {rid: r["output"] for rid, r in by_task["closed_vqa"].items() if r.get("status") == "ok"}
        asked = [it for it in data.closed_vqa if it.id in by_task["closed_vqa"]]
        summary, recs = score_closed_vqa(asked, outs, cfg.bootstrap)
        summary["errors"] = sorted(rid for rid, r in by_task["closed_vqa"].items() if r.get("status") != "ok")
        results["closed_vqa"] = summary
        scored += recs
    refs_for = {
        "open_vqa": {str(r["id"]): [r["answer"]] for r in data.open_vqa},
        "captioning": {s: [c] for s, c in data.captions.items()},
        "reports": {s: [r["report_text"]] for s, r in data.reports.items()},
    }
    for task in ("open_vqa", "captioning", "reports"):
        if task not in by_task:
            continue
        outs = {rid: r["output"] for rid, r in by_task[task].items() if r.get("status") == "ok"}
        refs = {rid: refs_for[task][rid] for rid in by_task[task] if rid in refs_for[task]}
        res = score_text(task, outs, refs, cfg.text)
        per_item = res.pop("per_item", {})
        results[task] = res
        facts, fact_items = _score_facts(task, data, outs, list(refs), cfg)
        if facts:
            results.setdefault("facts", {})[task] = facts
        scored += [{"task": task, "id": rid, "output": outs.get(rid), "references": refs[rid],
                    **per_item.get(rid, {}), **({"facts": fact_items[rid]} if rid in fact_items else {})}
                   for rid in refs]
    if "reports" in by_task:
        from slidechat.evaluation.metrics.report_fields import report_field_accuracy

        pairs = [(r.get("fields") or {}, data.reports[rid]["report"]) for rid, r in by_task["reports"].items()
                 if rid in data.reports and isinstance(data.reports[rid].get("report"), dict)]
        if pairs:
            results["report_fields"] = report_field_accuracy(pairs, cfg.text.numeric_tolerance)
    if "grounding" in by_task:
        from slidechat.evaluation.metrics.grounding import summarize_grounding

        ok = [r for r in by_task["grounding"].values() if r.get("status") == "ok"]
        results["grounding"] = summarize_grounding(ok)
        results["grounding"]["per_slide"] = {r["id"]: {k: r[k] for k in ("pointing_hit", "mass_in_lesion",
                                                                          "chance_pointing", "chance_mass")}
                                             for r in ok}
        results["grounding"]["overlays"] = sorted(r["overlay"] for r in ok if r.get("overlay"))
    return results, scored


def _slide_labels(item) -> dict:
    """``{"labels": [...]}`` from a case row's ``Slide Labels`` column (``A1 H&E;A2 H&E``), else ``{}``."""
    raw = str(item.extra.get(SLIDE_LABELS_COLUMN) or "").strip()
    return {"labels": case_slides(raw)} if raw and len(case_slides(item.slide)) > 1 else {}


def _encode_for(assistant, data: BenchmarkData, sid: str, cfg: EvalRunConfig, labels: list[str] | None = None):
    """(encoded slide, None) or (None, error text); a case's ``sid`` (``a;b``) gives a ``Case`` of its slides
    (named by ``labels`` when the data gives them)."""
    from slidechat.inference.case import Case

    encoded = []
    try:
        for part in case_slides(sid):
            path = data.slides.get(part)
            if path is None:
                raise SlideChatError(f"no slide or feature file found for slide {part!r}")
            encoded.append(assistant.encode_slide(path, cache_dir=cfg.cache_dir))
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if len(encoded) == 1:
        return encoded[0], None
    try:
        return Case(sid, encoded, list(labels or [])), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _run_unit(assistant, enc, enc_error: str | None, unit: dict, cfg: EvalRunConfig, data: BenchmarkData,
              out: Path, overlay_slides: set[str]) -> dict:
    """The log record of one unit (status ok, or error with the reason)."""
    t0 = time.perf_counter()
    record = {k: unit[k] for k in ("task", "id", "slide_id")}
    for key in ("prompt", "labels"):
        if key in unit:
            record[key] = unit[key]
    if enc_error:
        record.update(status="error", error=enc_error, output=None)
    else:
        try:
            record.update(_answer(assistant, enc, unit, cfg, data, out, overlay_slides), status="ok")
        except Exception as exc:
            log.warning("%s %s failed: %s", unit["task"], unit["id"], exc)
            record.update(status="error", error=f"{type(exc).__name__}: {exc}", output=None)
    record["seconds"] = round(time.perf_counter() - t0, 4)
    return record


def _run_units(assistant, units: list[dict], plog: JsonlLog, cfg: EvalRunConfig, data: BenchmarkData,
               out: Path) -> None:
    """Answer every unit not yet logged, one slide at a time, each slide claimed with a lock file so that
    several workers on the same --out split the slides (see ``slidechat.utils.locks``)."""
    from tqdm.auto import tqdm

    locks = LockFolder(out / LOCK_DIR, stale_after_s=cfg.lock_stale_s)
    # the first n grounding slides in data order get an overlay, whichever worker (or resumed run) answers them
    overlay_slides = set([sid for sid in data.slides if data.lesion_mask_path(sid) is not None][: cfg.n_overlays])
    bar = tqdm(total=len(units), unit="item", desc="eval", disable=not cfg.progress)
    try:
        for sid, group in itertools.groupby(units, key=lambda u: u["slide_id"]):
            group = list(group)
            lock = locks.try_acquire(f"slide-{sid}")
            if lock is None:
                continue  # another worker is on this slide
            with lock:
                plog.refresh()  # another worker may have finished this slide just before we took the lock
                todo = [u for u in group if _key(u) not in plog]
                enc, enc_error = (_encode_for(assistant, data, sid, cfg, group[0].get("labels")) if todo
                                  else (None, None))
                for unit in todo:
                    plog.append(_run_unit(assistant, enc, enc_error, unit, cfg, data, out, overlay_slides))
                    bar.update(1)
    finally:
        bar.close()
    locks.remove_folder_if_empty()


def _score_and_write(assistant, data: BenchmarkData, plog: JsonlLog, units: list[dict], tasks: list[str],
                     meta: dict, cfg: EvalRunConfig, out: Path) -> dict:
    latest = plog.latest()
    # scored in work-item order, not log order: several workers (or a resume) give the same sums bit for bit
    rank = {_key(u): i for i, u in enumerate(units)}
    ordered = dict(sorted(latest.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    results, scored = score_run(data, ordered, cfg)
    if "retrieval" in tasks:
        results["retrieval"] = _run_retrieval(assistant, data, cfg)
    notes = [f"retrieval skipped: {results['retrieval']['skipped']}"] if results.get("retrieval", {}).get("skipped") \
        else []
    for task in ("open_vqa", "captioning", "reports"):
        notes += [f"{task}: {n}" for n in results.get(task, {}).get("notes", [])]
    errors = [r for r in plog.latest().values() if r.get("status") != "ok"]
    if errors:
        notes.append(f"{len(errors)} item(s) failed (see predictions.jsonl, status=error)")
    results = {"meta": {**meta, "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        "n_predictions": len(plog.latest())}, **results, "notes": notes}
    write_jsonl_atomic(out / SCORES_JSONL, scored)
    write_results_folder(out, results, records=None, plots=cfg.plots)
    return results


def run_evaluation(cfg: EvalRunConfig) -> dict:
    """Run (or resume, or join other workers on) an evaluation; the worker that logs the last item scores it
    and writes the output folder. Returns the results, or ``{"meta", "pending": n}`` while other workers still
    hold ``n`` items."""
    import slidechat

    bad_lines = BadLines(skip=cfg.skip_bad_lines)
    data = load_benchmark(cfg.data, cfg.features_dir, cfg.slides_dir, bad_lines)
    available = data.available_tasks()
    tasks = [t for t in TASK_ORDER if t in (cfg.tasks or available)]
    missing = [t for t in tasks if t not in available]
    if missing:
        raise ConfigError(f"{cfg.data} has no data for task(s) {', '.join(missing)}; available: {', '.join(available)}")
    out = Path(cfg.out_dir)
    meta = {"checkpoint": str(cfg.checkpoint), "data": str(Path(cfg.data).resolve()), "tasks": tasks,
            "model": Path(str(cfg.checkpoint)).name or str(cfg.checkpoint), "name": out.name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "skipped_lines": [f"{b.source}:{b.line}: {b.reason}" for b in bad_lines.skipped]}
    _check_run_meta(out, meta, create=False)
    assistant = slidechat.load(cfg.checkpoint, device=cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_meta(out, meta)
    plog = JsonlLog(out / PREDICTIONS_JSONL, key=_key)
    all_units = _work_items(data, [t for t in tasks if t != "retrieval"], cfg.limit)
    _run_units(assistant, [u for u in all_units if _key(u) not in plog], plog, cfg, data, out)
    plog.refresh()
    pending = [u for u in all_units if _key(u) not in plog]
    if pending:
        return {"meta": meta, "pending": len(pending)}
    remove_stale_temp_files(out)  # from workers killed mid-write
    return _score_and_write(assistant, data, plog, all_units, tasks, meta, cfg, out)


def read_predictions(out_dir: str | Path) -> list[dict]:
    """The raw prediction log of a run folder (torn last line ignored)."""
    return read_jsonl(Path(out_dir) / PREDICTIONS_JSONL)
