"""The `slidechat` console entry point.

Each subcommand lives in the module that owns its work and exposes two functions:
`add_arguments(parser)` and `run(args) -> int`. This file only wires them together, so
`slidechat X --help` never imports torch for the other subcommands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from slidechat.errors import SlideChatError

# name -> (module implementing add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("slidechat.synth.cli", "make synthetic H&E-like pyramidal TIFF slides with ground truth"),
    "extract": ("slidechat.features.cli", "tile slides and encode patches into TRIDENT/CLAM-style .h5 files"),
    "chat": ("slidechat.inference.cli", "chat about a slide in the terminal"),
    "report": ("slidechat.inference.report_cli", "batch report generation over many slides (JSONL + HTML)"),
    "eval": ("slidechat.evaluation.cli", "benchmark evaluation: closed VQA, captioning, retrieval, grounding"),
    "train": ("slidechat.training.cli", "staged training with accelerate (stage 0/1/2 recipes)"),
    "app": ("slidechat.app.cli", "the browser chat application (Gradio)"),
    "demo": ("slidechat.app.demo_cli", "open the browser chat on the embedded demo model"),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    return importlib.import_module(module_name)


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes print one line (what is wrong and where the help is) and exit 2, like every user error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="slidechat", description="Chat with pathology whole-slide images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            _load(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    # libgomp reads this when torch loads (the user's own setting wins): idle OpenMP workers that busy-wait
    # steal a shared or oversubscribed core from the next tiny parallel region of a decode step — measured
    # 5-25x slower generation on a loaded 2-core machine, no measurable cost on an idle one.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not args.verbose:  # the web stack logs every local request at INFO; that is not news to a user
        for name in ("httpx", "httpcore", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 0
    module = _load(args.command)
    try:
        return int(module.run(args) or 0)
    except SlideChatError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
