"""The app's functions (app.service / app.session / app.export / app CLIs) on a tiny random model that really
tiles and encodes SynthSlide files: open -> stream answers -> heatmap -> report -> downloads; bad uploads;
session isolation and clean-up; the feature cache."""

from __future__ import annotations

import argparse
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from slidechat.app.config import AppConfig
from slidechat.app.service import ChatService, UploadTooLargeError, safe_filename
from slidechat.app.session import SessionBusyError, SessionRegistry
from slidechat.errors import ConfigError, MissingMppError, NoTissueError, SlideChatError, SlideReadError
from slidechat.utils.io import read_jsonl


@pytest.fixture(scope="module")
def slides(synth_dataset) -> list[Path]:
    return [synth_dataset / r["path"] for r in read_jsonl(synth_dataset / "truth.jsonl")]


@pytest.fixture(scope="module")
def app_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app_cache")


def make_config(cache: Path, **kw) -> AppConfig:
    base = dict(cache_dir=cache, max_new_tokens=10, report_max_new_tokens=4, report_summary_tokens=8, n_examples=0)
    base.update(kw)
    return AppConfig(**base)


@pytest.fixture(scope="module")
def service(tiny_slide_assistant, app_cache, tmp_path_factory):
    svc = ChatService(tiny_slide_assistant, make_config(app_cache),
                      SessionRegistry(tmp_path_factory.mktemp("sessions"), max_sessions=8))
    yield svc
    svc.registry.close_all()


@pytest.fixture(scope="module")
def opened(service, slides):
    """A session with slide 0 open (encoded once for the module), plus the progress events seen."""
    events: list[tuple[str, int, int]] = []
    session = service.registry.get("opened")
    summary = service.open_slide(session, slides[0], display_name="case-0.tiff",
                                 progress=lambda s, d, t: events.append((s, d, t)))
    return session, summary, events


# ---------------------------------------------------------------- happy path
def test_open_slide_shows_progress_thumbnail_outline_and_facts(opened):
    session, summary, events = opened
    stages = [s for s, _, _ in events]
    assert stages[0] == "tissue" and "tiling" in stages and "encoding" in stages
    assert stages.index("tiling") < stages.index("encoding")
    enc = [(d, t) for s, d, t in events if s == "encoding"]
    assert enc[-1][0] == enc[-1][1] == summary.num_patches > 10  # counts reach the patch total
    assert not summary.cached
    facts = session.info
    assert facts["slide"] == "case-0.tiff" and facts["patches"] == summary.num_patches
    assert facts["mpp (µm/px)"] == "0.500" and facts["vendor"] and "×" in facts["size (px)"]
    assert session.thumbnail.size[0] <= 1024 and session.outlined.size == session.thumbnail.size
    diff = np.abs(np.asarray(session.outlined, int) - np.asarray(session.thumbnail, int)).sum(-1)
    assert 0 < (diff > 0).mean() < 0.2  # an outline was drawn, not a fill


def test_ask_streams_multi_turn_and_heatmap_follows_the_answer(service, opened):
    session, summary, _ = opened
    service.clear_chat(session)
    assert service.slide_image(session, True, 0.5) is session.outlined  # no answer yet: no heatmap
    pieces = list(service.ask(session, "Which tissue types are present?"))
    assert len(pieces) >= 2 and all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))  # growing text
    assert [m["role"] for m in session.transcript] == ["user", "assistant"]
    assert session.transcript[1]["content"] == pieces[-1].strip()
    hm = session.heatmap
    assert hm.scores.shape == (summary.num_patches,) and hm.coords.shape == (summary.num_patches, 2)
    assert 0.0 <= hm.scores.min() and hm.scores.max() <= 1.0
    over = service.slide_image(session, True, 0.6)
    assert over.size == session.outlined.size and np.asarray(over).tolist() != np.asarray(session.outlined).tolist()
    assert service.slide_image(session, False, 0.6) is session.outlined
    list(service.ask(session, "Is there a focal lesion?"))
    assert [m["content"] for m in session.transcript if m["role"] == "user"] == [
        "Which tissue types are present?", "Is there a focal lesion?"]
    assert len(session.conversation.messages) == 4  # the model's own multi-turn memory
    path = service.export_conversation(session)
    record = json.loads(path.read_text())
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "user", "assistant"]
    assert record["slide"]["slide"] == "case-0.tiff" and path.parent.parent == session.workdir
    service.clear_chat(session)
    assert session.transcript == [] and session.conversation.messages == [] and session.heatmap is None


