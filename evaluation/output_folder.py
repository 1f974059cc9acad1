"""Write an evaluation output folder: results.json, predictions.jsonl, results.md, plots/."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from slidechat.evaluation.results_table import results_markdown
from slidechat.errors import DataError
from slidechat.utils.io import write_json_atomic, write_jsonl_atomic, write_text_atomic

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
PREDICTIONS_JSONL = "predictions.jsonl"
RESULTS_MD = "results.md"
PLOTS_DIR = "plots"


def write_results_folder(out_dir: str | Path, results: dict, records: list[dict] | None = None,
                         plots: bool = True) -> dict[str, Path]:
    """Write results.json, results.md, (predictions.jsonl when ``records`` given) and plots."""
    from slidechat.evaluation.plots import write_closed_vqa_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": out_dir / RESULTS_JSON, "markdown": out_dir / RESULTS_MD}
    if records is not None:
        paths["predictions"] = out_dir / PREDICTIONS_JSONL
        write_jsonl_atomic(paths["predictions"], records)
    if plots and "closed_vqa" in results:
        try:
            results.setdefault("plots", [])
            for p in write_closed_vqa_plots(results["closed_vqa"], out_dir / PLOTS_DIR):
                rel = str(p.relative_to(out_dir))
                if rel not in results["plots"]:
                    results["plots"].append(rel)
        except Exception as exc:  # a plot must never lose the numbers
            log.warning("could not draw plots: %s", exc)
    write_json_atomic(paths["results"], results)
    markdown = results_markdown(results)
    for rel in results.get("plots", []):
        markdown += f"\n![{Path(rel).stem}]({rel})\n"
    write_text_atomic(paths["markdown"], markdown)
    return paths


def read_results(folder: str | Path) -> dict:
    """Read ``results.json`` from an evaluation folder (or the file itself)."""
    path = Path(folder)
    if path.is_dir():
        path = path / RESULTS_JSON
    if not path.exists():
        raise DataError(f"{path}: no results.json here; run `slidechat eval run` or `eval score` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt results.json ({exc})") from exc
