"""``slidechat chat``: chat about a slide in the terminal (interactive, or one shot with ``--question``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slidechat import prompts
from slidechat.inference.evidence import top_regions
from slidechat.inference.region import parse_region


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="demo",
                        help="checkpoint folder, 'demo' (embedded) or 'demo-untrained' (default: demo)")
    parser.add_argument("--slide", required=True, help="slide file (SVS/TIFF/...) or feature file (.h5 / SlideChat .csv)")
    parser.add_argument("--question", "-q", action="append", default=None,
                        help="ask this and exit (repeat for several turns of one conversation)")
    parser.add_argument("--region", default=None, metavar="X,Y,W,H",
                        help="answer from the patches inside this level-0 rectangle only (pixels)")
    parser.add_argument("--evidence", type=int, default=0, metavar="K",
                        help="after the last answer, print the K most attended regions (level-0 boxes) to stderr")
    parser.add_argument("--report", action="store_true", help="print the structured report and exit")
    parser.add_argument("--heatmap", type=Path, default=None,
                        help="after the last answer, write the per-patch heatmap (JSON: coords, scores) here")
    parser.add_argument("--mpp", type=float, default=None, help="microns per pixel, for slides without it")
    parser.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default ~/.cache/slidechat/features)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--no-stream", action="store_true", help="print each answer when complete")


def _progress():
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="", leave=False, file=sys.stderr)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def _answer(conv, question: str, args, out=None) -> str:
    out = out or sys.stdout  # looked up per call: sys.stdout may be replaced after import
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, region=args.region)
    if args.no_stream:
        text = conv.ask(question, **kw)
        print(text, file=out)
        return text
    pieces = []
    for piece in conv.ask(question, stream=True, **kw):
        pieces.append(piece)
        print(piece, end="", file=out, flush=True)
    print(file=out)
    return "".join(pieces)


def _write_heatmap(conv, path: Path) -> None:
    from slidechat.utils.io import write_json_atomic

    heat = conv.heatmap()
    write_json_atomic(path, {"slide_id": heat.slide_id, "patch_size_level0": heat.patch_size_level0,
                             "has_coords": heat.has_coords, "coords": heat.coords.tolist(),
                             "scores": [round(float(s), 5) for s in heat.scores],
                             "evidence": [r.to_dict() for r in top_regions(heat)]}, indent=None)
    print(f"heatmap: {path}", file=sys.stderr)


def _print_evidence(conv, k: int) -> None:
    for r in conv.evidence(k):
        x, y, w, h = r.box
        print(f"evidence {r.rank}: x={x} y={y} w={w} h={h} score={r.score:.3f}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import slidechat

    assistant = slidechat.load(args.checkpoint, device=args.device)
    slide = assistant.encode_slide(args.slide, mpp=args.mpp, progress=_progress(), cache_dir=args.cache_dir)
    print(f"slide {slide.slide_id}: {slide.num_patches} patches", file=sys.stderr)
    if args.report:
        report = assistant.report(slide)
        print(report.to_markdown())
        return 0
    conv = assistant.chat(slide)
    if args.region is not None:
        args.region = parse_region(args.region)
        region_conv = conv.region_conversation(args.region)  # a region without tissue fails here, before any question
        print(f"region {args.region}: {region_conv.slide.num_patches} patches", file=sys.stderr)
    if args.question:
        for q in args.question:
            if len(args.question) > 1:
                print(f"> {q}")
            _answer(conv, q, args)
        shown = conv if args.region is None else conv.region_conversation(args.region)
        if args.heatmap:
            _write_heatmap(shown, args.heatmap)
        if args.evidence:
            _print_evidence(shown, args.evidence)
        return 0
    print(prompts.CHAT_GREETING, file=sys.stderr)
    while True:
        try:
            q = input("> ").strip()
        except EOFError:
            break
        if not q or q in ("/quit", "/exit"):
            break
        if q == "/reset":
            conv.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if q == "/report":
            print(assistant.report(slide).to_markdown())
            continue
        if q.startswith("/heatmap"):
            target = Path(q.split(maxsplit=1)[1]) if " " in q else Path(f"{slide.slide_id}_heatmap.json")
            _write_heatmap(conv, target)
            continue
        _answer(conv, q, args)
    if args.heatmap and conv.messages:
        _write_heatmap(conv, args.heatmap)
    return 0


__all__ = ["add_arguments", "run"]