def test_bad_questions_are_refused_with_a_message(service, opened):
    session, _, _ = opened
    with pytest.raises(SlideChatError, match="empty"):
        list(service.ask(session, "   "))
    with pytest.raises(SlideChatError, match="characters"):
        list(service.ask(session, "x" * (service.config.max_question_chars + 1)))
    with pytest.raises(SlideChatError, match="open a slide first"):
        list(service.ask(service.registry.get("no-slide-yet"), "hello?"))
    with pytest.raises(SlideChatError, match="ask a question first"):
        service.export_conversation(service.registry.get("no-slide-yet"))


def test_report_markdown_json_and_html(service, opened):
    session, _, _ = opened
    markdown, json_path, html_path = service.make_report(session, note="untrained model")
    assert "| field | value |" in markdown and "tissue types" in markdown
    data = json.loads(json_path.read_text())
    assert set(data["fields"]) >= {"tissue_types", "lesion_present", "tumor_fraction_percent", "summary"}
    assert data["slide"]["patches"] == session.info["patches"]
    page = html_path.read_text()
    assert page.startswith("<!doctype html>") and "<table>" in page and "data:image/jpeg;base64," in page
    assert "untrained model" in page and "case-0.tiff" in page


def test_feature_cache_reused_by_sha256_across_sessions(service, opened, slides, tmp_path):
    _, first, _ = opened
    copy = tmp_path / "renamed-copy.tiff"
    copy.write_bytes(slides[0].read_bytes())  # same bytes, other name: same sha256
    events: list = []
    other = service.registry.get("cache-check")
    t0 = time.perf_counter()
    summary = service.open_slide(other, copy, progress=lambda s, d, t: events.append(s))
    assert summary.cached and "encoding" not in events
    assert summary.num_patches == first.num_patches
    assert time.perf_counter() - t0 < first.seconds
    h5s = list(Path(service.config.features_dir).rglob("*.h5"))
    assert len(h5s) == 1 and h5s[0].stem == other.slide.sha256
    service.registry.close("cache-check")


# ---------------------------------------------------------------- bad uploads
def _tiff(path: Path, rgb: np.ndarray, mpp: float | None = 0.5) -> Path:
    kw = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    tifffile.imwrite(path, rgb, tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None, **kw)
    return path


def _bomb(path: Path, side: int = 100_000) -> Path:
    """A tiny file whose header claims a 10-gigapixel single-strip image."""
    blob = zlib.compress(b"\0" * 1024)
    entries = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 0), (277, 3, 1),
               (278, 4, side), (279, 4, len(blob))]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, typ, value in entries:
        value = data_offset if tag == 273 else value
        out += struct.pack("<HHIHH", tag, typ, 1, value, 0) if typ == 3 else struct.pack("<HHII", tag, typ, 1, value)
    path.write_bytes(bytes(out + struct.pack("<I", 0) + blob))
    return path


def _bad_files(tmp: Path, good: Path) -> dict[str, tuple[Path, type, str]]:
    text = tmp / "notes.svs"
    text.write_text("this is not a slide\n" * 20)
    png = tmp / "photo.ndpi"
    Image.new("RGB", (64, 64), (200, 100, 150)).save(png, format="PNG")
    truncated = tmp / "cut.tiff"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    blank = _tiff(tmp / "blank.tiff", np.full((1024, 1024, 3), 245, np.uint8))
    with tifffile.TiffFile(good) as tf:
        crop = tf.pages[0].asarray()[:1024, 1024:2048]
    nompp = _tiff(tmp / "nompp.tiff", np.ascontiguousarray(crop), mpp=None)
    return {
        "text": (text, SlideReadError, "text file"),
        "png": (png, SlideReadError, "PNG"),
        "truncated": (truncated, SlideReadError, "truncated"),
        "bomb": (_bomb(tmp / "bomb.tif"), SlideReadError, "decompression bomb"),
        "no tissue": (blank, NoTissueError, "no tissue"),
        "no mpp": (nompp, MissingMppError, "mpp"),
    }


