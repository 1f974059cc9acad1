"""End to end in a real headless Chromium (Debian package, driven by Playwright): upload a SynthSlide slide, watch
the encoding progress with counts, ask a question and see the streamed answer and the heatmap, generate a report,
upload a broken file and see the error while the app keeps serving. Screenshots go to test-output/app/."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from slidechat.utils.io import read_jsonl

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: install it with `make browser` "
                                                "(apt-get install chromium chromium-driver) to run the browser tests"),
]


def start_app(assistant, cache: Path, examples: dict | None = None, **overrides):
    """Serve the app in this process (Gradio's server thread) on a free local port; returns (url, demo, service)."""
    from slidechat.app.config import AppConfig
    from slidechat.app.server import start_in_background

    settings = dict(cache_dir=cache, port=None, max_new_tokens=16, report_max_new_tokens=4,
                    report_summary_tokens=8, n_examples=0, checkpoint_label="tiny random test model",
                    banner="No trained checkpoint yet: test model with random weights.")
    settings.update(overrides)
    return start_in_background(assistant, AppConfig(**settings), examples)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(tiny_slide_assistant, synth_dataset, tmp_path_factory):
    records = read_jsonl(synth_dataset / "truth.jsonl")
    examples = {"Synthetic example (test)": synth_dataset / records[3]["path"]}
    url, demo, service = start_app(tiny_slide_assistant, tmp_path_factory.mktemp("browser_cache"), examples)
    yield url, service, [synth_dataset / r["path"] for r in records]
    demo.close()
    service.registry.close_all()


def _install_stream_probe(page) -> None:
    """Record every distinct text of the last bot message as the page updates (to see streaming)."""
    page.evaluate("""() => {
        window.__botTexts = [];
        const chat = document.querySelector('#sc-chat');
        new MutationObserver(() => {
            const bots = chat.querySelectorAll('[data-testid="bot"]');
            if (!bots.length) return;
            const t = bots[bots.length - 1].innerText;
            if (window.__botTexts[window.__botTexts.length - 1] !== t) window.__botTexts.push(t);
        }).observe(chat, {subtree: true, childList: true, characterData: true});
    }""")


def _install_progress_probe(page) -> None:
    """Record every progress text ("Encoding patches (k/N)", ...) the page shows, however briefly: a fast encode
    can pass through its states between two polls of the test."""
    page.evaluate("""() => {
        window.__progressTexts = [];
        const pattern = /(Encoding patches|Detecting tissue) \\(\\d+\\/\\d+\\)/g;
        const record = (text) => {
            for (const m of (text || '').matchAll(pattern))
                if (!window.__progressTexts.includes(m[0])) window.__progressTexts.push(m[0]);
        };
        new MutationObserver((mutations) => {
            for (const m of mutations) record(m.target.textContent);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")


def _image_src(page) -> str:
    return page.get_attribute("#sc-image img", "src") or ""


def test_upload_progress_chat_heatmap_report_and_bad_upload(browser, served, test_output, tmp_path):
    url, service, slides = served
    shots = test_output / "app"
    shots.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    external: list[str] = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:"))
            else None)
    page.goto(url)
    page.wait_for_selector("#sc-status")
    assert "No trained checkpoint yet" in page.inner_text("#sc-banner")
    page.screenshot(path=str(shots / "01_start.png"), full_page=True)

    # 1. upload a slide: progress with counts while encoding, then thumbnail + facts
    upload = tmp_path / "case-A.tiff"
    shutil.copyfile(slides[0], upload)
    _install_progress_probe(page)
    page.set_input_files("#sc-upload input[type=file]", str(upload))
    deadline = time.time() + 90
    shot_taken = False
    while time.time() < deadline and not page.query_selector("#sc-status .sc-ok, #sc-status .sc-error"):
        if not shot_taken and any(re.search(r"Encoding patches \(([1-9]\d*)/", ln)
                                  for ln in page.evaluate("window.__progressTexts")):
            page.screenshot(path=str(shots / "02_encoding_progress.png"), full_page=True)
            shot_taken = True
        time.sleep(0.05)
    progress_lines = set(page.evaluate("window.__progressTexts"))
    status = page.inner_text("#sc-status")
    assert "Opened case-A.tiff" in status, status
    n_patches = next(s for s in service.registry.sessions() if s.source_name == "case-A.tiff").info["patches"]
    assert any(f"/{n_patches})" in ln for ln in progress_lines if "Encoding patches" in ln), progress_lines
    page.wait_for_function("() => window.SlideChatViewer && window.SlideChatViewer.tiles > 0", timeout=30000)
    page.click("text=Overview image (thumbnail + heatmap)")  # the overview sits in a closed accordion
    page.wait_for_selector("#sc-image img", timeout=10000)
    facts = page.inner_text("#sc-facts")
    assert "case-A.tiff" in facts and "0.500" in facts and str(n_patches) in facts
    page.screenshot(path=str(shots / "03_slide_open.png"), full_page=True)
    outline_src = _image_src(page)

    # 2. ask: the answer streams in, then the heatmap replaces the plain outline
    _install_stream_probe(page)
    page.fill("#sc-question textarea", "Which tissue types are present?")
    page.press("#sc-question textarea", "Enter")
    page.wait_for_selector("#sc-status:has-text('Answered')", timeout=60000)
    texts = page.evaluate("window.__botTexts")
    final = page.inner_text('#sc-chat [data-testid="bot"]').strip()
    assert final and final != "…"
    assert len(texts) >= 3, texts  # placeholder, at least one partial answer, the full answer
    assert "Which tissue types are present?" in page.inner_text('#sc-chat [data-testid="user"]')
    heat_src = _image_src(page)
    assert heat_src and heat_src != outline_src
    page.screenshot(path=str(shots / "04_answer_heatmap.png"), full_page=True)
    with page.expect_download(timeout=20000) as download:  # "Download conversation" gives this chat as JSON
        page.click("#sc-download-conv")
    record = json.loads(Path(download.value.path()).read_text())
    assert record["messages"][0] == {"role": "user", "content": "Which tissue types are present?"}
    assert record["messages"][1]["content"] == final and record["slide"]["slide"] == "case-A.tiff"

    # the heatmap toggle re-renders the image without the overlay
    page.click("#sc-show-heatmap input[type=checkbox]")
    page.wait_for_function("s => { const i = document.querySelector('#sc-image img'); return i && i.src !== s; }",
                           arg=heat_src, timeout=20000)
    page.click("#sc-show-heatmap input[type=checkbox]")

    # 3. second turn + report
    page.fill("#sc-question textarea", "Is there a focal lesion?")
    page.press("#sc-question textarea", "Enter")
    page.wait_for_function("() => document.querySelectorAll('#sc-chat [data-testid=\"bot\"]').length >= 2",
                           timeout=60000)
    page.wait_for_selector("#sc-status:has-text('Answered')", timeout=60000)
    page.click("#sc-report")
    page.wait_for_selector("#sc-report-md:has-text('Slide report')", timeout=90000)
    assert "tissue types" in page.inner_text("#sc-report-md")
    files = page.inner_text("#sc-report-files").replace("\n", "")
    assert ".report.json" in files and ".report.html" in files
    page.screenshot(path=str(shots / "05_report.png"), full_page=True)

    # 4. a broken upload: a clear message in the page, no traceback
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"this is not a slide, just text\n" * 50)
    page.set_input_files("#sc-upload input[type=file]", str(broken))
    page.wait_for_selector("#sc-status .sc-error", timeout=30000)
    message = page.inner_text("#sc-status")
    assert "Could not open this slide" in message and "broken.svs" in message and "not a whole-slide image" in message
    assert "Traceback" not in page.inner_text("body")
    # the old slide's report panels close in the event chained after the error message
    page.wait_for_selector("#sc-report-files", state="hidden", timeout=30000)
    page.wait_for_selector("#sc-report-md", state="hidden", timeout=30000)
    page.screenshot(path=str(shots / "06_bad_upload.png"), full_page=True)

    # 5. the app keeps serving: the same tab opens an example, a second tab works on its own
    page.get_by_role("tab", name="Example slides").click()
    page.click("#sc-open-example")
    page.wait_for_selector("#sc-status:has-text('Opened Synthetic example')", timeout=90000)
    other = context.browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
    other.goto(url)
    other.wait_for_selector("#sc-status")
    assert other.query_selector('#sc-chat [data-testid="bot"]') is None  # no cross-talk from the first tab
    other.fill("#sc-question textarea", "hello?")
    other.press("#sc-question textarea", "Enter")
    other.wait_for_selector("#sc-status .sc-error:has-text('open a slide first')", timeout=30000)
    other.context.close()
    assert external == [], external  # the page loads nothing from outside this server
    context.close()
