"""Score closed (multiple-choice) VQA: parse answers, accuracy overall and per category with CIs."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from slidechat.evaluation.answer_parser import parse_choice
from slidechat.evaluation.metrics.bootstrap import bootstrap_ci
from slidechat.evaluation.slidebench import ClosedVQAItem

GROUPINGS = {"broad_category": "Broad Category", "narrow_category": "Narrow Category", "tumor": "Tumor"}


@dataclass
class BootstrapConfig:
    n_resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0


def _accuracy_entry(correct: list[float], cfg: BootstrapConfig) -> dict:
    mean, low, high = bootstrap_ci(correct, cfg.n_resamples, cfg.confidence, cfg.seed)
    return {"accuracy": mean, "ci_low": low, "ci_high": high, "n": len(correct), "n_correct": int(sum(correct))}


def score_closed_vqa(
    items: list[ClosedVQAItem], outputs: dict[str, str], bootstrap: BootstrapConfig | None = None
) -> tuple[dict, list[dict]]:
    """Score model outputs against gold items.

    Returns ``(summary, records)``: ``summary`` has ``overall`` and per-grouping
    (``broad_category``, ``narrow_category``, ``tumor``) accuracy entries with bootstrap CIs,
    plus ``unparseable`` / ``missing`` id lists; ``records`` has one dict per question
    (id, slide, category, gold, output, parsed, correct, status). A question with no prediction
    or an unparseable answer counts as wrong.
    """
    cfg = bootstrap or BootstrapConfig()
    records: list[dict] = []
    for item in items:
        output = outputs.get(item.id)
        parsed = parse_choice(output, item.options) if output is not None else None
        status = "missing" if output is None else ("unparseable" if parsed is None else "ok")
        records.append(
            {
                "task": "closed_vqa",
                "id": item.id,
                "slide": item.slide,
                "tumor": item.tumor,
                "broad_category": item.broad_category,
                "narrow_category": item.narrow_category,
                "question": item.question,
                "options": item.options,
                "answer": item.answer,
                "output": output,
                "parsed": parsed,
                "correct": bool(parsed == item.answer),
                "status": status,
            }
        )
    summary: dict = {"overall": _accuracy_entry([float(r["correct"]) for r in records], cfg)}
    for key in GROUPINGS:
        groups: dict[str, list[float]] = defaultdict(list)
        for r in records:
            if r[key]:
                groups[r[key]].append(float(r["correct"]))
        if groups:
            summary[key] = {name: _accuracy_entry(vals, cfg) for name, vals in sorted(groups.items())}
    summary["unparseable"] = [r["id"] for r in records if r["status"] == "unparseable"]
    summary["missing"] = [r["id"] for r in records if r["status"] == "missing"]
    gold_ids = {item.id for item in items}
    summary["extra_predictions"] = sorted(k for k in outputs if k not in gold_ids)[:50]
    summary["bootstrap"] = {"n_resamples": cfg.n_resamples, "confidence": cfg.confidence, "seed": cfg.seed}
    return summary, records
