"""The pathologist's workspace in a real headless Chromium with the shipped demo checkpoint: upload the real scanner
slide and a SynthSlide, the deep-zoom viewer loads tiles and zooms, the heatmap layer shows, three questions are
answered with no error banner, evidence boxes and crops appear, the report downloads with its crops, a drawn
rectangle and "ask about this view" each reach the server as the exact level-0 box, the heatmap layer shows crisp
patch squares. Screenshots go to test-output/app/viewer-*.png."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from slidechat.utils.io import read_jsonl

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: install it with `make browser`"),
]

QUESTIONS = ("Which tissue types are present in this slide?", "Describe this slide.", "Is there tumour? Where?")
TILE_URL = re.compile(r"/slidechat/v/[A-Za-z0-9_-]+/slide_files/\d+/\d+_\d+\.jpeg$")


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    import slidechat
    from slidechat.app.config import AppConfig
    from slidechat.app.server import start_in_background

    config = AppConfig(cache_dir=tmp_path_factory.mktemp("viewer_cache"), port=None, max_new_tokens=24,
                       report_max_new_tokens=6, report_summary_tokens=24, n_examples=0,
                       checkpoint_label="demo checkpoint")
    url, demo, service = start_in_background(slidechat.load("demo"), config)
    yield url, service
    demo.close()
    service.registry.close_all()


@pytest.fixture(scope="module")
def page(demo_app):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
        pg.tiles = []
        pg.on("response", lambda r: pg.tiles.append(r.status) if TILE_URL.search(r.url) else None)
        pg.goto(demo_app[0])
        pg.wait_for_selector("#sc-osd")
        yield pg
        browser.close()


def _open(page, slide: Path) -> None:
    page.set_input_files("#sc-upload input[type=file]", str(slide))
    page.wait_for_function("() => window.SlideChatViewer && window.SlideChatViewer.tiles > 0", timeout=30000)
    # the status line of the slide opened before may still be an "ok" one: wait for this slide's own
    page.wait_for_selector(f"#sc-status .sc-ok:has-text('Opened {slide.name}')", timeout=120000)
    assert not page.query_selector("#sc-status .sc-error")


def _ask(page, question: str) -> None:
    bots = page.locator('#sc-chat [data-testid="bot"]').count()
    page.wait_for_timeout(800)  # the previous event settles before the next submit
    state = page.evaluate("() => document.querySelector('#sc-viewer-state [data-state]').getAttribute('data-state')")
    page.fill("#sc-question textarea", question)
    page.press("#sc-question textarea", "Enter")
    try:
        page.wait_for_function("() => document.querySelector('#sc-question textarea').value === ''", timeout=5000)
    except Exception:  # the submit came while the page was still busy: send again
        page.click("#sc-send")
    try:
        page.wait_for_function("n => document.querySelectorAll('#sc-chat [data-testid=\"bot\"]').length > n",
                               arg=bots, timeout=90000)
        # the answer's last update carries a new viewer state (its heatmap and evidence), then the status line
        page.wait_for_function("s => document.querySelector('#sc-viewer-state [data-state]')"
                               ".getAttribute('data-state') !== s", arg=state, timeout=90000)
        page.wait_for_selector("#sc-status:has-text('Answered')", timeout=90000)
    except Exception:
        page.screenshot(path="test-output/app/viewer-failed-ask.png")
        raise
    assert "Something went wrong" not in page.inner_text("body")
    assert not page.query_selector("#sc-status .sc-error")


def test_viewer_evidence_region_report_on_scanner_slide(page, demo_app, cmu_slide, test_output, tmp_path):
    shots = test_output / "app"
    shots.mkdir(parents=True, exist_ok=True)
    _open(page, cmu_slide)
    first = len(page.tiles)
    assert first > 0 and all(s == 200 for s in page.tiles)
    page.screenshot(path=str(shots / "viewer-1-opened.png"))

    for q in QUESTIONS:
        _ask(page, q)
    bot_texts = page.locator('#sc-chat [data-testid="bot"]').all_inner_texts()
    assert len(bot_texts) == 3 and all(t.strip() for t in bot_texts)
    # heatmap layer on the viewer, evidence boxes on the viewer, crops under the answer
    page.wait_for_function("() => { const l = window.SlideChatViewer.layers.heatmap; return l && l.item; }",
                           timeout=15000)
    assert page.locator(".sc-evidence-box").count() == 4
    crops = page.locator("#sc-evidence .sc-crop img")
    assert crops.count() == 4
    page.screenshot(path=str(shots / "viewer-2-answers-evidence.png"))
    _assert_heatmap_patches_are_crisp_squares(page, demo_app[1], shots / "viewer-2b-heatmap-squares.png")

    # clicking a crop flies the viewer there: the zoom grows and more (deeper) tiles load
    zoom0 = page.evaluate("() => window.SlideChatViewer.viewer.viewport.getZoom()")
    page.locator("#sc-evidence .sc-crop").first.click()
    page.wait_for_timeout(1500)
    assert page.evaluate("() => window.SlideChatViewer.viewer.viewport.getZoom()") > zoom0 * 1.5
    assert len(page.tiles) > first and all(s == 200 for s in page.tiles)
    page.screenshot(path=str(shots / "viewer-3-zoomed-to-evidence.png"))

    # draw a rectangle on the viewer and ask: the server answers from exactly the drawn level-0 box
    page.evaluate("() => window.SlideChatViewer.viewer.viewport.goHome(true)")
    page.wait_for_timeout(500)
    page.click("#sc-draw-region")
    box = page.locator("#sc-osd").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    drawn = _image_box(page, (cx - 120, cy - 120), (cx + 120, cy + 120))
    page.mouse.move(cx - 120, cy - 120)
    page.mouse.down()
    page.mouse.move(cx, cy, steps=5)
    page.mouse.move(cx + 120, cy + 120, steps=5)
    page.mouse.up()
    _ask(page, "What tissue is in this region?")
    _assert_answered_from(page, demo_app[1], drawn, "What tissue is in this region?")
    page.screenshot(path=str(shots / "viewer-4-region-answer.png"))
    assert page.locator(".sc-region-box").count() == 1  # the answered region, drawn once

    # "ask about this view": zoom in, take the view as the region, ask
    page.evaluate("() => { const v = window.SlideChatViewer.viewer; v.viewport.zoomBy(2.5, undefined, true); "
                  "v.viewport.applyConstraints(true); }")
    page.wait_for_timeout(800)
    view = page.evaluate("""() => { const v = window.SlideChatViewer.viewer, st = window.SlideChatViewer.state;
        const r = v.world.getItemAt(0).viewportToImageRectangle(v.viewport.getBounds(true));
        const x0 = Math.max(0, Math.round(r.x)), y0 = Math.max(0, Math.round(r.y));
        const x1 = Math.min(st.width, Math.round(r.x + r.width)), y1 = Math.min(st.height, Math.round(r.y + r.height));
        return [x0, y0, x1 - x0, y1 - y0]; }""")
    page.click("#sc-view-region")
    assert page.evaluate("() => window.SlideChatViewer.regionText") == ",".join(map(str, view))
    field = page.evaluate("() => document.querySelector('#sc-region textarea, #sc-region input').value")
    _ask(page, "Describe this part of the slide.")
    _assert_answered_from(page, demo_app[1], view, "Describe this part of the slide.")
    assert field == ",".join(map(str, view))  # the user saw the box the answer is about

    # "Whole slide" empties the region: the next answer is about the whole slide again
    page.click("#sc-whole-slide")
    page.wait_for_timeout(300)
    _ask(page, "Describe this slide.")
    page.wait_for_selector("#sc-status:has-text('Answered from the whole slide')", timeout=90000)
    assert page.locator('#sc-chat [data-testid="user"]').last.inner_text().strip() == "Describe this slide."
    assert _server_session(demo_app[1]).region is None

    # the report downloads as HTML carrying the evidence crops
    page.click("#sc-report")
    page.wait_for_selector("#sc-status:has-text('Report ready')", timeout=120000)
    link = page.locator("#sc-report-files a[href*='.report.html']").first
    with page.expect_download() as info:
        link.click()
    target = tmp_path / "report.html"
    info.value.save_as(target)
    text = target.read_text(encoding="utf-8")
    assert text.count('class="sc-crop"') >= 1 and "data:image/jpeg;base64," in text
    page.screenshot(path=str(shots / "viewer-5-report.png"))


def _assert_heatmap_patches_are_crisp_squares(page, service, shot: Path) -> None:
    """Zoomed onto the most attended patch at full opacity: its square on screen is one flat colour (the score's
    turbo colour), not a blend with its neighbours, and sits where the patch is."""
    import io

    from matplotlib import colormaps
    from PIL import Image

    hm = _server_session(service).heatmap
    i = int(np.argmax(hm.scores))
    x, y = (int(v) for v in hm.coords[i])
    ps = float(hm.patch_size_level0)
    page.evaluate("""([x, y, ps]) => { const S = window.SlideChatViewer, v = S.viewer;
        const r = document.querySelector('#sc-layer-opacity'); r.value = '1';
        r.dispatchEvent(new Event('input', { bubbles: true }));
        document.querySelectorAll('.sc-evidence-box, .sc-region-box').forEach(e => { e.style.display = 'none'; });
        v.viewport.fitBounds(v.world.getItemAt(0).imageToViewportRectangle(x - 1.5 * ps, y - 1.5 * ps, 4 * ps, 4 * ps),
                             true); }""", [x, y, ps])
    page.wait_for_function("() => { const l = window.SlideChatViewer.layers.heatmap; return l && l.loaded; }",
                           timeout=10000)
    page.wait_for_timeout(500)
    rendering = page.evaluate("() => getComputedStyle(document.querySelector('#sc-overlay-heatmap')).imageRendering")
    assert rendering == "pixelated"
    corner = page.evaluate("""([x, y, ps]) => { const v = window.SlideChatViewer.viewer, item = v.world.getItemAt(0);
        const el = v.canvas.getBoundingClientRect();
        const a = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
        const b = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x + ps, y + ps));
        return [el.left + a.x, el.top + a.y, el.left + b.x, el.top + b.y]; }""", [x, y, ps])
    x0, y0, x1, y1 = corner
    assert x1 - x0 > 40  # a patch spans many screen pixels at this zoom
    page.screenshot(path=str(shot))
    inset = 4
    clip = {"x": x0 + inset, "y": y0 + inset, "width": x1 - x0 - 2 * inset, "height": y1 - y0 - 2 * inset}
    square = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB")).astype(int)
    assert (square.max(axis=(0, 1)) - square.min(axis=(0, 1))).max() <= 3, "the patch square is not one colour"
    want = np.asarray(colormaps["turbo"](float(np.clip(hm.scores[i], 0, 1)))[:3]) * 255
    assert np.abs(square.mean(axis=(0, 1)) - want).max() <= 8
    page.evaluate("""() => { const r = document.querySelector('#sc-layer-opacity'); r.value = '0.45';
        r.dispatchEvent(new Event('input', { bubbles: true }));
        document.querySelectorAll('.sc-evidence-box, .sc-region-box').forEach(e => { e.style.display = ''; });
        window.SlideChatViewer.viewer.viewport.goHome(true); }""")
    page.wait_for_timeout(500)


def _image_box(page, a, b) -> list[int]:
    """The level-0 (x, y, w, h) box between two points of the page (CSS px), clipped to the slide."""
    return page.evaluate("""([a, b]) => { const v = window.SlideChatViewer.viewer, st = window.SlideChatViewer.state;
        const item = v.world.getItemAt(0), c = v.canvas.getBoundingClientRect();
        const pixel = (xy) => v.viewport.pointFromPixel(new OpenSeadragon.Point(xy[0] - c.left, xy[1] - c.top));
        const p = item.viewportToImageCoordinates(pixel(a)), q = item.viewportToImageCoordinates(pixel(b));
        const x0 = Math.max(0, Math.round(p.x)), y0 = Math.max(0, Math.round(p.y));
        const x1 = Math.min(st.width, Math.round(q.x)), y1 = Math.min(st.height, Math.round(q.y));
        return [x0, y0, x1 - x0, y1 - y0]; }""", [list(a), list(b)])


def _server_session(service):
    (session,) = [s for s in service.registry.sessions() if s.transcript]
    return session


def _assert_answered_from(page, service, box: list[int], question: str) -> None:
    """The handler got ``box``: the page's status and the question's header name it, the session holds it, and the
    answer's evidence lies inside it."""
    x, y, w, h = box
    assert w > 10 and h > 10
    header = f"[region {x},{y} {w}×{h} px] {question}"
    # the status line is the answer's last update; it names the box, so it tells this answer from the one before
    page.wait_for_selector(f"#sc-status:has-text('Answered from the region {x},{y} {w}×{h} px')", timeout=90000)
    assert page.locator('#sc-chat [data-testid="user"]').last.inner_text().strip() == header
    session = _server_session(service)
    assert tuple(session.region) == (x, y, w, h)
    assert session.evidence
    ps = float(session.heatmap.patch_size_level0)
    for e in session.evidence:  # every evidence box overlaps the region (patches whose area lies in it)
        bx, by, bw, bh = e["box"]
        assert bx < x + w + ps and by < y + h + ps and bx + bw > x - ps and by + bh > y - ps, (e["box"], box)


