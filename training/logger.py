"""Training logs: a console line, a CSV file (resumable), and TensorBoard when it is installed."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

log = logging.getLogger("training")

FIELDS = ["step", "epoch", "loss", "lr", "tokens_per_s", "samples", "tokens", "elapsed_s", "grad_norm"]


class TrainLogger:
    """Writes ``log.csv`` (one row per logging step) in ``output_dir``; only the main process writes."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "log.csv"
        self.rows: list[dict] = []
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # keep rows up to the checkpoint we resume from; later rows belong to the interrupted run
            with open(self.path, newline="", encoding="utf-8") as fh:
                self.rows = [r for r in csv.DictReader(fh) if r.get("step") and int(r["step"]) <= resume_step]
        self._rewrite()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except Exception:  # noqa: BLE001 - optional
                self._tb = None

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: r.get(k, "") for k in FIELDS})
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=FIELDS).writerow({k: row.get(k, "") for k in FIELDS})
        log.info("step %5d  epoch %.2f  loss %.4f  lr %.2e  %6.0f tok/s  %.0fs", row["step"], row["epoch"],
                 row["loss"], row["lr"], row["tokens_per_s"], row["elapsed_s"])
        if self._tb is not None:
            for k in ("loss", "lr", "tokens_per_s", "grad_norm"):
                if row.get(k) not in (None, ""):
                    self._tb.add_scalar(f"train/{k}", float(row[k]), int(row["step"]))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