def test_bad_uploads_give_clear_messages_and_the_app_keeps_working(service, slides, tmp_path):
    session = service.registry.get("bad-uploads")
    for label, (path, error, needle) in _bad_files(tmp_path, slides[1]).items():
        uploaded = tmp_path / "gradio-tmp" / path.name  # as Gradio hands it over: a temp file to move
        uploaded.parent.mkdir(exist_ok=True)
        uploaded.write_bytes(path.read_bytes())
        moved = service.ingest_upload(session, uploaded, path.name)
        assert moved.parent.parent == session.workdir and not uploaded.exists()
        with pytest.raises(error) as info:
            service.open_slide(session, moved, display_name=path.name)
        message = str(info.value)
        assert needle.lower() in message.lower(), (label, message)
        assert str(session.workdir) not in message and path.name in message  # user's name, no server path
        assert session.slide is None and session.busy is None, label
        assert "--mpp" not in message  # the app's own wording (Advanced field), not the CLI flag
    # the slide without mpp opens when the user gives one
    (tmp_path / "again").mkdir()
    nompp = _bad_files(tmp_path / "again", slides[1])["no mpp"][0]
    assert service.open_slide(session, nompp, mpp=0.5).num_patches > 0
    # over the size limit: refused before anything is read, the temp file is removed
    small = ChatService(service.assistant, make_config(service.config.cache_dir, max_upload_mb=0.001), service.registry)
    big = tmp_path / "big.svs"
    big.write_bytes(b"II*\x00" + b"\0" * 4096)
    with pytest.raises(UploadTooLargeError, match="upload limit"):
        small.ingest_upload(session, big, "big.svs")
    assert not big.exists()
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SlideReadError, match="empty"):
        service.ingest_upload(session, empty, "empty.svs")


# ---------------------------------------------------------------- sessions
def test_sessions_are_isolated_and_cleaned_up(service, slides, tmp_path):
    reg = service.registry
    a, b = reg.get("tab-a"), reg.get("tab-b")
    assert a is not b and a.workdir != b.workdir and reg.get("tab-a") is a
    service.open_slide(a, slides[0], display_name="A.tiff")
    service.open_slide(b, slides[1], display_name="B.tiff")
    list(service.ask(a, "question for A"))
    assert b.transcript == [] and a.info["slide"] == "A.tiff" and b.info["slide"] == "B.tiff"
    assert a.conversation is not b.conversation and b.conversation.messages == []
    upload = tmp_path / "up.tiff"
    upload.write_bytes(slides[0].read_bytes())
    moved = service.ingest_upload(b, upload, "../../etc/passwd")  # a hostile name stays inside the session dir
    assert moved.parent == b.workdir / "upload" and moved.name == "passwd"
    assert reg.close("tab-b") and not b.workdir.exists() and "tab-b" not in reg
    assert a.workdir.exists() and reg.close("tab-b") is False
    with a.task("answering"):
        with pytest.raises(SessionBusyError, match="still answering"):
            list(service.ask(a, "second question while busy"))
    assert a.busy is None
    reg.close("tab-a")


def test_registry_expires_idle_sessions_and_caps_their_number(tmp_path):
    reg = SessionRegistry(tmp_path / "root", max_sessions=2, ttl_s=3600)
    s1, s2 = reg.get("one"), reg.get("two")
    (s1.workdir / "upload").mkdir()
    s1.last_used -= 10  # least recently used
    reg.get("three")  # over capacity: "one" is evicted and its folder deleted
    assert "one" not in reg and not s1.workdir.exists() and len(reg) == 2
    s2.last_used -= 7200
    assert reg.sweep() == 1 and "two" not in reg and not s2.workdir.exists()
    reg.close_all()
    assert len(reg) == 0 and (tmp_path / "root").exists()  # a root it did not create is kept
    own = SessionRegistry()
    own.get("x")
    root = own.root
    own.close_all()
    assert not root.exists()


def test_safe_filename():
    assert safe_filename("../../a b/c?.svs") == "c_.svs"
    assert safe_filename("") == "slide" and safe_filename("...") == "slide"


