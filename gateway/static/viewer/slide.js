// HepatoAI slide view: pick or drop a whole slide, follow its tiles live, then pan and zoom
// it with OpenSeadragon (vendor/openseadragon) over the gateway's Deep Zoom tiles, with the
// detections of the visible region drawn over it (slide_overlay.js). Plain ES module, no
// build step, nothing loaded from other origins; the API key, when the gateway wants one,
// is sent as a header everywhere: fetch for the API, OpenSeadragon's ajaxHeaders for tiles.

import {
  $,
  API,
  ApiError,
  AuthNeeded,
  Classes,
  Stale,
  api,
  apiKey,
  detailOf,
  getJson,
  refused,
  run,
  showError,
  sleep,
  sseEvents,
  wireKeyForm,
  wireDropZone,
} from "./common.js";
import { SlideOverlay, heatColor } from "./slide_overlay.js";

const OSD = window.OpenSeadragon;
const TERMINAL = new Set(["done", "done_with_failures", "failed", "canceled"]);
const LIVE_REFRESH_MS = 1000; // detections are read again at most this often while tiles run
const BOX_LIMIT = 5000; // boxes drawn at most; past it the server answers a density grid
const NOTICE = "Research use only: not for diagnosis.";

// Figures written as the slide report writes them (gateway/slide_report_render.py).
const fixed = (digits) =>
  new Intl.NumberFormat("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
const FMT = {
  count: (n) => fixed(0).format(n),
  perMm2: (v) => fixed(2).format(v),
  fraction: (v) => `${(100 * v).toFixed(2)}%`,
  areaMm2: (v) => fixed(3).format(v),
};

const state = {
  gen: 0, // bumped when another slide is opened: older loops see it and stop
  abort: null,
  slideId: null,
  slide: null,
  how: null,
  viewer: null,
  models: null,
  file: null,
  mask: null, // the tissue mask overlay element, once made
  lastAnnounce: 0,
  lastDone: -1,
};

const classes = new Classes($("#classes"), () => {
  overlay.redraw();
  overlay.refetch();
});

const overlay = new SlideOverlay({
  canvas: $("#overlay"),
  classes,
  minScore: () => Number($("#min-score").value),
  fetchRegion,
  onAnswer: describeAnswer,
  onSelect: describeSelection,
  onError: showError,
});

// --- API ------------------------------------------------------------------------------

const slidePath = (rest = "") => `slides/${encodeURIComponent(state.slideId)}${rest}`;

async function fetchRegion(rect, signal) {
  const params = new URLSearchParams({ ...rect, limit: BOX_LIMIT });
  const min = Number($("#min-score").value);
  if (min > 0) params.set("min_score", min);
  if (classes.hidden.size) params.set("labels", classes.labels.filter((l) => classes.shown(l)));
  const answer = await getJson(slidePath(`/detections?${params}`), { signal });
  for (const b of answer.boxes || []) classes.ensure(b.label);
  for (const c of answer.cells || []) Object.keys(c.counts || {}).forEach((l) => classes.ensure(l));
  return answer;
}

function uploadSlide(file, model) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    if (model) form.append("model", model);
    form.append("file", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", new URL("slides", API));
    if (apiKey()) xhr.setRequestHeader("X-API-Key", apiKey());
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) {
        const pct = Math.round((100 * e.loaded) / e.total);
        setProgress(e.loaded, e.total, `Uploading ${file.name}: ${pct}%`, false);
      }
    };
    xhr.onload = () => {
      const body = xhr.response || {};
      if (xhr.status === 401) reject(refused());
      else if (xhr.status === 202) resolve(body);
      else {
        const detail = typeof body.detail === "string" ? body.detail : xhr.statusText;
        reject(new ApiError(xhr.status, detail));
      }
    };
    xhr.onerror = () => reject(new Error("the upload failed (network error)"));
    xhr.send(form);
  });
}

// --- Following a slide: server-sent events over fetch, else polling -------------------

