"""Cases: time to first token and peak memory for S = 1, 2, 4, 8 slides in one conversation.

Each slide has N patches (default 2,000, CONCH-sized 512-d features); the model is the default architecture
(SmolLM2-135M frozen, slide encoder + Q-Former, K tokens per slide). A case shows the LLM S x K slide tokens, so
the LLM's share of TTFT and the memory above the loaded model should grow linearly in S, and the slide side
(encoder + projector, once per slide) linearly too. Each S runs in a fresh subprocess (its own peak RSS).

Ratios in one run: ``ttft_S<s>_over_S1`` (wall or 1-thread CPU time) next to S itself, and the least-squares slope
of TTFT and memory in S with the worst relative deviation from the line (``*_linearity_max_dev``, target <= 0.25).

    .venv/bin/python benchmarks/case_ttft.py            # table + benchmarks/results/case_ttft.json + .png
    .venv/bin/python benchmarks/case_ttft.py --slides 1 2 4 --patches 1000 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "Which slide shows the focal lesion?"


def run_case(n_slides: int, n_patches: int, threads: int, repeats: int) -> dict:
    """One measurement in this process (called in a subprocess by ``main``)."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from slidechat.features.store import SlideFeatures
    from slidechat.inference import SlideChat
    from slidechat.model import SlideAssistant
    from slidechat.model.config import SlideAssistantConfig, SlideEncoderConfig

    torch.manual_seed(0)
    model = SlideChat(SlideAssistant(SlideAssistantConfig(encoder=SlideEncoderConfig(feature_dim=512),
                                                          patch_encoder=None), device="cpu").eval())
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n_patches * 1.3)))

    def slide(i: int, r: int) -> SlideFeatures:
        cells = rng.permutation(side * side)[:n_patches]
        return SlideFeatures(features=rng.standard_normal((n_patches, 512)).astype(np.float32),
                             coords=np.stack([cells % side, cells // side], 1).astype(np.int64) * 224,
                             attrs={"slide_id": f"s{i}", "slide_sha256": f"case-bench-{n_slides}-{i}-{r}",
                                    "patch_size_level0": 224})

    runs = []
    for r in range(repeats):
        slides = [slide(i, r) for i in range(n_slides)]
        w0, c0 = time.perf_counter(), time.process_time()
        conv = model.chat(slides if n_slides > 1 else slides[0])
        enc_w, enc_c = time.perf_counter() - w0, time.process_time() - c0
        w1, c1 = time.perf_counter(), time.process_time()
        it = conv.ask(QUESTION, stream=True, max_new_tokens=2)
        next(it, None)
        llm_w, llm_c = time.perf_counter() - w1, time.process_time() - c1
        for _ in it:
            pass
        runs.append({"encode_s": enc_w, "encode_cpu_s": enc_c, "llm_ttft_s": llm_w, "llm_ttft_cpu_s": llm_c,
                     "ttft_s": enc_w + llm_w, "ttft_cpu_s": enc_c + llm_c, "prefill_tokens": conv.last_prefill_tokens})
    out = {"slides": n_slides, "patches_per_slide": n_patches, "threads": threads, "rss_after_load_mb": rss_loaded}
    for key in runs[0]:
        out[key] = min(r[key] for r in runs)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_above_load_mb"] = out["peak_rss_mb"] - rss_loaded
    return out


def _subprocess(n_slides: int, args) -> dict:
    cmd = [sys.executable, __file__, "--_case", str(n_slides), "--patches", str(args.patches),
           "--threads", str(args.threads), "--repeats", str(args.repeats)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"slides": n_slides, "skipped": f"timed out after {args.timeout:.0f} s"}
    if res.returncode != 0:
        return {"slides": n_slides, "skipped": "failed: " + (res.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def linearity(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """(slope, intercept, max |y - fit| / y) of the least-squares line through (xs, ys)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    icpt = my - slope * mx
    dev = max(abs(y - (slope * x + icpt)) / max(abs(y), 1e-12) for x, y in zip(xs, ys))
    return slope, icpt, dev


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--patches", type=int, default=2000, help="patches per slide")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared CPU)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per S (min reported)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "case_ttft.json")
    p.add_argument("--_case", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._case:
        print(json.dumps(run_case(args._case, args.patches, args.threads, args.repeats)))
        return 0
    rows = []
    for s in args.slides:
        t0 = time.time()
        rows.append(_subprocess(s, args))
        print(f"S={s}: {rows[-1].get('ttft_s', rows[-1].get('skipped'))} ({time.time() - t0:.0f} s)", file=sys.stderr)
    ok = [r for r in rows if "ttft_s" in r]
    basis = "_cpu_s" if args.threads == 1 else "_s"
    ratios: dict[str, float] = {}
    one = next((r for r in ok if r["slides"] == 1), None)
    if one:
        for r in ok:
            if r["slides"] != 1:
                ratios[f"ttft_S{r['slides']}_over_S1"] = r["ttft" + basis] / one["ttft" + basis]
                ratios[f"llm_ttft_S{r['slides']}_over_S1"] = r["llm_ttft" + basis] / one["llm_ttft" + basis]
    if len(ok) >= 3:
        xs = [float(r["slides"]) for r in ok]
        for key in ("ttft" + basis, "llm_ttft" + basis, "rss_above_load_mb"):
            slope, icpt, dev = linearity(xs, [r[key] for r in ok])
            name = key.replace(basis, "") if key != "rss_above_load_mb" else "memory"
            ratios[f"{name}_per_slide"] = slope
            ratios[f"{name}_linearity_max_dev"] = dev
    header = f"{'S':>3s} {'LLM tokens':>10s} {'encode s':>9s} {'LLM s':>7s} {'TTFT s':>7s} {'TTFT cpu-s':>10s} {'MB > load':>9s}"
    lines = [f"Case TTFT ({args.patches} patches per slide, {args.threads} thread(s), SmolLM2-135M frozen)", header,
             "-" * len(header)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['slides']:3d}   skipped: {r['skipped']}")
            continue
        lines.append(f"{r['slides']:3d} {r['prefill_tokens']:10d} {r['encode_s']:9.3f} {r['llm_ttft_s']:7.3f} "
                     f"{r['ttft_s']:7.3f} {r['ttft_cpu_s']:10.3f} {r['rss_above_load_mb']:9.0f}")
    lines.append("")
    lines.append(f"ratios on {'process CPU time' if basis == '_cpu_s' else 'wall time'}; min of repeats")
    lines += [f"{k}: {v:.3f}" for k, v in ratios.items()]
    print("\n".join(lines))
    from slidechat.utils.io import write_json_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, {"patches_per_slide": args.patches, "threads": args.threads,
                                 "ratio_basis": "cpu" if basis == "_cpu_s" else "wall", "rows": rows, "ratios": ratios,
                                 "targets": {"*_linearity_max_dev": "<= 0.25"}})
    _plot(ok, args.out.with_suffix(".png"), basis)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}", file=sys.stderr)
    return 0


def _plot(rows: list[dict], path: Path, basis: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    xs = [r["slides"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(xs, [r["ttft" + basis] for r in rows], "o-", label="TTFT (encode + LLM)")
    ax1.plot(xs, [r["llm_ttft" + basis] for r in rows], "s--", label="LLM prefill + first token")
    ax2.plot(xs, [r["rss_above_load_mb"] for r in rows], "o-", label="peak RSS above the loaded model")
    for ax, title, unit in ((ax1, "time to first token", "cpu-s" if basis == "_cpu_s" else "s"),
                            (ax2, "memory", "MB")):
        ax.set_xlabel("slides in the case (S)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.set_xticks(xs)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
