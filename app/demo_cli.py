"""`slidechat demo`: the browser chat on the embedded demo checkpoint (untrained default model until one exists)."""

from __future__ import annotations

import argparse

from slidechat.app.cli import add_server_arguments, serve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return serve(args, "demo")
