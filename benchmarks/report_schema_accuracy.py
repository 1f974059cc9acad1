"""Report-field accuracy of a checkpoint: the template path (constrained decoding) vs the free-text path.

    slidechat synth --n 8 --seed 777 --size tiny --out /tmp/synth777
    python benchmarks/report_schema_accuracy.py /tmp/synth777 [--checkpoint demo] [--limit 8]

Scores the fields of both paths against the folder's ``reports.jsonl`` with the evaluation's
``report_field_accuracy`` (the rules of ``slidechat eval``), counts reports whose fields validate against the
template and the share of fields that got a value, and times each path. The summary is not scored (``--summary-tokens`` keeps it short). One JSON line
per slide while running, then the totals.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("synth_dir")
    ap.add_argument("--checkpoint", default="demo")
    ap.add_argument("--schema", default=None, help="template (default: synthslide)")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--summary-tokens", type=int, default=1)
    args = ap.parse_args()
    import slidechat
    from slidechat.evaluation.metrics.report_fields import report_field_accuracy
    from slidechat.inference.report_schema import load_report_schema
    from slidechat.utils.io import read_jsonl

    root = Path(args.synth_dir)
    truth = {r["slide_id"]: r["report"] for r in read_jsonl(root / "reports.jsonl")}
    schema = load_report_schema(args.schema)
    sc = slidechat.load(args.checkpoint, device="cpu")
    pairs: dict[str, list] = {"schema": [], "free": []}
    valid = {"schema": 0, "free": 0}
    seconds = {"schema": 0.0, "free": 0.0}
    determined = {"schema": [], "free": []}  # share of fields with a value (not "not determined")
    for path in sorted((root / "slides").glob("*.tiff"))[: args.limit]:
        enc = sc.encode_slide(path)
        row = {"slide": enc.slide_id}
        for name, kw in (("schema", {"schema": schema}), ("free", {"schema": False})):
            t = time.perf_counter()
            rep = sc.report(enc, summary_max_new_tokens=args.summary_tokens, evidence_k=0, **kw)
            seconds[name] += time.perf_counter() - t
            fields = {k: v for k, v in rep.fields.items() if k != "summary"}
            pairs[name].append((fields, truth[enc.slide_id]))
            ok = not schema.validate({**fields, "summary": ""})
            valid[name] += ok
            determined[name].append(sum(v is not None for v in fields.values()) / len(fields))
            row[name] = {"fields": fields, "valid": ok}
        print(json.dumps(row), flush=True)
    n = len(pairs["schema"])
    for name in ("schema", "free"):
        acc = report_field_accuracy(pairs[name])
        print(json.dumps({"path": name, "slides": n, "valid": valid[name],
                          "determined": round(sum(determined[name]) / max(n, 1), 3),
                          "mean_field_accuracy": round(acc["mean_field_accuracy"], 3),
                          "exact_report": round(acc["exact_report"], 3),
                          "fields": {k: round(v["accuracy"], 3) for k, v in acc["fields"].items()},
                          "report_s_per_slide": round(seconds[name] / max(n, 1), 1)}), flush=True)


if __name__ == "__main__":
    main()
