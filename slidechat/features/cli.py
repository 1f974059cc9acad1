"""`slidechat extract`: slides -> TRIDENT/CLAM-style feature .h5 files (resumable, bad slides skipped)."""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", help="slide files, folders, globs, or CSVs with a slide_path column")
    parser.add_argument("--encoder", default="demo-cnn",
                        help="demo-cnn | timm:<arch> | open_clip:<arch> | uni | conch (default demo-cnn)")
    parser.add_argument("--weights", default=None, help="local weights file or folder for the encoder")
    parser.add_argument("--out", required=True, help="output folder for <slide_id>.h5 files")
    parser.add_argument("--mpp", type=float, default=None, help="microns per pixel, for slides without it")
    parser.add_argument("--target-mpp", type=float, default=0.5, help="patch resolution in µm/px (default 0.5 ≈ 20x)")
    parser.add_argument("--patch-size", type=int, default=224, help="patch size in px at --target-mpp (default 224)")
    parser.add_argument("--batch-size", type=int, default=64, help="patches per encoder batch (default 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="reader processes (default 2; 0 = main process)")
    parser.add_argument("--reader", choices=["processes", "threads"], default="processes",
                        help="read patches in DataLoader worker processes (default) or threads")
    parser.add_argument("--tissue-threshold", type=float, default=None,
                        help="saturation threshold 0-1 for tissue (default: Otsu)")
    parser.add_argument("--device", default="cpu", help="torch device for the encoder (default cpu)")
    parser.add_argument("--no-resume", action="store_true", help="re-extract slides whose .h5 already exists")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from slidechat.encoders import load_encoder
    from slidechat.features.extract import expand_slide_inputs, extract_many

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

    summary = extract_many(
        args.slides, encoder, args.out, resume=not args.no_resume, target_mpp=args.target_mpp,
        patch_size=args.patch_size, batch_size=args.batch_size, num_workers=args.num_workers, mpp=args.mpp,
        tissue_threshold=args.tissue_threshold, progress=progress, on_slide=on_slide, reader_mode=args.reader,
    )
    bar.close()
    print(summary.line())
    return 2 if summary.failed else 0