async function followEvents(gen) {
  let lastId = null;
  let opened = false;
  let failures = 0;
  while (gen === state.gen) {
    let res = null;
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      res = await api(slidePath("/events"), { headers, signal: state.abort.signal });
    } catch (e) {
      if (e instanceof AuthNeeded || e.name === "AbortError") throw e;
    }
    const isStream = res?.ok && (res.headers.get("content-type") || "").includes("event-stream");
    if (!isStream) {
      if (!opened || ++failures > 3) return false; // no event stream here: poll
      await sleep(1000);
      continue;
    }
    if (!opened) {
      opened = true;
      state.how = "server-sent events";
      setMode(`Live updates: ${state.how}.`);
    }
    try {
      for await (const ev of sseEvents(res.body)) {
        if (gen !== state.gen) return true;
        if (ev.id !== null) lastId = ev.id;
        failures = 0;
        if (ev.event === "slide") applySlide(JSON.parse(ev.data), gen);
      }
    } catch (e) {
      if (e.name === "AbortError") throw e;
    }
    if (TERMINAL.has(state.slide?.state)) return true;
    if (++failures > 3) return false;
    await sleep(1000);
  }
  return true;
}

async function pollSlide(gen) {
  state.how = "polling every second";
  setMode(`Live updates: ${state.how}.`);
  while (gen === state.gen && !TERMINAL.has(state.slide?.state)) {
    await sleep(1000);
    if (gen !== state.gen) return;
    applySlide(await getJson(slidePath(), { signal: state.abort.signal }), gen);
  }
}

async function openSlide(slideId) {
  state.abort?.abort();
  state.gen += 1;
  const gen = state.gen;
  closeViewer();
  Object.assign(state, {
    abort: new AbortController(),
    slideId,
    slide: null,
    how: null,
    lastAnnounce: 0,
    lastDone: -1,
  });
  setMode("");
  $("#box-info").textContent = "Click a box to see its class, score and place.";
  const url = new URL(location.href);
  url.searchParams.set("slide", slideId);
  history.replaceState(null, "", url);
  setProgress(0, 1, `Opening slide ${slideId}…`, true);
  try {
    const slide = await getJson(slidePath(), { signal: state.abort.signal });
    if (gen !== state.gen) throw new Stale();
    await modelLabels(slide.model);
    applySlide(slide, gen);
    if (!TERMINAL.has(slide.state)) {
      const followed = await followEvents(gen);
      if (!followed && gen === state.gen) await pollSlide(gen);
      // A last read: the stream ends with the finished slide, but a poll may have missed it.
      if (gen === state.gen) applySlide(await getJson(slidePath()), gen);
    }
    if (gen === state.gen && state.how) setMode(`Followed live by ${state.how}.`);
  } catch (e) {
    if (e instanceof Stale || e.name === "AbortError") return;
    throw e;
  }
}

function applySlide(slide, gen) {
  if (gen !== state.gen) return;
  state.slide = slide;
  const listed = [...$("#slide-pick").options].find((o) => o.value === slide.id);
  if (listed) listed.textContent = slideLabel(slide);
  renderProgress(slide);
  renderSummary(slide);
  for (const c of slide.summary?.classes || []) classes.ensure(c.label);
  if (slide.width && slide.height && !state.viewer) {
    openViewer(slide, gen).catch((e) => {
      // 409: the slide waits for its de-identified copy; the next event tries again.
      if (e instanceof ApiError && e.status === 409) setMode(`Not viewable yet: ${e.message}`);
      else if (!(e instanceof AuthNeeded) && !(e instanceof Stale)) showError(e);
    });
  } else if (state.viewer && slide.tiles.done !== state.lastDone) {
    // New tiles finished: their boxes appear without waiting for the user to move.
    overlay.refetchSoon(TERMINAL.has(slide.state) ? 0 : LIVE_REFRESH_MS);
  }
  state.lastDone = slide.tiles.done;
}

// --- OpenSeadragon ----------------------------------------------------------------------

