// SlideChat deep-zoom viewer: OpenSeadragon over the app's own Deep Zoom tiles, with layers (tissue outline,
// attention heatmap, patch grid), a scale bar in µm, numbered evidence boxes, and rectangle selection for
// region questions. The page's state comes from the JSON in #sc-viewer-state [data-state] (written by the
// server after each step); the viewer polls it, so it works with any Gradio update path.
(function () {
  "use strict";
  const S = (window.SlideChatViewer = { viewer: null, state: null, key: "", layers: {}, drawing: false, tiles: 0 });

  function $(sel) { return document.querySelector(sel); }

  function readState() {
    const el = $("#sc-viewer-state [data-state]");
    if (!el) return null;
    try { return JSON.parse(el.getAttribute("data-state")); } catch (e) { return null; }
  }

  function setTextbox(id, value) {
    const el = document.querySelector("#" + id + " textarea, #" + id + " input");
    if (!el) return;
    el.focus();
    const proto = el.tagName === "TEXTAREA" ? HTMLTextAreaElement.prototype : HTMLInputElement.prototype;
    Object.getOwnPropertyDescriptor(proto, "value").set.call(el, value);
    el.dispatchEvent(new Event("input", { bubbles: true }));
    el.dispatchEvent(new Event("change", { bubbles: true }));
    el.blur();
  }

  function ensureViewer(container) {
    if (S.viewer && S.viewer.element === container) return S.viewer;
    const v = OpenSeadragon({
      element: container,
      prefixUrl: "/slidechat/static/openseadragon/images/",
      showNavigator: true, navigatorPosition: "BOTTOM_RIGHT", navigatorSizeRatio: 0.18,
      maxZoomPixelRatio: 2, visibilityRatio: 0.5, crossOriginPolicy: false,
      gestureSettingsMouse: { clickToZoom: false }, timeout: 60000, imageLoaderLimit: 6,
      showRotationControl: false, animationTime: 0.6,
    });
    v.addHandler("tile-loaded", function () { S.tiles += 1; });
    v.addHandler("animation", updateScaleBar);
    v.addHandler("open", function () { updateScaleBar(); applyLayers(); drawEvidence(); });
    installDrawing(v);
    S.viewer = v;
    return v;
  }

  // ---- layers ---------------------------------------------------------------------------------------
  function layerOn(name) {
    const box = $("#sc-layer-" + name);
    return !!(box && box.checked);
  }

  function opacity() {
    const r = $("#sc-layer-opacity");
    return r ? parseFloat(r.value) : 0.5;
  }

  function setLayer(name, spec, visible, alpha) {
    const v = S.viewer, old = S.layers[name];
    const want = spec && visible ? spec.url : null;
    if (old && old.url === want) { if (old.item) old.item.setOpacity(alpha); return; }
    if (old && old.item) v.world.removeItem(old.item);
    delete S.layers[name];
    if (!want) return;
    S.layers[name] = { url: want, item: null };
    v.addTiledImage({
      tileSource: { type: "image", url: want, buildPyramid: false },
      x: 0, y: 0, width: spec.width, opacity: alpha, index: v.world.getItemCount(),
      success: function (ev) {
        const cur = S.layers[name];
        if (cur && cur.url === want) { cur.item = ev.item; ev.item.setOpacity(alpha); }
        else v.world.removeItem(ev.item);
        const tile = ev.item;
        if (tile && tile.setCompositeOperation) tile.setCompositeOperation("source-over");
      },
    });
  }

  function applyLayers() {
    const st = S.state;
    if (!S.viewer || !st || !S.viewer.world.getItemCount()) return;
    const ov = st.overlays || {};
    setLayer("heatmap", ov.heatmap, layerOn("heatmap"), opacity());
    setLayer("tissue", ov.tissue, layerOn("tissue"), 1.0);
    setLayer("grid", ov.grid, layerOn("grid"), 0.8);
    const note = $("#sc-layer-note");
    if (note) note.textContent = st.heatmap_note || (ov.heatmap ? "" : "Heatmap: ask a question first.");
  }

  // ---- scale bar ------------------------------------------------------------------------------------
  function updateScaleBar() {
    const bar = $("#sc-scalebar"), st = S.state, v = S.viewer;
    if (!bar || !st || !st.mpp || !v || !v.world.getItemCount()) { if (bar) bar.style.display = "none"; return; }
    const item = v.world.getItemAt(0);
    const screenPerImage = item.viewportToImageZoom(v.viewport.getZoom(true));
    const umPerScreenPx = st.mpp / screenPerImage;
    const target = 120 * umPerScreenPx;
    const nice = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000];
    let um = nice[0];
    for (const n of nice) if (n <= target) um = n;
    const px = um / umPerScreenPx;
    bar.style.display = "block";
    bar.querySelector(".sc-scalebar-line").style.width = px.toFixed(0) + "px";
    bar.querySelector(".sc-scalebar-label").textContent = um >= 1000 ? (um / 1000) + " mm" : um + " µm";
  }

  // ---- evidence boxes -------------------------------------------------------------------------------
  function drawEvidence() {
    const v = S.viewer, st = S.state;
    if (!v || !v.world.getItemCount()) return;
    v.clearOverlays();
    const item = v.world.getItemAt(0);
    (st && st.evidence || []).forEach(function (r) {
      const el = document.createElement("div");
      el.className = "sc-evidence-box";
      el.setAttribute("data-rank", r.rank);
      el.innerHTML = "<span>" + r.rank + "</span>";
      v.addOverlay({ element: el, location: item.imageToViewportRectangle(r.box[0], r.box[1], r.box[2], r.box[3]) });
    });
    if (st && st.region) {
      const el = document.createElement("div");
      el.className = "sc-region-box";
      const b = st.region;
      v.addOverlay({ element: el, location: item.imageToViewportRectangle(b[0], b[1], b[2], b[3]) });
    }
  }

  S.flyTo = function (box) {
    const v = S.viewer;
    if (!v || !v.world.getItemCount()) return;
    const item = v.world.getItemAt(0);
    const pad = Math.max(box[2], box[3]) * 0.6;
    v.viewport.fitBounds(item.imageToViewportRectangle(box[0] - pad, box[1] - pad, box[2] + 2 * pad, box[3] + 2 * pad));
  };

  // ---- region selection -----------------------------------------------------------------------------
  function installDrawing(v) {
    let start = null, el = null;
    v.addHandler("canvas-press", function (ev) {
      if (!S.drawing) return;
      ev.preventDefaultAction = true;
      start = v.viewport.pointFromPixel(ev.position);
      el = document.createElement("div");
      el.className = "sc-region-box";
      v.addOverlay({ element: el, location: new OpenSeadragon.Rect(start.x, start.y, 0, 0) });
    });
    v.addHandler("canvas-drag", function (ev) {
      if (!S.drawing || !start) return;
      ev.preventDefaultAction = true;
      const p = v.viewport.pointFromPixel(ev.position);
      v.updateOverlay(el, new OpenSeadragon.Rect(Math.min(start.x, p.x), Math.min(start.y, p.y),
                                                 Math.abs(p.x - start.x), Math.abs(p.y - start.y)));
    });
    v.addHandler("canvas-release", function (ev) {
      if (!S.drawing || !start) return;
      ev.preventDefaultAction = true;
      const p = v.viewport.pointFromPixel(ev.position);
      const item = v.world.getItemAt(0);
      const a = item.viewportToImageCoordinates(Math.min(start.x, p.x), Math.min(start.y, p.y));
      const b = item.viewportToImageCoordinates(Math.max(start.x, p.x), Math.max(start.y, p.y));
      start = null;
      setDrawing(false);
      setRegion(a.x, a.y, b.x - a.x, b.y - a.y);
    });
  }

  function setRegion(x, y, w, h) {
    const st = S.state || {};
    const x0 = Math.max(0, Math.round(x)), y0 = Math.max(0, Math.round(y));
    const x1 = Math.min(st.width || x + w, Math.round(x + w)), y1 = Math.min(st.height || y + h, Math.round(y + h));
    if (x1 - x0 < 1 || y1 - y0 < 1) return;
    setTextbox("sc-region", [x0, y0, x1 - x0, y1 - y0].join(","));
  }

  function setDrawing(on) {
    S.drawing = on;
    const btn = $("#sc-draw-region");
    if (btn) btn.classList.toggle("sc-active", on);
    // canvas-drag handlers cancel panning while drawing (disabling mouse navigation would also stop them)
  }

  S.viewRegion = function () {
    const v = S.viewer;
    if (!v || !v.world.getItemCount()) return;
    const b = v.viewport.getBounds(true), item = v.world.getItemAt(0);
    const r = item.viewportToImageRectangle(b);
    setRegion(r.x, r.y, r.width, r.height);
  };

  // ---- wiring ---------------------------------------------------------------------------------------
  document.addEventListener("click", function (ev) {
    const crop = ev.target.closest && ev.target.closest(".sc-crop[data-box]");
    if (crop) { S.flyTo(JSON.parse(crop.getAttribute("data-box"))); return; }
    if (ev.target.closest && ev.target.closest("#sc-draw-region")) { setDrawing(!S.drawing); return; }
    if (ev.target.closest && ev.target.closest("#sc-view-region")) { S.viewRegion(); return; }
  });
  document.addEventListener("input", function (ev) {
    if (ev.target && ev.target.id && ev.target.id.indexOf("sc-layer-") === 0) applyLayers();
  });
  document.addEventListener("change", function (ev) {
    if (ev.target && ev.target.id && ev.target.id.indexOf("sc-layer-") === 0) applyLayers();
  });

  function tick() {
    const container = $("#sc-osd");
    const raw = $("#sc-viewer-state [data-state]");
    const key = raw ? raw.getAttribute("data-state") : "";
    if (container && typeof OpenSeadragon !== "undefined" && key !== S.key) {
      S.key = key;
      const st = readState();
      const prev = S.state;
      S.state = st;
      const empty = $("#sc-osd-empty");
      if (!st || !st.dzi) {
        if (S.viewer) S.viewer.close();
        S.layers = {};
        if (empty) empty.style.display = "flex";
      } else {
        if (empty) empty.style.display = "none";
        const v = ensureViewer(container);
        if (!prev || prev.dzi !== st.dzi || !v.world.getItemCount()) { S.layers = {}; v.open(st.dzi); }
        else { applyLayers(); drawEvidence(); updateScaleBar(); }
      }
    }
    window.setTimeout(tick, 250);
  }
  tick();
})();
