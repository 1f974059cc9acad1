// SlideChat deep-zoom viewer: OpenSeadragon over the app's own Deep Zoom tiles, with layers (tissue outline,
// attention heatmap, patch grid), a scale bar in µm, numbered evidence boxes, and rectangle selection for
// region questions. The page's state comes from the JSON in #sc-viewer-state [data-state] (written by the
// server after each step); the viewer polls it, so it works with any Gradio update path. A drawn region goes
// the other way through the ask event itself: its js step calls S.regionForAsk, whose answer is the value
// the Python handler receives.
(function () {
  "use strict";
  const S = (window.SlideChatViewer = { viewer: null, state: null, key: "", layers: {}, drawing: false, tiles: 0,
                                        region: null, regionText: null, boxes: [] });

  function $(sel) { return document.querySelector(sel); }

  function readState() {
    const el = $("#sc-viewer-state [data-state]");
    if (!el) return null;
    try { return JSON.parse(el.getAttribute("data-state")); } catch (e) { return null; }
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
      x: spec.x || 0, y: spec.y || 0, width: spec.width, opacity: alpha, index: v.world.getItemCount(),
      success: function (ev) {
        const cur = S.layers[name];
        if (cur && cur.url === want) { cur.item = ev.item; ev.item.setOpacity(alpha); }
        else v.world.removeItem(ev.item);
        const tile = ev.item;
        if (tile && tile.setCompositeOperation) tile.setCompositeOperation("source-over");
      },
    });
  }

  // A layer of one pixel per patch, shown as an <img> overlay scaled without smoothing (CSS pixelated): every
  // patch is a crisp square on the patch grid at any zoom (the canvas drawer would blend neighbouring patches).
  function setPixelLayer(name, spec, visible, alpha) {
    const v = S.viewer, old = S.layers[name];
    const want = spec && visible ? spec.url : null;
    if (old && old.url === want) { old.item.style.opacity = String(alpha); return; }
    if (old && old.item) v.removeOverlay(old.item);
    delete S.layers[name];
    if (!want) return;
    const img = document.createElement("img");
    img.className = "sc-pixel-layer";
    img.id = "sc-overlay-" + name;
    img.alt = "";
    img.draggable = false;
    img.style.opacity = String(alpha);
    img.src = want;
    S.layers[name] = { url: want, item: img, loaded: false };
    img.addEventListener("load", function () {
      const cur = S.layers[name];
      if (cur && cur.item === img) cur.loaded = true;
    });
    // below the evidence and region boxes: the first overlay in the container
    v.addOverlay({ element: img,
                   location: new OpenSeadragon.Rect(spec.x || 0, spec.y || 0, spec.width, spec.height || spec.width) });
    const parent = img.parentNode;
    if (parent && parent.parentNode && parent.parentNode.firstChild !== parent) {
      parent.parentNode.insertBefore(parent, parent.parentNode.firstChild);
    }
  }

  function applyLayers() {
    const st = S.state;
    if (!S.viewer || !st || !S.viewer.world.getItemCount()) return;
    const ov = st.overlays || {};
    setPixelLayer("heatmap", ov.heatmap, layerOn("heatmap"), opacity());
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
  function addBox(className, box, html) {
    const v = S.viewer, item = v.world.getItemAt(0);
    const el = document.createElement("div");
    el.className = className;
    if (html) el.innerHTML = html;
    v.addOverlay({ element: el, location: item.imageToViewportRectangle(box[0], box[1], box[2], box[3]) });
    S.boxes.push(el);
    return el;
  }

  function clearBoxes() {
    S.boxes.forEach(function (el) { S.viewer.removeOverlay(el); });
    S.boxes = [];
  }

  function drawEvidence() {
    const v = S.viewer, st = S.state;
    if (!v || !v.world.getItemCount()) return;
    clearBoxes();
    (st && st.evidence || []).forEach(function (r) {
      addBox("sc-evidence-box", r.box, "<span>" + r.rank + "</span>").setAttribute("data-rank", r.rank);
    });
    const pending = S.region && S.region.join(",") !== (st && st.region || []).join(",") ? S.region : null;
    if (st && st.region) addBox("sc-region-box sc-region-answered", st.region);
    if (pending) addBox("sc-region-box sc-region-pending", pending);
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
      v.removeOverlay(el);
      el = null;
      setDrawing(false);
      setRegion(a.x, a.y, b.x - a.x, b.y - a.y);
    });
  }

  // The level-0 box (x, y, w, h) of an image rectangle, clipped to the slide; null when nothing is left.
  S.clipBox = function (x, y, w, h) {
    const st = S.state || {};
    const x0 = Math.max(0, Math.round(x)), y0 = Math.max(0, Math.round(y));
    const x1 = Math.min(st.width || x + w, Math.round(x + w)), y1 = Math.min(st.height || y + h, Math.round(y + h));
    if (x1 - x0 < 1 || y1 - y0 < 1) return null;
    return [x0, y0, x1 - x0, y1 - y0];
  };

  function regionField() { return document.querySelector("#sc-region textarea, #sc-region input"); }

  // S.regionText is the region the next question is about, as the viewer knows it: set by drawing or "ask about
  // this view", by typing in the region field, emptied by "Whole slide"; null = no say (the field's own value).
  function setRegion(x, y, w, h) {
    const box = S.clipBox(x, y, w, h);
    if (!box) return;
    S.region = box;
    S.regionText = box.join(",");
    const el = regionField();
    if (el) {  // shown to the user in the field (Gradio's copy of it may lag; the ask event does not rely on it)
      const proto = el.tagName === "TEXTAREA" ? HTMLTextAreaElement.prototype : HTMLInputElement.prototype;
      Object.getOwnPropertyDescriptor(proto, "value").set.call(el, S.regionText);
      el.dispatchEvent(new Event("input", { bubbles: true }));
    }
    drawEvidence();
  }

  // The region the ask event hands to the Python handler (see ASK_JS in app/ui.py).
  S.regionForAsk = function (given) {
    const text = (S.regionText !== null && S.regionText !== undefined ? S.regionText : given || "").trim();
    S.region = /^\d+,\d+,\d+,\d+$/.test(text) ? text.split(",").map(Number) : null;
    return text;
  };

  function setDrawing(on) {
    S.drawing = on;
    const btn = $("#sc-draw-region");
    if (btn) btn.classList.toggle("sc-active", on);
    // canvas-drag handlers cancel panning while drawing (disabling mouse navigation would also stop them)
  }

  S.viewBox = function () {
    const v = S.viewer;
    if (!v || !v.world.getItemCount()) return null;
    const r = v.world.getItemAt(0).viewportToImageRectangle(v.viewport.getBounds(true));
    return S.clipBox(r.x, r.y, r.width, r.height);
  };

  S.viewRegion = function () {
    const box = S.viewBox();
    if (box) setRegion(box[0], box[1], box[2], box[3]);
  };

  // ---- wiring ---------------------------------------------------------------------------------------
  document.addEventListener("click", function (ev) {
    const crop = ev.target.closest && ev.target.closest(".sc-crop[data-box]");
    if (crop) {  // a crop of another slide of the case: pick that slide in the strip first
      const on = crop.getAttribute("data-slide");
      if (on === null || !S.state || +on === (S.state.slide || 0)) S.flyTo(JSON.parse(crop.getAttribute("data-box")));
      return;
    }
    if (ev.target.closest && ev.target.closest("#sc-draw-region")) { setDrawing(!S.drawing); return; }
    if (ev.target.closest && ev.target.closest("#sc-view-region")) { S.viewRegion(); return; }
    if (ev.target.closest && ev.target.closest("#sc-whole-slide")) {
      S.regionText = ""; S.region = null; drawEvidence();
    }
  });
  document.addEventListener("input", function (ev) {
    if (ev.isTrusted && ev.target && ev.target.closest && ev.target.closest("#sc-region")) {
      S.regionText = ev.target.value;  // typed by the user
    }
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
        if (S.viewer) { S.viewer.clearOverlays(); S.viewer.close(); }
        S.layers = {}; S.boxes = []; S.region = null; S.regionText = null;
        if (empty) empty.style.display = "flex";
      } else {
        if (empty) empty.style.display = "none";
        const v = ensureViewer(container);
        if (!prev || prev.dzi !== st.dzi || !v.world.getItemCount()) {
          v.clearOverlays();
          S.layers = {}; S.boxes = []; S.region = null; S.regionText = null;
          v.open(st.dzi);
        }
        else { applyLayers(); drawEvidence(); updateScaleBar(); }
      }
    }
    window.setTimeout(tick, 250);
  }
  tick();
})();
