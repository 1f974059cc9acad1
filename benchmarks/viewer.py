"""Deep Zoom tile latency of the app's viewer, cold and warm cache, alone and with concurrent sessions panning.

    python benchmarks/viewer.py --slide SLIDE.tiff --out benchmarks/results/viewer.json

``SLIDE`` is e.g. a SynthSlide ``large`` (``slidechat synth --n 1 --size large --out DIR``, ~98k x 82k px).
Cold: each tile requested for the first time (empty tile cache; the pyramid's stored tiles still decode);
warm: the same tiles again. Tiles are drawn the way a pan/zoom visits them: random viewports at random
Deep Zoom levels from the overview down to level 0, every tile of each viewport. Under load: ``--sessions``
HTTP clients on localhost each open the slide under their own token and run a bounded request loop; every
response is checked to be that session's own tile (a tile fetched once per token and compared by bytes).
Writes JSON (latencies in ms under ``p50`` / ``p95``), a Markdown table and a PNG histogram next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path


def viewport_tiles(zoom, rng: random.Random, n_views: int, view_px: tuple[int, int] = (1400, 900)) -> list:
    """(level, col, row) of the tiles that ``n_views`` random viewports at random levels need."""
    out = []
    top = zoom.max_level
    for _ in range(n_views):
        level = rng.randint(max(0, top - 8), top)
        w, h = zoom.level_size(level)
        x = rng.randint(0, max(0, w - view_px[0]))
        y = rng.randint(0, max(0, h - view_px[1]))
        cols, rows = zoom.tile_count(level)
        for col in range(x // zoom.tile_size, min(cols, (x + view_px[0]) // zoom.tile_size + 1)):
            for row in range(y // zoom.tile_size, min(rows, (y + view_px[1]) // zoom.tile_size + 1)):
                out.append((level, col, row))
    return list(dict.fromkeys(out))


def _stats(ms: list[float]) -> dict:
    ms = sorted(ms)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return {"n": len(ms), "p50": round(pick(0.50), 2), "p95": round(pick(0.95), 2), "max": round(ms[-1], 2),
            "mean": round(statistics.fmean(ms), 2)}


def direct_latency(slide: Path, n_views: int, seed: int) -> tuple[dict, dict]:
    """Cold and warm latency of ``TileServer.tile`` (no HTTP)."""
    from slidechat.app.tiles import TileServer

    server = TileServer()
    vs = server.open("bench", slide)
    tiles = viewport_tiles(vs.zoom, random.Random(seed), n_views)
    runs = {}
    for name in ("cold", "warm"):
        ms = []
        for level, col, row in tiles:
            t0 = time.perf_counter()
            server.tile(vs.token, level, col, row)
            ms.append(1000 * (time.perf_counter() - t0))
        runs[name] = ms
    server.close_all()
    return runs["cold"], runs["warm"]


def under_load(slide: Path, sessions: int, requests: int, seed: int, ask: int) -> dict:
    """``sessions`` clients panning over HTTP while ``ask`` of them also ask questions (demo checkpoint)."""
    import httpx

    import slidechat
    from slidechat.app.config import AppConfig
    from slidechat.app.server import start_in_background

    import tempfile

    cache = Path(tempfile.mkdtemp(prefix="slidechat-bench-"))
    url, demo, service = start_in_background(slidechat.load("demo"), AppConfig(cache_dir=cache, port=None,
                                             max_new_tokens=24, n_examples=0))
    base = url.rstrip("/")
    tile_ms: list[float] = []
    answer_s: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    opened = []
    for i in range(sessions):
        session = service.registry.get(f"bench-{i}")
        opened.append((session, service.open_viewer(session, slide)))

    def pan(i: int) -> None:
        session, vs = opened[i]
        rng = random.Random(seed + i)
        tiles = viewport_tiles(vs.zoom, rng, 40)[:requests]
        with httpx.Client(timeout=60) as client:
            own = client.get(f"{base}{vs.base_url}/slide_files/{vs.zoom.max_level - 8}/0_0.jpeg").content
            for level, col, row in tiles:
                t0 = time.perf_counter()
                r = client.get(f"{base}{vs.base_url}/slide_files/{level}/{col}_{row}.jpeg")
                dt = 1000 * (time.perf_counter() - t0)
                with lock:
                    tile_ms.append(dt)
                    if r.status_code != 200:
                        errors.append(f"session {i}: HTTP {r.status_code}")
            again = client.get(f"{base}{vs.base_url}/slide_files/{vs.zoom.max_level - 8}/0_0.jpeg").content
            if again != own:
                errors.append(f"session {i}: tile changed under load")

    def chat(i: int) -> None:
        session, _ = opened[i]
        try:
            service.open_slide(session, slide)
            for q in ("Which tissue types are present in this slide?", "Is there tumour? Where?"):
                t0 = time.perf_counter()
                list(service.ask(session, q))
                answer_s.append(time.perf_counter() - t0)
                if session.transcript[-2]["content"] != q:
                    errors.append(f"session {i}: transcript crossed")
        except Exception as exc:  # reported, not raised: the benchmark counts errors
            errors.append(f"session {i}: {type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=pan, args=(i,)) for i in range(sessions)]
    threads += [threading.Thread(target=chat, args=(i,)) for i in range(min(ask, sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = {vs.token for _, vs in opened}
    demo.close()
    service.registry.close_all()
    return {"sessions": sessions, "asking": min(ask, sessions), "tile_ms": _stats(tile_ms) if tile_ms else {},
            "answer_s": _stats(answer_s) if answer_s else {}, "errors": errors, "distinct_tokens": len(tokens),
            "wall_s": round(wall, 1)}


def write_outputs(out: Path, result: dict, cold: list[float], warm: list[float]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    rows = ["| run | tiles | p50 ms | p95 ms | max ms |", "|---|---|---|---|---|"]
    for name in ("cold", "warm"):
        s = result[name]
        rows.append(f"| {name} | {s['n']} | {s['p50']} | {s['p95']} | {s['max']} |")
    load = result.get("load")
    if load and load.get("tile_ms"):
        s = load["tile_ms"]
        rows.append(f"| {load['sessions']} sessions panning, {load['asking']} asking | {s['n']} | {s['p50']} | "
                    f"{s['p95']} | {s['max']} |")
        if load.get("answer_s"):
            rows.append(f"\nanswer p50 {load['answer_s']['p50']} s, p95 {load['answer_s']['p95']} s under load; "
                        f"errors: {len(load['errors'])}")
    out.with_suffix(".md").write_text("\n".join(rows) + "\n", encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist([cold, warm], bins=40, label=["cold", "warm"], log=True)
        ax.set_xlabel("tile latency (ms)")
        ax.set_ylabel("tiles")
        ax.set_title(f"Deep Zoom tiles, {result['slide_size'][0]:,} x {result['slide_size'][1]:,} px")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", required=True, help="slide to serve (e.g. a SynthSlide large)")
    parser.add_argument("--out", required=True, help="JSON output; .md and .png are written next to it")
    parser.add_argument("--views", type=int, default=60, help="random viewports visited (default 60)")
    parser.add_argument("--sessions", type=int, default=10, help="concurrent panning sessions (0: skip)")
    parser.add_argument("--requests", type=int, default=60, help="tile requests per panning session")
    parser.add_argument("--ask", type=int, default=2, help="of the sessions, how many also ask questions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from slidechat.slide.reader import SlideReader

    slide = Path(args.slide)
    with SlideReader(slide) as reader:
        size = reader.dimensions
    cold, warm = direct_latency(slide, args.views, args.seed)
    result = {"slide": slide.name, "slide_size": list(size), "cold": _stats(cold), "warm": _stats(warm),
              "p50": _stats(cold)["p50"], "p95": _stats(cold)["p95"]}
    if args.sessions > 0:
        result["load"] = under_load(slide, args.sessions, args.requests, args.seed, args.ask)
    write_outputs(Path(args.out), result, cold, warm)
    print(Path(args.out).with_suffix(".md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
