"""Render a results.json dict as Markdown tables (and pick headline numbers for comparisons)."""

from __future__ import annotations

import math

CAPTION_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "embedding_similarity")
TEXT_TASKS = ("open_vqa", "captioning", "reports")


def fmt(value, digits: int = 3) -> str:
    """Number formatting for tables: '-' for missing/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _acc_cell(entry: dict) -> str:
    return f"{100 * entry['accuracy']:.1f} [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def closed_vqa_markdown(summary: dict) -> list[str]:
    lines = ["## Closed VQA (accuracy %, 95% bootstrap CI)", ""]
    rows = [["**overall**", _acc_cell(summary["overall"]), str(summary["overall"]["n"])]]
    for grouping in ("broad_category", "narrow_category", "tumor"):
        for name, entry in summary.get(grouping, {}).items():
            rows.append([f"{grouping}: {name}", _acc_cell(entry), str(entry["n"])])
    lines += _table(["group", "accuracy", "n"], rows)
    unparse = summary.get("unparseable", [])
    missing = summary.get("missing", [])
    lines += ["", f"Unparseable answers (counted wrong): {len(unparse)}"
              + (f" — ids: {', '.join(map(str, unparse[:20]))}{' …' if len(unparse) > 20 else ''}" if unparse else "")]
    if missing:
        lines.append(f"Questions without a prediction (counted wrong): {len(missing)}")
    return lines + [""]


def text_markdown(results: dict) -> list[str]:
    rows = []
    for task in TEXT_TASKS:
        if task in results and results[task].get("n"):
            r = results[task]
            rows.append([task] + [fmt(r.get(k)) for k in CAPTION_KEYS] + [str(r["n"])])
    if not rows:
        return []
    return ["## Open-ended text (n-gram and embedding similarity to the reference)", ""] + _table(["task", *CAPTION_KEYS, "n"], rows) + [""]


def _ci_cell(entry: dict) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    return f"{100 * entry['value']:.1f} [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"


def facts_markdown(facts: dict) -> list[str]:
    """Fact-level scores: open VQA accuracy per question type; caption/report fact precision, recall, contradictions."""
    if not facts:
        return []
    lines = []
    ov = facts.get("open_vqa")
    if ov:
        rows = []
        for name, e in [("**overall**", ov["overall"]), *ov["per_category"].items()]:
            cell = _ci_cell({"value": e["accuracy"], "ci_low": e["ci_low"], "ci_high": e["ci_high"]})
            rows.append([name, cell, *(str(e[k]) for k in ("correct", "wrong", "hedged", "unparseable")), str(e["n"])])
        lines += [f"## Open VQA fact accuracy (%, 95% bootstrap CI; percentages within ±{ov['tolerance_pp']:g} points)",
                  ""] + _table(["question type", "accuracy", "correct", "wrong", "hedged", "unparseable", "n"], rows)
        lines.append("")
    rows = []
    for task in ("captioning", "reports"):
        t = facts.get(task)
        if t:
            kinds = ", ".join(f"{k} {v}" for k, v in t["contradiction_kinds"].items()) or "-"
            rows.append([task, _ci_cell(t["fact_precision"]), _ci_cell(t["fact_recall"]),
                         _ci_cell(t["contradiction_rate"]), kinds, str(t["n"])])
    if rows:
        lines += ["## Caption and report facts (%, 95% bootstrap CI)", ""]
        lines += _table(["task", "fact precision", "fact recall", "texts with a contradiction", "contradictions",
                         "n"], rows) + [""]
    return lines


def report_fields_markdown(fields: dict) -> list[str]:
    if not fields or not fields.get("fields"):
        return []
    rows = [[name, fmt(e["accuracy"]), fmt(e.get("jaccard")), str(e["n"])] for name, e in fields["fields"].items()]
    rows.append(["**mean over fields**", fmt(fields["mean_field_accuracy"]), "-", str(fields["n"])])
    rows.append(["**all fields right**", fmt(fields["exact_report"]), "-", str(fields["n"])])
    return ["## Structured report fields", ""] + _table(["field", "accuracy", "jaccard", "n"], rows) + [""]


def grounding_markdown(g: dict) -> list[str]:
    if not g or not g.get("n"):
        return []
    rows = [["pointing game", fmt(g["pointing_game"]), fmt(g["chance_pointing"])],
            ["heatmap mass in lesion", fmt(g["mass_in_lesion"]), fmt(g["chance_mass"])]]
    return [f"## Grounding ({g['n']} slides with a lesion)", ""] + _table(["metric", "value", "chance"], rows) + [""]


def retrieval_markdown(r: dict) -> list[str]:
    if not r or not r.get("n"):
        return []
    rows = []
    for direction in ("slide_to_text", "text_to_slide"):
        d = r[direction]
        rows.append([direction, fmt(d["R@1"]), fmt(d["R@5"]), fmt(d["R@10"]), fmt(d["median_rank"], 1)])
    lines = [f"## Retrieval ({r['n']} pairs)", ""] + _table(["direction", "R@1", "R@5", "R@10", "median rank"], rows)
    if r.get("zero_shot_accuracy") is not None:
        lines += ["", f"Zero-shot class accuracy: {fmt(r['zero_shot_accuracy'])}"]
    return lines + [""]


def results_markdown(results: dict) -> str:
    """The whole results.md: a meta line, then one section per task present."""
    meta = results.get("meta", {})
    lines = [f"# Evaluation: {meta.get('model', 'predictions')}", ""]
    for key in ("data", "pred", "gold", "created"):
        if meta.get(key):
            lines.append(f"- {key}: `{meta[key]}`")
    lines.append("")
    if "closed_vqa" in results:
        lines += closed_vqa_markdown(results["closed_vqa"])
    lines += facts_markdown(results.get("facts", {}))
    lines += text_markdown(results)
    lines += report_fields_markdown(results.get("report_fields", {}))
    lines += grounding_markdown(results.get("grounding", {}))
    lines += retrieval_markdown(results.get("retrieval", {}))
    for note in results.get("notes", []):
        lines.append(f"> note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def headline_metrics(results: dict) -> dict[str, float | None]:
    """Flat {metric name: value} of the numbers worth comparing across models."""
    out: dict[str, float | None] = {}
    cv = results.get("closed_vqa")
    if cv:
        out["closed_vqa/accuracy"] = cv["overall"]["accuracy"]
        for grouping in ("broad_category",):
            for name, entry in cv.get(grouping, {}).items():
                out[f"closed_vqa/{name}"] = entry["accuracy"]
        out["closed_vqa/unparseable"] = float(len(cv.get("unparseable", [])))
    for task in TEXT_TASKS:
        r = results.get(task)
        if r and r.get("n"):
            for k in CAPTION_KEYS:
                out[f"{task}/{k}"] = r.get(k)
    facts = results.get("facts", {})
    if facts.get("open_vqa"):
        out["open_vqa/fact_accuracy"] = facts["open_vqa"]["overall"]["accuracy"]
        for name, e in facts["open_vqa"]["per_category"].items():
            out[f"open_vqa/fact_accuracy/{name}"] = e["accuracy"]
    for task in ("captioning", "reports"):
        if facts.get(task):
            for k in ("fact_precision", "fact_recall", "contradiction_rate"):
                out[f"{task}/{k}"] = facts[task][k]["value"]
    rf = results.get("report_fields")
    if rf and rf.get("fields"):
        out["report_fields/mean"] = rf["mean_field_accuracy"]
    g = results.get("grounding")
    if g and g.get("n"):
        out["grounding/pointing_game"] = g["pointing_game"]
        out["grounding/mass_in_lesion"] = g["mass_in_lesion"]
    rt = results.get("retrieval")
    if rt and rt.get("n"):
        for direction in ("slide_to_text", "text_to_slide"):
            for k in ("R@1", "R@5", "R@10"):
                out[f"retrieval/{direction}/{k}"] = rt[direction][k]
    return out