def test_viewer_on_synthslide_with_layers(page, demo_app, synth_dataset, test_output):
    records = read_jsonl(synth_dataset / "truth.jsonl")
    _open(page, synth_dataset / records[0]["path"])
    _ask(page, "Which tissue types are present in this slide?")
    page.check("#sc-layer-grid")
    page.wait_for_function("() => { const l = window.SlideChatViewer.layers.grid; return l && l.item; }",
                           timeout=10000)
    assert page.is_visible("#sc-scalebar") and "µm" in page.inner_text("#sc-scalebar")
    page.screenshot(path=str(test_output / "app" / "viewer-6-synth-grid-heatmap.png"))


@pytest.mark.slow  # ~35 s: encodes two slides with the demo checkpoint
def test_case_of_two_slides_strip_switches_viewer(page, demo_app, synth_dataset, test_output):
    records = read_jsonl(synth_dataset / "truth.jsonl")
    paths = [str(synth_dataset / records[i]["path"]) for i in (1, 2)]
    page.get_by_role("tab", name="Open a case").click()
    page.set_input_files("#sc-case-upload input[type=file]", paths)
    page.wait_for_timeout(1500)
    page.click("#sc-open-case")
    page.wait_for_selector("#sc-status .sc-ok:has-text('Opened a case of 2 slides')", timeout=180000)
    dzi = page.evaluate("() => window.SlideChatViewer.state.dzi")
    assert page.locator("#sc-case-strip img").count() == 2
    _ask(page, "Which slide shows a lesion?")
    page.wait_for_selector("#sc-status:has-text('Answered from the whole case (2 slides)')", timeout=90000)
    captions = page.locator("#sc-evidence figcaption").all_inner_texts()
    assert captions and all(re.search(r"Slide [12] \(", c) for c in captions)  # each crop names its slide
    page.locator("#sc-case-strip img").nth(1).click()
    page.wait_for_function("d => window.SlideChatViewer.state && window.SlideChatViewer.state.slide === 1 && "
                           "window.SlideChatViewer.state.dzi !== d", arg=dzi, timeout=30000)
    page.wait_for_function("() => { const l = window.SlideChatViewer.layers.heatmap; return l && l.loaded; }",
                           timeout=15000)
    assert "Viewing Slide 2" in page.inner_text("#sc-status")
    page.screenshot(path=str(test_output / "app" / "viewer-7-case-slide-2.png"))
    # the upload box was emptied when the case opened, so another case starts from its own files
    assert not any(Path(p).stem in page.inner_text("#sc-case-upload") for p in paths)
    other = [str(synth_dataset / records[i]["path"]) for i in (3, 1)]
    page.set_input_files("#sc-case-upload input[type=file]", other)
    page.wait_for_timeout(1500)
    shown = page.evaluate("() => window.SlideChatViewer.state.dzi")
    page.click("#sc-open-case")
    page.wait_for_function("d => { const s = document.querySelector('#sc-status').innerText; return s.includes("
                           "'Could not') || (s.includes('Opened a case of 2 slides') && "
                           "window.SlideChatViewer.state.dzi !== d); }", arg=shown, timeout=180000)
    assert "Could not" not in page.inner_text("#sc-status")
    assert page.locator("#sc-case-strip img").count() == 2
