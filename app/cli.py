"""`slidechat app`: the browser chat application (Gradio)."""

from __future__ import annotations

import argparse
import logging

from slidechat.errors import ConfigError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint folder (default: the embedded demo checkpoint, or the untrained model "
                             "when there is none yet)")
    add_server_arguments(parser)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Network, limits and caches (shared by `slidechat app` and `slidechat demo`)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    parser.add_argument("--max-upload-mb", type=float, default=2048.0, help="largest upload accepted (default 2048)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="model calls (encode/answer/report) running at once; others wait in the queue (default 1)")
    parser.add_argument("--queue-size", type=int, default=64, help="waiting requests before 'queue full' (default 64)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--cache-dir", default=None,
                        help="features + example slides (default $SLIDECHAT_CACHE_DIR or ~/.cache/slidechat)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-examples", action="store_true", help="do not generate the example synthetic slides")


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth must look like USER:PASS (both non-empty)")
    return user, password


def config_from_args(args: argparse.Namespace):
    from slidechat.app.config import AppConfig

    if args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    if args.max_upload_mb <= 0:
        raise ConfigError("--max-upload-mb must be positive")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a valid port")
    config = AppConfig(host=args.host, port=args.port, auth=parse_auth(args.auth), share=bool(args.share),
                       max_upload_mb=args.max_upload_mb, concurrency=args.concurrency, queue_size=args.queue_size,
                       max_new_tokens=args.max_new_tokens, n_examples=0 if args.no_examples else 2)
    if args.cache_dir:
        from pathlib import Path

        config.cache_dir = Path(args.cache_dir).expanduser()
    return config


def serve(args: argparse.Namespace, checkpoint: str | None) -> int:
    """Load the model, build the page and serve until interrupted."""
    from slidechat.app.server import launch, load_assistant, prepare

    config = config_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.auth is None:
        log.warning("serving on %s without --auth: anyone who can reach this port can use the app", config.host)
    assistant, label, banner = load_assistant(checkpoint)
    config.checkpoint_label, config.banner = label, banner
    service, demo = prepare(assistant, config, with_examples=config.n_examples > 0)
    log.info("SlideChat app on http://%s:%s (Ctrl-C to stop)", config.host, config.port)
    launch(demo, config, service.tiles, block=True, quiet=not config.share)  # our line above says where it runs
    return 0


def run(args: argparse.Namespace) -> int:
    return serve(args, args.checkpoint)
