"""``slidechat chat``: chat about a slide, or a case of several (``--slide`` repeated), in the terminal
(interactive, or one shot with ``--question``)."""

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
    parser.add_argument("--slide", required=True, action="append",
                        help="slide file (SVS/TIFF/...) or feature file (.h5 / SlideChat .csv); repeat for the slides "
                             "of one case, asked about together")
    parser.add_argument("--label", action="append", default=None,
                        help="a name for each --slide in order, e.g. 'A1 H&E' (optional)")
    parser.add_argument("--question", "-q", action="append", default=None,
                        help="ask this and exit (repeat for several turns of one conversation)")
    parser.add_argument("--region", default=None, metavar="X,Y,W,H",
                        help="answer from the patches inside this level-0 rectangle only (pixels)")
    parser.add_argument("--region-slide", type=int, default=1, metavar="N",
                        help="in a case, which slide --region is on (1 = the first --slide; default 1)")
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
    if args.region is not None:
        kw["slide"] = args.region_slide - 1
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


def _heatmap_record(heat) -> dict:
    return {"slide_id": heat.slide_id, "patch_size_level0": heat.patch_size_level0, "has_coords": heat.has_coords,
            "coords": heat.coords.tolist(), "scores": [round(float(s), 5) for s in heat.scores],
            "evidence": [r.to_dict() for r in top_regions(heat)]}


def _write_heatmap(conv, path: Path) -> None:
    """One slide: its heatmap record; a case: ``{"slides": [record per slide]}``."""
    from slidechat.utils.io import write_json_atomic

    records = [_heatmap_record(conv.heatmap(slide=i)) for i in range(conv.num_slides)]
    write_json_atomic(path, records[0] if len(records) == 1 else {"slides": records}, indent=None)
    print(f"heatmap: {path}", file=sys.stderr)


def _print_evidence(conv, k: int) -> None:
    for r in conv.evidence(k):
        x, y, w, h = r.box
        where = f" {conv.case.name(r.slide)}:" if conv.num_slides > 1 else ""
        print(f"evidence {r.rank}:{where} x={x} y={y} w={w} h={h} score={r.score:.3f}", file=sys.stderr)


def _open_case(assistant, args):
    from slidechat.errors import SlideChatError
    from slidechat.inference.case import Case

    labels = args.label or []
    if len(labels) > len(args.slide):
        raise SlideChatError(f"--label given {len(labels)} times for {len(args.slide)} --slide")
    if args.region is not None and not 1 <= args.region_slide <= len(args.slide):
        raise SlideChatError(f"--region-slide must be 1..{len(args.slide)} (one per --slide), got {args.region_slide}")
    slides = []
    for i, path in enumerate(args.slide):
        slide = assistant.encode_slide(path, mpp=args.mpp, progress=_progress(), cache_dir=args.cache_dir)
        name = f"slide {i + 1} " if len(args.slide) > 1 else "slide "
        print(f"{name}{slide.slide_id}: {slide.num_patches} patches", file=sys.stderr)
        if slide.ood is not None and slide.ood.flagged:
            print(f"warning: {slide.ood.message}", file=sys.stderr)
        slides.append(slide)
    return Case("", slides, labels)


def run(args: argparse.Namespace) -> int:
    import slidechat

    assistant = slidechat.load(args.checkpoint, device=args.device)
    case = _open_case(assistant, args)
    target = case if len(case) > 1 else case.slides[0]
    if args.report:
        report = assistant.report(target)
        print(report.to_markdown())
        return 0
    conv = assistant.chat(target)
    if args.region is not None:
        args.region = parse_region(args.region)
        # a region without tissue fails here, before any question
        region_conv = conv.region_conversation(args.region, args.region_slide - 1)
        print(f"region {args.region}: {region_conv.slide.num_patches} patches", file=sys.stderr)
    if args.question:
        for q in args.question:
            if len(args.question) > 1:
                print(f"> {q}")
            _answer(conv, q, args)
        shown = conv if args.region is None else conv.region_conversation(args.region, args.region_slide - 1)
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
            print(assistant.report(target).to_markdown())
            continue
        if q.startswith("/heatmap"):
            out = Path(q.split(maxsplit=1)[1]) if " " in q else Path(f"{conv.slide.slide_id}_heatmap.json")
            _write_heatmap(conv, out)
            continue
        _answer(conv, q, args)
    if args.heatmap and conv.messages:
        _write_heatmap(conv, args.heatmap)
    return 0


__all__ = ["add_arguments", "run"]
