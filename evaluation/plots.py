"""Matplotlib figures for an evaluation folder (headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_category_accuracy(groups: dict[str, dict], out_path: str | Path, title: str,
                           overall: dict | None = None) -> Path:
    """Horizontal bar chart of accuracy per category with bootstrap CI error bars (PNG)."""
    plt = _pyplot()
    names = list(groups)
    if overall is not None:
        names = ["overall"] + names
        groups = {"overall": overall, **groups}
    acc = np.array([groups[n]["accuracy"] for n in names]) * 100
    low = np.array([groups[n]["ci_low"] for n in names]) * 100
    high = np.array([groups[n]["ci_high"] for n in names]) * 100
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    y = np.arange(len(names))
    colors = ["#4c72b0" if n != "overall" else "#dd8452" for n in names]
    ax.barh(y, acc, xerr=np.vstack([acc - low, high - acc]), color=colors, capsize=3)
    ax.set_yticks(y, [f"{n}: {a:.1f}% (n={groups[n]['n']})" for n, a in zip(names, acc)])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%) with 95% bootstrap CI")
    ax.set_title(title)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def write_closed_vqa_plots(summary: dict, plot_dir: str | Path) -> list[Path]:
    """One bar chart per category grouping present in a closed-VQA summary."""
    paths = []
    for grouping in ("broad_category", "narrow_category", "tumor"):
        groups = summary.get(grouping)
        if groups:
            paths.append(plot_category_accuracy(groups, Path(plot_dir) / f"closed_vqa_{grouping}.png",
                                                f"Closed VQA accuracy by {grouping.replace('_', ' ')}",
                                                overall=summary["overall"]))
    return paths
