"""Model-vs-model comparison table from several evaluation folders."""

from __future__ import annotations

from pathlib import Path

from slidechat.evaluation.output_folder import read_results
from slidechat.evaluation.results_table import fmt, headline_metrics


def compare_folders(folders: list[str | Path], names: list[str] | None = None) -> tuple[list[str], dict]:
    """Return (column names, {metric: [value per folder]}) for the union of headline metrics."""
    columns, per_folder = [], []
    for i, folder in enumerate(folders):
        results = read_results(folder)
        label = (names[i] if names and i < len(names) else None) or results.get("meta", {}).get("name") \
            or Path(folder).name
        columns.append(label)
        per_folder.append(headline_metrics(results))
    metrics: list[str] = []
    for h in per_folder:
        metrics += [m for m in h if m not in metrics]
    return columns, {m: [h.get(m) for h in per_folder] for m in metrics}


def comparison_markdown(columns: list[str], table: dict) -> str:
    """Markdown table: one row per metric, one column per model; the best value in bold.

    "unparseable" counts are lower-is-better; everything else is higher-is-better.
    """
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "|".join("---" for _ in columns) + "|"]
    for metric, values in table.items():
        present = [v for v in values if v is not None]
        best = None
        if len(present) > 1:
            best = min(present) if metric.endswith("unparseable") else max(present)
        cells = [(f"**{fmt(v)}**" if v is not None and v == best else fmt(v)) for v in values]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
