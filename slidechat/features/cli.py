"""`slidechat extract`: slides -> TRIDENT/CLAM-style feature .h5 files (resumable, bad slides skipped)."""

from __future__ import annotations

import argparse
import logging
import sys

from slidechat.slide.config import ExtractionConfig, add_extraction_arguments, option_type
from slidechat.utils.locks import DEFAULT_STALE_AFTER_S


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slidechat.encoders import list_encoders

    parser.add_argument("slides", nargs="+", help="slide files, folders, globs, or CSVs with a slide_path column")
    parser.add_argument("--encoder", default="demo-cnn",
                        help=f"a registered encoder: {', '.join(list_encoders())} (default demo-cnn)")
    parser.add_argument("--weights", default=None, help="local weights file or folder for the encoder")
    parser.add_argument("--out", required=True, help="output folder for <slide_id>.h5 files")
    add_extraction_arguments(parser)
    parser.add_argument("--device", default="cpu", help="torch device for the encoder (default cpu)")
    parser.add_argument("--no-resume", action="store_true", help="re-extract slides whose .h5 already exists")
    parser.add_argument("--lock-stale-after", type=option_type("lock_stale_after"), default=DEFAULT_STALE_AFTER_S,
                        metavar="SECONDS",
                        help="several workers may share --out; take over a slide whose worker on another machine has "
                             f"not refreshed its lock for this long (default {DEFAULT_STALE_AFTER_S:g}; a killed "
                             "worker on this machine at once)")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from slidechat.encoders import load_encoder
    from slidechat.features.extract import expand_slide_inputs, extract_many

    config = ExtractionConfig.from_args(args)
    expand_slide_inputs(args.slides)  # "no slides found" fails fast, before loading the encoder
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2 if args.num_workers else 4)))
    encoder = load_encoder(args.encoder, args.weights, device=args.device)
    bar = tqdm(total=0, unit="patch", file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "encoding":
            if bar.total != total:
                bar.reset(total=total)
            bar.n = done
            bar.refresh()
        else:
            bar.set_description(stage)

    def on_slide(path, status: str, message: str) -> None:
        bar.clear()
        if status == "failed":
            print(f"error: {message}", file=sys.stderr)
        else:
            logging.getLogger("slidechat").info("%s: %s", status, message)
        bar.set_description("")

    summary = extract_many(args.slides, encoder, args.out, config, resume=not args.no_resume,
                           progress=progress, on_slide=on_slide, lock_stale_s=args.lock_stale_after)
    bar.close()
    print(summary.line())
    return 2 if summary.failed else 0
