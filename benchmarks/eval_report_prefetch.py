"""Batch reports: does encoding slide i+1 in the background while generating for slide i pay off?

Runs `slidechat report`'s ``run_batch`` three times in this process over the same fresh SynthSlide slides,
each with its own empty feature cache (so every run tiles + encodes every slide): sequential with the
default DataLoader-process tile reader, sequential with the thread reader (what the prefetch thread uses,
so the overlap is isolated), and with the prefetch thread. Prints wall time per slide and ratios against
the first row (baseline in the same run).

OpenMP wait policy: by default the benchmark sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads. With
libgomp's default (spin up to GOMP_SPINCOUNT before sleeping) on oversubscribed cores (the shared 2-core
machine), the main thread's idle OpenMP worker busy-waits between the many tiny parallel regions of a decode
step and steals the core the next region needs: generation in the main thread runs 5-25x slower. libgomp
throttles that spin when more OpenMP threads exist than CPUs, which is exactly what the prefetch thread's
own team causes, so under the default policy "prefetch" looked 4-7x faster for a reason that has nothing to
do with overlapping the encoding. ``--omp-wait-policy default`` reproduces that (confounded) comparison.

    .venv/bin/python benchmarks/eval_report_prefetch.py                         # demo-untrained (SmolLM2)
    .venv/bin/python benchmarks/eval_report_prefetch.py --checkpoint DIR --n-slides 6 --size small
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="demo-untrained")
    ap.add_argument("--n-slides", type=int, default=4)
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "medium", "large"])
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="benchmarks/results/eval_report_prefetch.json")
    ap.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "default"],
                    help="OMP_WAIT_POLICY for this run (set before torch loads; see the module docstring)")
    args = ap.parse_args(argv)

    if "torch" in sys.modules and args.omp_wait_policy != "default":
        raise SystemExit("--omp-wait-policy must be set before torch is imported; run this file as a script")
    if args.omp_wait_policy == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    import torch

    torch.set_num_threads(args.threads)
    from slidechat.inference.batch_report import BatchReportConfig, run_batch
    from slidechat.synth import generate_dataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_dataset(tmp / "synth", n=args.n_slides, seed=1, size=args.size)
        slides = str(tmp / "synth" / "slides")
        # warm-up: load the model weights into the page cache and JIT paths (not timed)
        run_batch(BatchReportConfig(inputs=[slides], out_dir=str(tmp / "warm"), checkpoint=args.checkpoint,
                                    cache_dir=str(tmp / "warm_cache"), max_new_tokens=2, summary_max_new_tokens=2,
                                    progress=False, device=args.device))
        for tag, prefetch, threads in (("sequential", False, False), ("seq-threads", False, True),
                                       ("prefetch", True, True)):
            t0 = time.perf_counter()
            counts = run_batch(BatchReportConfig(
                inputs=[slides], out_dir=str(tmp / tag), checkpoint=args.checkpoint, cache_dir=str(tmp / f"cache_{tag}"),
                max_new_tokens=args.max_new_tokens, summary_max_new_tokens=args.max_new_tokens, progress=False,
                prefetch=prefetch, thread_reader=threads, device=args.device))
            wall = time.perf_counter() - t0
            recs = [json.loads(line) for line in (tmp / tag / "reports.jsonl").read_text().splitlines()]
            enc = sum(r["timing"].get("encode_s", 0) for r in recs)
            gen = sum(r["timing"].get("report_s", 0) + r["timing"].get("heatmap_s", 0) for r in recs)
            wait = sum(r["timing"].get("prefetch_wait_s", 0) for r in recs)
            rows.append({"mode": tag, "slides": counts["ok_total"], "wall_s": wall, "per_slide_s": wall / len(recs),
                         "encode_s": enc, "generate_s": gen, "waiting_for_features_s": wait})
    base = rows[0]["wall_s"]
    print(f"{'mode':<11} {'slides':>6} {'wall s':>8} {'s/slide':>8} {'encode s':>9} {'generate s':>10} "
          f"{'wait s':>7} {'speed-up':>8}")
    for r in rows:
        r["speedup_vs_sequential"] = base / r["wall_s"]
        print(f"{r['mode']:<11} {r['slides']:>6} {r['wall_s']:>8.1f} {r['per_slide_s']:>8.2f} {r['encode_s']:>9.1f} "
              f"{r['generate_s']:>10.1f} {r['waiting_for_features_s']:>7.1f} {r['speedup_vs_sequential']:>7.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "torch_threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "loadavg_1m_after": os.getloadavg()[0]}
    out.write_text(json.dumps({"args": vars(args), "env": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
