"""`slidechat synth`: write synthetic slides with ground truth and text products."""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slidechat.synth.dataset import SIZES

    parser.add_argument("--n", type=int, default=8, help="number of slides (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed gives identical files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", choices=list(SIZES), default="tiny", help="slide size (default tiny)")
    parser.add_argument("--lesion-probability", type=float, default=0.75, help="chance a slide has a lesion")
    parser.add_argument("--workers", type=int, default=1, help="JPEG compression threads per slide")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from slidechat.synth.dataset import generate_dataset

    start = time.perf_counter()
    with tqdm(total=args.n, desc="synth", unit="slide", file=sys.stderr, disable=args.n < 2) as bar:
        records = generate_dataset(
            args.out, args.n, args.seed, args.size, lesion_probability=args.lesion_probability,
            workers=args.workers, progress=lambda done, total: bar.update(1),
        )
    n_lesion = sum(r["lesion"] is not None for r in records)
    print(f"wrote {len(records)} {args.size} slides ({n_lesion} with a lesion) to {args.out} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0