# ---------------------------------------------------------------- CLIs and start-up
def _args(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_arguments_and_defaults():
    from slidechat.app import cli, demo_cli

    args = _args(cli, [])
    config = cli.config_from_args(args)
    assert config.host == "127.0.0.1" and config.port == 7860 and config.share is False and config.auth is None
    assert args.checkpoint is None and config.concurrency == 1
    args = _args(cli, ["--checkpoint", "ckpt", "--auth", "ann:s3cret", "--max-upload-mb", "5", "--concurrency", "2",
                       "--port", "8111", "--share"])
    config = cli.config_from_args(args)
    assert config.auth == ("ann", "s3cret") and config.max_upload_bytes == 5 * 1024 * 1024 and config.share
    assert config.concurrency == 2 and config.port == 8111
    for bad in (["--auth", "nopassword"], ["--concurrency", "0"], ["--max-upload-mb", "0"], ["--port", "70000"]):
        with pytest.raises(ConfigError):
            cli.config_from_args(_args(cli, bad))
    assert not hasattr(_args(demo_cli, []), "checkpoint")


def test_demo_falls_back_to_the_untrained_model_with_a_banner(monkeypatch):
    """Only the start-up logic is under test here: which name is loaded and what the page says."""
    import slidechat
    from slidechat.app.server import load_assistant
    from slidechat.errors import CheckpointError

    calls = []

    def fake_load(name, **kw):
        calls.append(name)
        if name == "demo":
            raise CheckpointError("no demo checkpoint yet")
        return f"model:{name}"

    monkeypatch.setattr(slidechat, "load", fake_load)
    assistant, label, banner = load_assistant("demo")
    assert calls == ["demo", "demo-untrained"] and assistant == "model:demo-untrained"
    assert "No trained checkpoint yet" in banner and "untrained" in label
    assert load_assistant("/some/ckpt")[2] is None and calls[-1] == "/some/ckpt"


def test_example_slides_generated_once(tmp_path):
    from slidechat.app.examples import example_slides

    first = example_slides(tmp_path, n=1)
    assert len(first) == 1 and all(p.is_file() for p in first.values())
    label = next(iter(first))
    assert label.startswith("Synthetic example 1")
    mtime = next(iter(first.values())).stat().st_mtime
    again = example_slides(tmp_path, n=1)
    assert again == first and next(iter(again.values())).stat().st_mtime == mtime


def test_build_demo_wires_named_endpoints(service):
    from slidechat.app.ui import build_demo

    demo = build_demo(service, {})
    names = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    assert {"upload_slide", "open_example", "ask", "report", "clear", "restart", "view"} <= names
    limited = [fn for fn in demo.fns.values() if fn.api_name in ("upload_slide", "open_example", "ask", "report")]
    assert all(fn.concurrency_id == "model" and fn.concurrency_limit == service.config.concurrency for fn in limited)


def _wait_http(url: str, proc, timeout: float) -> str:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the app exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode("utf-8", "replace")
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def _serve_cli(argv: list[str], env_cache: Path, timeout: float) -> tuple[str, str]:
    """Run `slidechat ...` in a subprocess until its page answers; returns (page html, gradio config json)."""
    import os
    import signal
    import subprocess
    import sys

    from slidechat.app.server import free_port

    port = free_port()
    env = dict(os.environ, SLIDECHAT_CACHE_DIR=str(env_cache), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "slidechat.cli", *argv, "--port", str(port), "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        page = _wait_http(f"http://127.0.0.1:{port}/", proc, timeout)
        config = _wait_http(f"http://127.0.0.1:{port}/config", proc, 10)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return page, config


def test_slidechat_app_cli_serves_a_checkpoint(tiny_slide_assistant, tmp_path):
    ckpt = tiny_slide_assistant.save_pretrained(tmp_path / "ckpt")
    page, config = _serve_cli(["app", "--checkpoint", str(ckpt), "--no-examples", "--cache-dir",
                               str(tmp_path / "cache")], tmp_path / "cache", timeout=90)
    assert "<title>SlideChat</title>" in page or "SlideChat" in page
    assert "sc-upload" in config and "No trained checkpoint yet" not in config


@pytest.mark.slow
def test_slidechat_demo_starts_without_a_trained_checkpoint(tmp_path):
    """`slidechat demo` on a fresh machine: the real default model (SmolLM2), examples generated, a banner when the
    demo checkpoint is not trained yet."""
    from slidechat.inference.api import DEMO_DIR

    page, config = _serve_cli(["demo"], tmp_path / "cache", timeout=300)
    assert "sc-upload" in config and "Synthetic example 1" in config
    assert ("No trained checkpoint yet" in config) != (DEMO_DIR / "config.json").is_file()