async function dziSource() {
  // Read with fetch, not by OpenSeadragon, so that a 401 asks for the key like any call.
  const res = await api(slidePath("/dzi"), { signal: state.abort.signal });
  if (!res.ok) throw new ApiError(res.status, await detailOf(res));
  const doc = new DOMParser().parseFromString(await res.text(), "application/xml");
  const image = doc.documentElement;
  const size = image.getElementsByTagNameNS("*", "Size")[0];
  if (image.localName !== "Image" || !size) throw new Error("the Deep Zoom descriptor is not valid");
  return {
    Image: {
      xmlns: image.namespaceURI || "http://schemas.microsoft.com/deepzoom/2008",
      Url: new URL(slidePath("/dzi_files/"), API).href,
      Format: image.getAttribute("Format"),
      Overlap: image.getAttribute("Overlap"),
      TileSize: image.getAttribute("TileSize"),
      Size: { Width: size.getAttribute("Width"), Height: size.getAttribute("Height") },
    },
  };
}

async function openViewer(slide, gen) {
  state.viewer = "opening"; // one viewer per slide, however many events arrive meanwhile
  let source;
  try {
    source = await dziSource();
  } catch (e) {
    if (gen === state.gen) state.viewer = null; // the next event tries again
    throw e;
  }
  if (gen !== state.gen) throw new Stale();
  const key = apiKey();
  const viewer = OSD({
    element: $("#osd"),
    tileSources: source,
    // The page has its own zoom buttons: OpenSeadragon's need images not shipped here.
    showNavigationControl: false,
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    drawer: "canvas",
    loadTilesWithAjax: Boolean(key),
    ajaxHeaders: key ? { "X-API-Key": key } : {},
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    animationTime: 0.5,
  });
  state.viewer = viewer;
  viewer.addHandler("open-failed", (e) => showError(new Error(`the slide did not open: ${e.message}`)));
  viewer.addOnceHandler("open", () => {
    if (gen !== state.gen) return;
    overlay.attach(viewer, viewer.world.getItemAt(0), slide.width, slide.height);
    for (const id of ["#zoom-in", "#zoom-out", "#zoom-home"]) $(id).disabled = false;
    if ($("#show-mask").checked) run(() => showMask(true));
  });
}

function closeViewer() {
  overlay.detach();
  if (state.viewer && state.viewer !== "opening") state.viewer.destroy();
  state.viewer = null;
  state.mask = null;
  $("#osd").replaceChildren();
  for (const id of ["#zoom-in", "#zoom-out", "#zoom-home"]) $(id).disabled = true;
}

async function showMask(on) {
  const viewer = state.viewer;
  if (!viewer || viewer === "opening" || !overlay.tiled) return;
  if (!on) {
    if (state.mask) viewer.removeOverlay(state.mask);
    overlay.outline = null;
    overlay.redraw();
    return;
  }
  if (!state.mask) {
    const gen = state.gen;
    const res = await api(slidePath("/tissue_mask"), { signal: state.abort.signal });
    if (!res.ok) throw new ApiError(res.status, await detailOf(res));
    const bitmap = await createImageBitmap(await res.blob());
    if (gen !== state.gen) return;
    state.mask = tintedMask(bitmap);
  }
  const { width, height } = state.slide;
  const location = overlay.tiled.imageToViewportRectangle(0, 0, width, height);
  viewer.addOverlay({ element: state.mask, location });
  overlay.outline = state.mask.outline;
  overlay.redraw();
}

