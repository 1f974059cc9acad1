"""Build and start the app: load the model, prepare example slides, queue + launch Gradio."""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from slidechat.app.config import AppConfig
from slidechat.app.examples import example_slides
from slidechat.app.service import ChatService

log = logging.getLogger(__name__)


def load_assistant(checkpoint: str | None) -> tuple[Any, str, str | None]:
    """(assistant, label, banner). ``checkpoint`` None/"demo" = embedded demo, falling back to the untrained
    default model (with a banner saying so) when no demo checkpoint exists yet."""
    import slidechat
    from slidechat.errors import CheckpointError

    if checkpoint in (None, "", "demo"):
        try:
            return slidechat.load("demo"), "demo checkpoint", None
        except CheckpointError as exc:
            log.warning("%s", exc)
            banner = ("No trained checkpoint yet: this is the untrained default model (random slide encoder and "
                      "projector), so answers are not about the slide. Train the demo checkpoint with "
                      "`slidechat train` or start the app with --checkpoint DIR.")
            return slidechat.load("demo-untrained"), "untrained default model", banner
    return slidechat.load(checkpoint), Path(checkpoint).name or str(checkpoint), None


def prepare(assistant: Any, config: AppConfig, with_examples: bool = True):
    """(service, demo): the ChatService for ``assistant`` and its Blocks app (not launched)."""
    from slidechat.app.ui import build_demo

    service = ChatService(assistant, config)
    atexit.register(service.registry.close_all)
    _close_on_sigterm(service)
    examples: dict[str, Path] = {}
    if with_examples and config.n_examples > 0:
        try:
            examples = example_slides(config.examples_dir, n=config.n_examples)
        except Exception:  # examples are a convenience; the app must start without them
            log.exception("could not prepare example slides")
    return service, build_demo(service, examples)


def _close_on_sigterm(service: ChatService) -> None:
    """SIGTERM ends the app like Ctrl-C does: sessions closed, their temp folders removed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def on_term(signum, frame):
        service.registry.close_all()
        service.tiles.close_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def theme():
    """Soft theme with system fonts only: the page makes no request outside this server."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", font=system, font_mono=mono)


def launch(demo, config: AppConfig, tiles, *, block: bool = True, quiet: bool = False):
    """Queue + launch ``demo`` with the config's network, auth, size and concurrency limits; the viewer's
    tile routes (``tiles``: the service's TileServer) are served by the same server."""
    from slidechat.app.routes import gradio_app_with_viewer
    from slidechat.app.ui import CSS, HEAD

    demo.queue(max_size=config.queue_size, default_concurrency_limit=max(4, config.concurrency))
    return demo.launch(
        server_name=config.host,
        server_port=config.port,
        auth=config.auth,
        share=config.share,
        max_file_size=config.max_upload_bytes,
        prevent_thread_lock=not block,
        quiet=quiet,
        show_error=False,
        css=CSS,
        theme=theme(),
        footer_links=[],
        head=HEAD,
        _app=gradio_app_with_viewer(tiles),
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_in_background(assistant: Any, config: AppConfig, examples: dict[str, Path] | None = None):
    """Serve the app from this process without blocking (tests, notebooks); returns (url, demo, service).

    ``config.port`` None picks a free port. Stop it with ``demo.close()`` and ``service.registry.close_all()``.
    """
    from slidechat.app.ui import build_demo

    if config.port is None:
        config.port = free_port(config.host)
    service = ChatService(assistant, config)
    demo = build_demo(service, examples or {})
    launch(demo, config, service.tiles, block=False, quiet=True)
    return f"http://{config.host}:{config.port}/", demo, service
