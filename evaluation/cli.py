"""`slidechat eval`: score predictions, run a checkpoint on benchmarks, compare result folders.

    slidechat eval score --pred P.jsonl|P.csv [--gold G.csv] --out DIR
    slidechat eval run --checkpoint DIR --data SYNTH_DIR|BENCH.csv --out DIR [--tasks ...]
    slidechat eval compare DIR1 DIR2 ... [--out table.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slidechat.utils.locks import DEFAULT_STALE_AFTER_S

ALL_TASKS = ("closed_vqa", "open_vqa", "captioning", "reports", "grounding", "retrieval")


def _add_bootstrap(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def _add_skip_bad_lines(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed lines/rows/records of the input files instead of stopping "
                        "at the first one with its line number")


def _add_text(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it starts a Java process, ~10 s)")
    p.add_argument("--no-embedding", action="store_true", help="skip the MiniLM embedding similarity")
    p.add_argument("--numeric-tolerance", type=float, default=0.1,
                   help="absolute tolerance for numeric report fields such as tumour fraction (default 0.1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="ACTION")
    sub.required = True

    s = sub.add_parser("score", help="score existing predictions against gold files (no model)")
    s.add_argument("--pred", required=True, help="predictions: JSONL (id + output) or CSV (ID + Output)")
    s.add_argument("--gold", help="gold: SlideBench CSV/JSON, or open_vqa/captions/reports JSONL; "
                                  "optional when --pred is a SlideChat output CSV with the Answer column")
    s.add_argument("--out", help="output folder (default: print the table only)")
    s.add_argument("--no-plots", action="store_true")
    _add_skip_bad_lines(s)
    _add_bootstrap(s)
    _add_text(s)

    r = sub.add_parser("run", help="run a checkpoint on benchmarks and score it (resumable)")
    r.add_argument("--checkpoint", default="demo", help="checkpoint folder or 'demo' (default demo)")
    r.add_argument("--data", required=True,
                   help="a SynthSlide folder (truth.jsonl, closed_vqa.csv, ...) or a SlideBench CSV/JSON")
    r.add_argument("--features-dir", help="folder of per-slide feature files (<Slide>.h5/.csv) for SlideBench")
    r.add_argument("--slides-dir", help="folder of slide files for SlideBench rows (when no features)")
    r.add_argument("--out", required=True, help="output folder; rerunning resumes from predictions.jsonl")
    r.add_argument("--tasks", nargs="+", choices=ALL_TASKS, default=None, help="default: all available")
    r.add_argument("--limit", type=int, help="at most this many items per task (quick looks)")
    r.add_argument("--max-new-tokens", type=int, default=256, help="for open VQA and captions (default 256)")
    r.add_argument("--mcq-max-new-tokens", type=int, default=32, help="for closed VQA answers (default 32)")
    r.add_argument("--cache-dir", help="feature cache folder (default: the slidechat cache)")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--device", default=None)
    r.add_argument("--overlays", type=int, default=4, help="heatmap overlay images to save (default 4)")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--lock-stale-after", type=float, default=DEFAULT_STALE_AFTER_S, metavar="SECONDS",
                   help="several workers may share one --out: take over a slide whose worker on another machine "
                        f"has not refreshed its lock for this long (default {DEFAULT_STALE_AFTER_S:g})")
    _add_skip_bad_lines(r)
    _add_bootstrap(r)
    _add_text(r)

    c = sub.add_parser("compare", help="comparison table from several evaluation folders")
    c.add_argument("folders", nargs="+", help="folders with results.json")
    c.add_argument("--names", nargs="+", help="column names (default: folder names)")
    c.add_argument("--out", help="also write the Markdown table here")


def _bootstrap_cfg(args):
    from slidechat.evaluation.closed_vqa import BootstrapConfig

    return BootstrapConfig(n_resamples=args.bootstrap, seed=args.seed)


def _text_cfg(args):
    from slidechat.evaluation.scoring import TextScoreConfig

    return TextScoreConfig(with_meteor=not args.no_meteor, with_embedding=not args.no_embedding,
                           numeric_tolerance=args.numeric_tolerance)


def _run_score(args) -> int:
    from slidechat.evaluation.output_folder import write_results_folder
    from slidechat.evaluation.results_table import results_markdown
    from slidechat.evaluation.scoring import score_files
    from slidechat.utils.io import BadLines

    bad_lines = BadLines(skip=args.skip_bad_lines)
    results, records = score_files(args.pred, args.gold, bootstrap=_bootstrap_cfg(args), text=_text_cfg(args),
                                   bad_lines=bad_lines)
    if bad_lines.count:
        print(bad_lines.summary(), file=sys.stderr)
    sys.stdout.write(results_markdown(results))
    if args.out:
        paths = write_results_folder(args.out, results, records, plots=not args.no_plots)
        print(f"wrote {paths['results']}", file=sys.stderr)
    return 0


def _run_compare(args) -> int:
    from slidechat.evaluation.compare import compare_folders, comparison_markdown
    from slidechat.utils.io import write_text_atomic

    columns, table = compare_folders(args.folders, args.names)
    text = comparison_markdown(columns, table)
    sys.stdout.write(text)
    if args.out:
        write_text_atomic(Path(args.out), text)
    return 0


def _run_model(args) -> int:
    from slidechat.evaluation.runner import EvalRunConfig, run_evaluation

    cfg = EvalRunConfig(
        checkpoint=args.checkpoint, data=args.data, out_dir=args.out, tasks=args.tasks, limit=args.limit,
        features_dir=args.features_dir, slides_dir=args.slides_dir, max_new_tokens=args.max_new_tokens,
        mcq_max_new_tokens=args.mcq_max_new_tokens, cache_dir=args.cache_dir, progress=not args.no_progress,
        device=args.device, n_overlays=args.overlays, plots=not args.no_plots,
        bootstrap=_bootstrap_cfg(args), text=_text_cfg(args), skip_bad_lines=args.skip_bad_lines,
        lock_stale_s=args.lock_stale_after,
    )
    results = run_evaluation(cfg)
    from slidechat.evaluation.results_table import results_markdown

    if results["meta"].get("skipped_lines"):
        print(f"skipped {len(results['meta']['skipped_lines'])} malformed line(s): "
              + "; ".join(results["meta"]["skipped_lines"][:5]), file=sys.stderr)
    if results.get("pending"):
        print(f"{results['pending']} item(s) are still being run by other workers on {args.out}; the worker "
              "that finishes last writes results.json", file=sys.stderr)
        return 0

    sys.stdout.write(results_markdown(results))
    return 0


def run(args) -> int:
    """Dispatch `slidechat eval ACTION`."""
    return {"score": _run_score, "compare": _run_compare, "run": _run_model}[args.eval_command](args)
