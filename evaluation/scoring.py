"""Score existing predictions against gold files, with no model (``slidechat eval score``)."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from slidechat.evaluation.closed_vqa import BootstrapConfig, score_closed_vqa
from slidechat.evaluation.slidebench import has_gold_columns, load_closed_vqa, load_predictions, read_table
from slidechat.errors import DataError
from slidechat.utils.io import BadLines

TEXT_GOLD_KEYS = {"caption": "captioning", "report_text": "reports", "answer": "open_vqa"}


@dataclass
class TextScoreConfig:
    with_meteor: bool = True
    with_embedding: bool = True
    use_java: bool | None = None  # None: use java when it is on the PATH
    numeric_tolerance: float = 0.1


def detect_gold_kind(path: str | Path, bad_lines: BadLines | None = None) -> str:
    """"closed_vqa" for a SlideBench-style table (options + answer letter), else the text task name."""
    rows = read_table(path, bad_lines)
    if not rows:
        raise DataError(f"{path}: empty gold file")
    keys = {str(k).strip().lstrip("\ufeff") for k in rows[0]}
    if {"A", "B"} <= keys or "options" in keys:
        return "closed_vqa"
    for key, task in TEXT_GOLD_KEYS.items():
        if key in keys:
            return task
    raise DataError(f"{path}: cannot tell the task: expected SlideBench columns (Question, A-D, Answer), "
                    f"or JSONL with 'caption', 'report_text' or 'answer'")


def load_text_gold(path: str | Path, bad_lines: BadLines | None = None
                   ) -> tuple[str, dict[str, list[str]], dict[str, dict]]:
    """Return (task, {id: reference texts}, {id: structured report fields}) from a text gold file."""
    task = detect_gold_kind(path, bad_lines)
    text_key = {v: k for k, v in TEXT_GOLD_KEYS.items()}[task]
    refs: dict[str, list[str]] = {}
    fields: dict[str, dict] = {}
    for i, row in enumerate(read_table(path, bad_lines)):
        rid = row.get("id") if task == "open_vqa" else row.get("slide_id", row.get("id"))
        if rid is None:
            raise DataError(f"{path} record {i + 1}: no id / slide_id")
        if text_key not in row:
            raise DataError(f"{path} record {i + 1}: no {text_key!r} field")
        value = row[text_key]
        refs.setdefault(str(rid), []).extend(value if isinstance(value, list) else [str(value)])
        if isinstance(row.get("report"), dict):
            fields[str(rid)] = row["report"]
    return task, refs, fields


def load_predicted_fields(path: str | Path, bad_lines: BadLines | None = None) -> dict[str, dict]:
    """{id: structured fields} from prediction records that carry ``fields`` (or ``report``) dicts."""
    out = {}
    for row in read_table(path, bad_lines):
        rid = next((row[k] for k in ("id", "slide_id", "ID") if k in row), None)
        f = row.get("fields", row.get("report"))
        if rid is not None and isinstance(f, dict):
            out[str(rid)] = f
    return out


def _fact_gold(task: str, gold: Path, bad_lines: BadLines) -> dict[str, dict]:
    """{id: {truth, category?, question?}} when a SynthSlide ``truth.jsonl`` lies next to the gold file (else {})."""
    truth_path = gold.parent / "truth.jsonl"
    if not truth_path.exists():
        return {}
    from slidechat.utils.io import read_jsonl

    truth = {str(r["slide_id"]): r for r in read_jsonl(truth_path, bad_lines) if "slide_id" in r}
    out = {}
    for row in read_table(gold, bad_lines):
        rid = str(row.get("id") if task == "open_vqa" else row.get("slide_id", row.get("id")))
        sid = str(row.get("slide_id", rid))
        if sid not in truth or (task == "open_vqa" and "category" not in row):
            continue
        out[rid] = {"truth": truth[sid]}
        if task == "open_vqa":
            out[rid].update(category=row["category"], question=row.get("question", ""))
    return out


def score_text(task: str, outputs: dict[str, str], refs: dict[str, list[str]], cfg: TextScoreConfig) -> dict:
    """Caption metrics + MiniLM similarity for one text task."""
    from slidechat.evaluation.metrics.captioning import caption_metrics

    scored = caption_metrics(outputs, refs, use_java=cfg.use_java, with_meteor=cfg.with_meteor)
    scored["task"] = task
    scored["missing"] = sorted(k for k in refs if k not in outputs)[:50]
    if cfg.with_embedding and scored.get("n"):
        from slidechat.evaluation.metrics.embedding import embedding_similarity

        emb = embedding_similarity(outputs, refs)
        scored["embedding_similarity"] = emb["embedding_similarity"]
        for k, v in emb["per_item"].items():
            scored["per_item"].setdefault(k, {})["embedding_similarity"] = v
    return scored


def score_files(pred: str | Path, gold: str | Path | None, *, bootstrap: BootstrapConfig | None = None,
                text: TextScoreConfig | None = None, bad_lines: BadLines | None = None) -> tuple[dict, list[dict]]:
    """Score a predictions file against a gold file; returns (results dict, per-item records).

    ``gold`` may be None when ``pred`` is a SlideChat-style output CSV that carries the gold
    columns (``Answer`` etc.) next to ``Output``. Malformed lines are errors unless ``bad_lines`` skips them;
    skipped lines are counted in ``results["meta"]["skipped_lines"]``.
    """
    text = text or TextScoreConfig()
    bad_lines = bad_lines if bad_lines is not None else BadLines()
    results, records = _score(Path(pred), gold, bootstrap, text, bad_lines)
    results["meta"]["skipped_lines"] = [f"{b.source}:{b.line}: {b.reason}" for b in bad_lines.skipped]
    return results, records


def _score(pred: Path, gold: str | Path | None, bootstrap: BootstrapConfig | None, text: TextScoreConfig,
           bad_lines: BadLines) -> tuple[dict, list[dict]]:
    if gold is None:
        if not has_gold_columns(pred, bad_lines):
            raise DataError(f"{pred}: no --gold given and the file has no Question/Answer columns")
        gold = pred
    meta = {"pred": str(pred), "gold": str(gold), "model": Path(pred).stem,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    kind = detect_gold_kind(gold, bad_lines)
    outputs = load_predictions(pred, task=kind, bad_lines=bad_lines)
    if kind == "closed_vqa":
        summary, records = score_closed_vqa(load_closed_vqa(gold, bad_lines), outputs, bootstrap)
        return {"meta": meta, "closed_vqa": summary}, records
    task, refs, true_fields = load_text_gold(gold, bad_lines)
    scored = score_text(task, outputs, refs, text)
    per_item = scored.pop("per_item", {})
    results = {"meta": meta, task: scored}
    records = [{"task": task, "id": k, "output": outputs.get(k), "references": refs[k], **per_item.get(k, {})}
               for k in refs]
    fact_gold = _fact_gold(task, Path(gold), bad_lines)
    if fact_gold:
        from slidechat.evaluation.metrics.facts import score_facts

        facts, fact_items = score_facts(task, outputs, fact_gold, bootstrap or BootstrapConfig(),
                                        100.0 * text.numeric_tolerance)
        results["facts"] = {task: facts}
        for rec in records:
            if rec["id"] in fact_items:
                rec["facts"] = fact_items[rec["id"]]
    if true_fields:
        from slidechat.evaluation.metrics.report_fields import report_field_accuracy

        pred_fields = load_predicted_fields(pred, bad_lines)
        if pred_fields:
            pairs = [(pred_fields.get(k, {}), true_fields[k]) for k in true_fields]
            results["report_fields"] = report_field_accuracy(pairs, text.numeric_tolerance)
    return results, records
