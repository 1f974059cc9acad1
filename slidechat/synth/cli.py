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
    parser.add_argument("--cases", type=int, default=None, metavar="N",
                        help="write N cases of 2-4 slides each instead of --n single slides (adds cases.csv and "
                             "case-level questions and reports)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from slidechat.synth.dataset import generate_dataset

    start = time.perf_counter()
    if args.cases is not None:
        from slidechat.synth.cases import generate_case_dataset

        with tqdm(desc="synth", unit="slide", file=sys.stderr) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(1)

            cases = generate_case_dataset(args.out, args.cases, args.seed, args.size, workers=args.workers,
                                          progress=progress)
        n_slides = sum(len(c["slide_ids"]) for c in cases)
        print(f"wrote {len(cases)} cases ({n_slides} {args.size} slides) to {args.out} "
              f"in {time.perf_counter() - start:.1f}s")
        return 0
    with tqdm(total=args.n, desc="synth", unit="slide", file=sys.stderr, disable=args.n < 2) as bar:
        records = generate_dataset(
            args.out, args.n, args.seed, args.size, lesion_probability=args.lesion_probability,
            workers=args.workers, progress=lambda done, total: bar.update(1),
        )
    n_lesion = sum(r["lesion"] is not None for r in records)
    print(f"wrote {len(records)} {args.size} slides ({n_lesion} with a lesion) to {args.out} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0
