"""`slidechat train --recipe training/recipes/<name>.yaml [--resume] [--set key=value ...]`.

The same entry point runs under ``accelerate launch -m slidechat.training --recipe ...`` for multi-GPU / multi-node
(DeepSpeed / FSDP configs in training/configs/).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from slidechat.errors import SlideChatError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="YAML recipe: a stage (0/1/2) or a pipeline (demo.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the recipe's output_dir (exact: RNG + data order)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.lr=1e-4 --set stages.1.train.max_steps=10")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop a stage after this many optimizer steps (smoke test; resumable)")


def run(args: argparse.Namespace) -> int:
    from slidechat.training.recipe import PipelineRecipe, load_recipe

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    recipe = load_recipe(args.recipe, overrides)
    if isinstance(recipe, PipelineRecipe):
        from slidechat.training.pipeline import run_pipeline

        summary = run_pipeline(recipe, resume=args.resume)
    else:
        from slidechat.training.loop import train_stage

        summary = train_stage(recipe, resume=args.resume, stop_after=args.stop_after)
        summary.pop("model", None)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m slidechat.training`` / ``accelerate launch -m slidechat.training``)."""
    parser = argparse.ArgumentParser(prog="python -m slidechat.training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return run(args)
    except SlideChatError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