// The mask (white: tissue) as a faint blue over the tissue, clear over the glass; its
// outline is drawn by the overlay, crisp at any zoom (see maskOutline).
function tintedMask(bitmap) {
  const canvas = document.createElement("canvas");
  const { width: w, height: h } = bitmap;
  Object.assign(canvas, { width: w, height: h, className: "mask-overlay", id: "mask-overlay" });
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const img = ctx.getImageData(0, 0, w, h);
  const px = img.data;
  const tissue = new Uint8Array(w * h);
  for (let i = 0; i < tissue.length; i += 1) {
    tissue[i] = px[4 * i] > 127 ? 1 : 0;
    px.set([0, 114, 178, tissue[i] ? 48 : 0], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
  canvas.outline = maskOutline(tissue, w, h);
  return canvas;
}

// The borders between tissue and glass pixels of the mask, in mask pixels, as one path of
// horizontal and vertical runs (the slide's own edge is no border).
function maskOutline(tissue, w, h) {
  const path = new Path2D();
  const at = (x, y) => tissue[y * w + x];
  for (let y = 1; y < h; y += 1) {
    let start = -1;
    for (let x = 0; x <= w; x += 1) {
      const border = x < w && at(x, y) !== at(x, y - 1);
      if (border && start < 0) start = x;
      if (!border && start >= 0) {
        path.moveTo(start, y);
        path.lineTo(x, y);
        start = -1;
      }
    }
  }
  for (let x = 1; x < w; x += 1) {
    let start = -1;
    for (let y = 0; y <= h; y += 1) {
      const border = y < h && at(x, y) !== at(x - 1, y);
      if (border && start < 0) start = y;
      if (!border && start >= 0) {
        path.moveTo(x, start);
        path.lineTo(x, y);
        start = -1;
      }
    }
  }
  return { path, w, h };
}

// --- Rendering --------------------------------------------------------------------------

function setProgress(value, max, text, announce) {
  const bar = $("#progress");
  bar.max = Math.max(1, max);
  bar.value = value;
  const now = Date.now();
  // The status region is read aloud: at most once a second, and always at the end.
  if (announce || now - state.lastAnnounce > 1000) {
    $("#progress-text").textContent = text;
    state.lastAnnounce = now;
  }
}

function renderProgress(slide) {
  const t = slide.tiles;
  const finished = t.done + t.failed + t.canceled + t.expired;
  const parts = [`${t.done} done`, `${t.failed} failed`];
  for (const s of ["canceled", "expired", "processing", "pending"]) if (t[s]) parts.push(`${t[s]} ${s}`);
  const tiles = `${finished} of ${t.total} tiles finished · ${parts.join(" · ")}`;
  const text = {
    pending: "Waiting: the slide is queued to be planned.",
    processing: `Running: ${tiles}`,
    done: `Complete: ${tiles}`,
    done_with_failures: `Complete with failures: ${tiles}`,
    failed: `Failed: ${slide.error || "the slide could not be planned"}`,
    canceled: `Canceled: ${tiles}`,
  }[slide.state];
  setProgress(finished, t.total, text || slide.state, TERMINAL.has(slide.state));
}

function metaRow(key, name, value, raw) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.dataset.field = key;
  if (raw !== undefined) dd.dataset.value = raw;
  dd.textContent = value;
  return [dt, dd];
}

function figure(field, raw, text) {
  const td = document.createElement("td");
  td.dataset.field = field;
  td.dataset.value = raw;
  td.textContent = text;
  return td;
}

function renderSummary(slide) {
  $("#slide-title").textContent = slide.filename;
  const s = slide.summary;
  const rows = [
    metaRow("state", "State", slide.state.replaceAll("_", " ")),
    metaRow("format", "Format", slide.format),
    metaRow("model", "Model", `${slide.model}, version ${slide.model_version ?? "not known yet"}`),
  ];
  if (slide.width) {
    const size = `${FMT.count(slide.width)} × ${FMT.count(slide.height)} px`;
    rows.push(metaRow("size", "Size", size));
  }
  if (slide.mpp) rows.push(metaRow("mpp", "Resolution", `${slide.mpp[0].toFixed(4)} µm/px`));
  if (s) {
    const area = `${FMT.areaMm2(s.tissue_area_mm2)} mm²`;
    rows.push(metaRow("tissue_area_mm2", "Tissue area", area, s.tissue_area_mm2));
    const band = s.steatosis_band ?? "not given";
    rows.push(metaRow("steatosis_band", "Steatosis band", band, s.steatosis_band ?? ""));
  }
  $("#slide-meta").replaceChildren(...rows.flat());
  const body = (s?.classes || []).map((c) => {
    const tr = document.createElement("tr");
    tr.dataset.label = c.label;
    const th = document.createElement("th");
    th.scope = "row";
    th.append(classes.swatch(c.label), document.createTextNode(c.label));
    tr.append(
      th,
      figure("count", c.count, FMT.count(c.count)),
      figure("per_mm2", c.per_mm2, FMT.perMm2(c.per_mm2)),
      figure("area_fraction", c.area_fraction, FMT.fraction(c.area_fraction)),
    );
    return tr;
  });
  $("#slide-counts tbody").replaceChildren(...body);
  $("#slide-counts caption").textContent = s
    ? "Detections on the slide"
    : "Detections on the slide (when it is finished)";
  $("#notice").textContent = s?.notice || NOTICE;
  $("#notice").hidden = false;
  $("#link-geojson").href = new URL(slidePath("/export?format=geojson"), API).href;
  $("#link-csv").href = new URL(slidePath("/export?format=csv"), API).href;
  $("#link-report").href = new URL(slidePath("/report"), API).href;
  $("#links").hidden = !TERMINAL.has(slide.state) || slide.state === "failed";
}

function describeAnswer(answer) {
  const legend = $("#heat-legend");
  if (answer.mode === "density") {
    const max = overlay.densityMax();
    $("#overlay-state").textContent =
      `${answer.count} detections in view, too many to draw: shown as a density heat map ` +
      `(cells of ${answer.cell} px). Zoom in to see the boxes.`;
    $("#heat-max").textContent = `${max} per cell`;
    legend.hidden = false;
  } else {
    const shown = overlay.shownBoxes().length;
    $("#overlay-state").textContent = `${shown} of ${answer.count} detections in view shown.`;
    legend.hidden = true;
  }
}

function describeSelection(box, cell) {
  const info = $("#box-info");
  delete info.dataset.boxId;
  if (box) {
    const r = (v) => Math.round(v);
    info.dataset.boxId = box.id;
    info.replaceChildren(
      classes.swatch(box.label),
      document.createTextNode(
        `${box.label} · score ${box.score.toFixed(2)} · level-0 x ${r(box.x1)}–${r(box.x2)}, ` +
          `y ${r(box.y1)}–${r(box.y2)} (${r(box.x2 - box.x1)} × ${r(box.y2 - box.y1)} px)`,
      ),
    );
  } else if (cell) {
    const counts = Object.entries(cell.counts).map(([l, n]) => `${n} ${l}`);
    info.textContent = `This cell (level-0 x ${cell.x}, y ${cell.y}, ${cell.w} × ${cell.h} px): ${
      counts.join(", ") || "no detections"
    }.`;
  } else {
    info.textContent = "Click a box to see its class, score and place.";
  }
}

function setMode(text) {
  $("#live-mode").textContent = text;
}

function drawRamp() {
  const canvas = $("#heat-ramp");
  const ctx = canvas.getContext("2d");
  for (let x = 0; x < canvas.width; x += 1) {
    const [r, g, b] = heatColor(x / (canvas.width - 1));
    ctx.fillStyle = `rgb(${r}, ${g}, ${b})`;
    ctx.fillRect(x, 0, 1, canvas.height);
  }
}

// --- Inputs -----------------------------------------------------------------------------

async function loadModels() {
  if (!state.models) state.models = await getJson("models");
  const select = $("#slide-model");
  if (select.options.length > 1 || select.value) return;
  const detectors = state.models.filter((m) => m.task === "detect");
  select.replaceChildren(
    ...detectors.map((m) => {
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = `${m.name}${m.default ? " (default)" : ""}`;
      o.selected = m.default;
      return o;
    }),
  );
}

async function modelLabels(name) {
  await loadModels();
  const model = state.models.find((m) => m.name === name);
  for (const label of model?.labels || []) classes.ensure(label);
}

const slideLabel = (s) =>
  `${s.filename} · ${s.state.replaceAll("_", " ")} · ${s.created_at.slice(0, 16).replace("T", " ")}`;

async function loadSlides() {
  const { slides } = await getJson("slides?limit=200");
  const select = $("#slide-pick");
  const options = slides.map((s) => {
    const o = document.createElement("option");
    o.value = s.id;
    o.textContent = slideLabel(s);
    o.selected = s.id === state.slideId;
    return o;
  });
  if (!options.length) options.push(new Option("no slides yet", ""));
  select.replaceChildren(...options);
}

function chooseFile(file) {
  state.file = file || null;
  $("#slide-picked").textContent = file
    ? `${file.name} (${(file.size / 1048576).toFixed(1)} MiB) chosen.`
    : "No slide file chosen.";
  $("#slide-upload").disabled = !file;
}

// A link that needs the key cannot send it: fetch the file with it and save that instead.
function keyedDownload(link, name) {
  link.addEventListener("click", (e) => {
    if (!apiKey()) return;
    e.preventDefault();
    run(async () => {
      const res = await api(link.href);
      if (!res.ok) throw new ApiError(res.status, await detailOf(res));
      const url = URL.createObjectURL(await res.blob());
      const a = Object.assign(document.createElement("a"), { href: url, download: name() });
      a.click();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    });
  });
}

function wire() {
  wireKeyForm();
  drawRamp();
  $("#pick-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("#slide-pick").value;
    if (id) run(() => openSlide(id));
  });
  $("#slide-file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  wireDropZone($("#drop"), $("#slide-file"), (dt) => chooseFile(dt.files[0]));
  $("#slide-upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const file = state.file;
    const model = $("#slide-model").value;
    run(async () => {
      $("#slide-upload").disabled = true;
      try {
        const accepted = await uploadSlide(file, model);
        chooseFile(null);
        $("#slide-file").value = "";
        state.slideId = accepted.slide_id;
        loadSlides().catch(() => {});
        await openSlide(accepted.slide_id);
      } finally {
        $("#slide-upload").disabled = !state.file;
      }
    });
  });
  $("#min-score").addEventListener("input", (e) => {
    $("#min-score-out").textContent = Number(e.target.value).toFixed(2);
    overlay.redraw();
    overlay.refetch();
  });
  $("#show-boxes").addEventListener("change", (e) => {
    overlay.visible = e.target.checked;
    overlay.redraw();
  });
  $("#show-mask").addEventListener("change", (e) => run(() => showMask(e.target.checked)));
  $("#zoom-in").addEventListener("click", () => state.viewer?.viewport.zoomBy(2));
  $("#zoom-out").addEventListener("click", () => state.viewer?.viewport.zoomBy(0.5));
  $("#zoom-home").addEventListener("click", () => state.viewer?.viewport.goHome());
  keyedDownload($("#link-geojson"), () => `hepato-slide-${state.slideId}.geojson`);
  keyedDownload($("#link-csv"), () => `hepato-slide-${state.slideId}.csv`);
  keyedDownload($("#link-report"), () => `hepato-slide-${state.slideId}-report.html`);
}

// For tests and the browser console: the viewer, and the boxes drawn now, each with its
// level-0 box and its place on the overlay canvas (CSS pixels).
window.hepatoSlide = {
  get viewer() {
    return state.viewer && state.viewer !== "opening" ? state.viewer : null;
  },
  drawn: () => overlay.drawn.map(({ box, x, y, w, h }) => ({ ...box, screen: { x, y, w, h } })),
  answer: () => overlay.answer,
  // The viewport still, its tiles loaded, and the overlay drawn for where it stands.
  settled() {
    const v = this.viewer;
    const item = v?.world.getItemAt(0);
    if (!item || !overlay.tiled || !overlay.idle || !item.getFullyLoaded()) return false;
    const vp = v.viewport;
    return vp.getZoom(true) === vp.getZoom(false) && vp.getCenter(true).equals(vp.getCenter(false));
  },
};

wire();
const initial = new URL(location.href).searchParams.get("slide");
// The list and the slide may need a key: this is the action retried after one.
run(async () => {
  await loadModels();
  await loadSlides();
  if (initial) await openSlide(initial);
});
