"""`slidechat report`: batch report generation over many slides (reports.jsonl + index.html).

    slidechat report SLIDES... --out DIR [--checkpoint demo] [--prompt TEXT]
    slidechat report SLIDES... --out DIR --schema breast_carcinoma   # or --schema my_template.yaml
    slidechat report slides.csv --out DIR           # CSV: slide_path [, case_id, prompt]
    slidechat report --cases cases.csv --out DIR    # one report per case: case_id, slide_path [, label]
    slidechat report 'data/*.svs' --out DIR --num-shards 4 --shard-id 0
    for i in 1 2 3; do slidechat report data/ --out DIR & done   # N workers share one folder (lock files)
    accelerate launch --multi_gpu --num_processes 4 -m slidechat.cli report data/ --out DIR  # a shard per GPU
    torchrun --nproc_per_node 2 -m slidechat.cli report data/ --out DIR                      # (tested on CPU)
"""

from __future__ import annotations

import argparse
import sys

from slidechat.slide.config import option_type
from slidechat.utils.locks import DEFAULT_STALE_AFTER_S


def _schema_names() -> list[str]:
    from slidechat.inference.report_schema import list_report_schemas

    return list_report_schemas()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="slide files, folders, globs, or CSVs with a slide_path column "
                                                  "(optional case_id and prompt columns)")
    parser.add_argument("--cases", metavar="CSV", help="a cases CSV (case_id, slide_path[, label]): one report per "
                                                       "case over all its slides, instead of one per slide")
    parser.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    parser.add_argument("--checkpoint", default="demo", help="checkpoint folder, 'demo' or 'demo-untrained'")
    parser.add_argument("--prompt", help="clinical context given with every slide (a CSV prompt column wins)")
    parser.add_argument("--schema", metavar="NAME_OR_FILE",
                        help="report template: a registered name (" + ", ".join(_schema_names()) + ") or a "
                             ".yaml/.json file (default: synthslide)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: automatic; per-process GPU under accelerate)")
    parser.add_argument("--num-shards", type=int, help="split the slide list over this many processes "
                                                       "(default: WORLD_SIZE from accelerate/torchrun, else 1)")
    parser.add_argument("--shard-id", type=int, help="which shard this process runs (default: RANK, else 0)")
    parser.add_argument("--cache-dir", help="feature cache folder (default: the slidechat cache)")
    parser.add_argument("--mpp", type=option_type("mpp"), help="microns per pixel for slides that lack it")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per report question (default 64)")
    parser.add_argument("--summary-max-new-tokens", type=int, default=160, help="for the summary (default 160)")
    parser.add_argument("--thumbnail-size", type=int, default=512)
    parser.add_argument("--no-heatmaps", action="store_true", help="skip heatmap overlays")
    parser.add_argument("--no-prefetch", action="store_true", help="do not encode the next slide in the background")
    parser.add_argument("--retry-errors", action="store_true", help="redo slides that have an error record")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip (and count) malformed rows of input CSVs instead of stopping at the first one")
    parser.add_argument("--lock-stale-after", type=float, default=DEFAULT_STALE_AFTER_S, metavar="SECONDS",
                        help="take over a slide whose worker on another machine has not refreshed its lock for this "
                             f"long (default {DEFAULT_STALE_AFTER_S:g}; a killed worker on this machine at once)")
    parser.add_argument("--fail-on-error", action="store_true", help="exit 1 when any slide has an error record")


def run(args) -> int:
    """Run (or resume) the batch; prints a one-line summary."""
    from slidechat.errors import ConfigError
    from slidechat.inference.batch_report import BatchReportConfig, run_batch

    if bool(args.inputs) == bool(args.cases):
        raise ConfigError("give slides (files, folders, globs, CSVs) or --cases CSV, not both"
                          if args.inputs else "give slides to report on (files, folders, globs, CSVs) or --cases CSV")
    cfg = BatchReportConfig(
        inputs=args.inputs, out_dir=args.out, checkpoint=args.checkpoint, device=args.device, prompt=args.prompt,
        num_shards=args.num_shards, shard_id=args.shard_id, cache_dir=args.cache_dir, heatmaps=not args.no_heatmaps,
        thumbnail_size=args.thumbnail_size, max_new_tokens=args.max_new_tokens,
        summary_max_new_tokens=args.summary_max_new_tokens, retry_errors=args.retry_errors,
        prefetch=not args.no_prefetch, progress=not args.no_progress, mpp=args.mpp,
        skip_bad_lines=args.skip_bad_lines,
        lock_stale_s=args.lock_stale_after, cases=args.cases, schema=args.schema,
    )
    c = run_batch(cfg)
    if c["bad_lines_summary"]:
        print(c["bad_lines_summary"], file=sys.stderr)
    where = c["index"] or f"{c['reports']} (index.html is written when every slide has a record)"
    unit = "cases" if args.cases else "slides"
    print(f"{c['records']}/{c['total']} {unit} reported: {c['ok_total']} ok, {c['error_total']} error "
          f"({c['skipped']} done before or by other workers) -> {where}", file=sys.stderr)
    return 1 if (args.fail_on_error and c["error_total"]) else 0
