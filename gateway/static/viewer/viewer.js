// HepatoAI viewer: plain ES module, no build step, nothing loaded from other origins.
// Every API call goes through fetch (or XHR for upload progress) so that an API key can be
// sent as a header; images therefore arrive as blobs, since <img src> cannot send one.

import {
  $,
  API,
  ApiError,
  AuthNeeded,
  Classes,
  COLORS,
  Stale,
  refused,
  apiKey,
  detailOf,
  getJson,
  api,
  run,
  showError,
  sleep,
  sseEvents,
  wireKeyForm,
  wireDropZone,
} from "./common.js";

const PAGE_SIZE = 500; // jobs per GET /v1/batches page (the server allows up to 1000)
const CARDS_PER_STEP = 48;
const FETCH_CONCURRENCY = 4;
const TERMINAL = new Set(["done", "failed", "canceled", "expired"]);
const IMAGE_NAME = /\.(jpe?g|png|tiff?|bmp|webp)$/i;

const state = {
  gen: 0, // bumped when another batch is opened: older loops see it and stop
  abort: null,
  batchId: null,
  total: 0,
  jobs: new Map(), // job id -> job as GET /v1/jobs/{id} returns it, plus _v
  order: [],
  minScore: 0,
  onlyHits: false,
  limit: CARDS_PER_STEP,
  files: [],
  cards: new Map(),
  blobUrls: [],
  fetchQueue: [],
  fetching: 0,
  lastAnnounce: 0,
  how: null, // how the open batch is followed live, once it is
  view: 0, // bumped when a filter changes: every card redraws
};

// --- API ------------------------------------------------------------------------------

function uploadBatch(files, model) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    if (model) form.append("model", model);
    for (const f of files) form.append("files", f, f.webkitRelativePath || f.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", new URL("batches", API));
    if (apiKey()) xhr.setRequestHeader("X-API-Key", apiKey());
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) {
        const pct = Math.round((100 * e.loaded) / e.total);
        setProgress(e.loaded, e.total, `Uploading ${files.length} images: ${pct}%`, false);
      }
    };
    xhr.onload = () => {
      const body = xhr.response || {};
      if (xhr.status === 401) {
        reject(refused());
      } else if (xhr.status === 202) {
        resolve(body);
      } else {
        showRejected(body.rejected || []);
        const detail = typeof body.detail === "string" ? body.detail : xhr.statusText;
        reject(new ApiError(xhr.status, detail));
      }
    };
    xhr.onerror = () => reject(new Error("the upload failed (network error)"));
    xhr.send(form);
  });
}

// --- Batch state -----------------------------------------------------------------------

const rank = (s) => (TERMINAL.has(s) ? 2 : s === "processing" ? 1 : 0);

function mergeJob(job) {
  const old = state.jobs.get(job.id);
  if (!old) {
    state.order.push(job.id);
    state.jobs.set(job.id, { ...job, _v: 1 });
  } else if (rank(job.state) >= rank(old.state)) {
    // A later read may be older news (a page read before an event arrived): keep the
    // furthest state, and a result once seen.
    const changed = job.state !== old.state || (job.result && !old.result);
    Object.assign(old, job, { result: job.result ?? old.result });
    if (changed) old._v += 1;
  }
  for (const box of state.jobs.get(job.id).result?.boxes || []) classes.ensure(box.label);
}

function stateCounts() {
  const counts = { pending: 0, processing: 0, done: 0, failed: 0, canceled: 0, expired: 0 };
  for (const job of state.jobs.values()) counts[job.state] = (counts[job.state] || 0) + 1;
  return counts;
}

const allFinished = () =>
  state.jobs.size >= state.total && [...state.jobs.values()].every((j) => TERMINAL.has(j.state));

async function syncPages(gen, { skipFinished = false } = {}) {
  for (let page = 1; ; page += 1) {
    const start = (page - 1) * PAGE_SIZE;
    if (page > 1 && start >= state.total) break;
    const ids = state.order.slice(start, start + PAGE_SIZE);
    // Page 1 is always read (it carries the total); a full page of finished jobs never
    // changes again.
    const finished =
      ids.length === PAGE_SIZE && ids.every((id) => TERMINAL.has(state.jobs.get(id).state));
    if (skipFinished && page > 1 && finished) continue;
    const body = await getJson(
      `batches/${encodeURIComponent(state.batchId)}?page=${page}&page_size=${PAGE_SIZE}`,
      { signal: state.abort.signal },
    );
    if (gen !== state.gen) throw new Stale();
    state.total = body.total;
    body.jobs.forEach(mergeJob);
    if (!body.next_page_url) break;
  }
  scheduleRender();
}

function fetchResult(jobId) {
  state.fetchQueue.push(jobId);
  pumpFetches(state.gen);
}

function pumpFetches(gen) {
  while (state.fetching < FETCH_CONCURRENCY && state.fetchQueue.length) {
    const id = state.fetchQueue.shift();
    state.fetching += 1;
    getJson(`jobs/${encodeURIComponent(id)}`, { signal: state.abort.signal })
      .then((job) => {
        if (gen === state.gen) {
          mergeJob(job);
          scheduleRender();
        }
      })
      .catch((e) => gen === state.gen && !(e instanceof AuthNeeded) && showError(e))
      .finally(() => {
        state.fetching -= 1;
        if (gen === state.gen) pumpFetches(gen);
      });
  }
}

function onJobEvent(data) {
  const job = state.jobs.get(data.job_id);
  if (!job || rank(data.state) < rank(job.state)) return;
  if (job.state !== data.state) {
    job.state = data.state;
    job.error = data.error ?? job.error;
    job._v += 1;
  }
  if (data.state === "done" && !job.result) fetchResult(data.job_id);
  scheduleRender();
}

async function followEvents(gen) {
  let lastId = null;
  let opened = false;
  let failures = 0;
  while (gen === state.gen) {
    let res = null;
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      res = await api(`batches/${encodeURIComponent(state.batchId)}/events`, {
        headers,
        signal: state.abort.signal,
      });
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
      // Events from before the stream opened may not be in it: read the pages once more.
      await syncPages(gen, { skipFinished: true });
    }
    let ended = false;
    try {
      for await (const ev of sseEvents(res.body)) {
        if (gen !== state.gen) return true;
        if (ev.id !== null) lastId = ev.id;
        failures = 0;
        if (ev.event === "job") onJobEvent(JSON.parse(ev.data));
        else if (ev.event === "batch") ended = true;
      }
    } catch (e) {
      if (e.name === "AbortError") throw e;
    }
    if (ended || allFinished()) return true;
    if (++failures > 3) return false;
    await sleep(1000);
  }
  return true;
}

async function pollBatch(gen) {
  state.how = "polling every second";
  setMode(`Live updates: ${state.how}.`);
  while (gen === state.gen && !allFinished()) {
    await sleep(1000);
    if (gen !== state.gen) return;
    await syncPages(gen, { skipFinished: true });
  }
}

async function openBatch(batchId) {
  state.abort?.abort();
  state.gen += 1;
  const gen = state.gen;
  for (const url of state.blobUrls) URL.revokeObjectURL(url);
  Object.assign(state, {
    abort: new AbortController(),
    batchId,
    total: 0,
    jobs: new Map(),
    order: [],
    cards: new Map(),
    blobUrls: [],
    fetchQueue: [],
    limit: CARDS_PER_STEP,
    lastAnnounce: 0,
    how: null,
  });
  $("#grid").replaceChildren();
  $("#batch-id").value = batchId;
  setMode("");
  const url = new URL(location.href);
  url.searchParams.set("batch", batchId);
  history.replaceState(null, "", url);
  setProgress(0, 1, `Opening batch ${batchId}…`, true);
  try {
    await syncPages(gen);
    if (!allFinished()) {
      const followed = await followEvents(gen);
      if (!followed && gen === state.gen) await pollBatch(gen);
      // A last full read: results of jobs whose events came while a fetch was failing.
      if (gen === state.gen) await syncPages(gen, { skipFinished: true });
    }
    if (gen === state.gen && state.how) setMode(`Followed live by ${state.how}.`);
  } catch (e) {
    if (e instanceof Stale || e.name === "AbortError") return;
    throw e;
  }
}

// --- Rendering -------------------------------------------------------------------------

const classes = new Classes($("#classes"), () => {
  state.view += 1;
  scheduleRender();
});

const swatch = (label) => classes.swatch(label);

function shownBoxes(job) {
  const boxes = job.result?.task === "detect" ? job.result.boxes : [];
  return boxes.filter((b) => b.score >= state.minScore && classes.shown(b.label));
}

function countBy(boxes) {
  const counts = new Map();
  for (const b of boxes) counts.set(b.label, (counts.get(b.label) || 0) + 1);
  return counts;
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  setTimeout(() => {
    renderPending = false;
    render();
  }, 100);
}

function render() {
  renderProgress();
  renderBatchCounts();
  renderGrid();
}

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

function renderProgress() {
  if (!state.batchId) return;
  const c = stateCounts();
  const finished = c.done + c.failed + c.canceled + c.expired;
  const parts = [`${c.done} done`, `${c.failed} failed`];
  for (const s of ["canceled", "expired", "processing", "pending"]) {
    if (c[s]) parts.push(`${c[s]} ${s}`);
  }
  const complete = allFinished();
  const text = `${complete ? "Complete" : "Running"}: ${finished} of ${state.total} finished · ${parts.join(" · ")}`;
  setProgress(finished, state.total, text, complete);
}

function renderBatchCounts() {
  const boxes = new Map();
  const images = new Map();
  let shown = 0;
  let shownImages = 0;
  for (const job of state.jobs.values()) {
    const all = job.result?.task === "detect" ? job.result.boxes : [];
    const counts = countBy(all.filter((b) => b.score >= state.minScore));
    for (const [label, n] of counts) {
      boxes.set(label, (boxes.get(label) || 0) + n);
      images.set(label, (images.get(label) || 0) + 1);
    }
    const n = shownBoxes(job).length;
    shown += n;
    if (n) shownImages += 1;
  }
  const rows = classes.labels.map((label) => {
    const tr = document.createElement("tr");
    tr.dataset.label = label;
    if (!classes.shown(label)) tr.className = "off";
    const th = document.createElement("th");
    th.scope = "row";
    th.append(swatch(label), document.createTextNode(label));
    const td1 = document.createElement("td");
    td1.textContent = boxes.get(label) || 0;
    const td2 = document.createElement("td");
    td2.textContent = images.get(label) || 0;
    tr.append(th, td1, td2);
    return tr;
  });
  $("#batch-counts tbody").replaceChildren(...rows);
  $("#boxes-shown").textContent = shown;
  $("#images-shown").textContent = shownImages;
}

const imageObserver = new IntersectionObserver(
  (entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      imageObserver.unobserve(entry.target);
      loadImage(entry.target.dataset.job, state.gen);
    }
  },
  { rootMargin: "400px" },
);

async function loadImage(jobId, gen) {
  const card = state.cards.get(jobId);
  if (!card) return;
  try {
    const res = await api(`jobs/${encodeURIComponent(jobId)}/image`, {
      signal: state.abort.signal,
    });
    if (!res.ok) throw new ApiError(res.status, await detailOf(res));
    const url = URL.createObjectURL(await res.blob());
    if (gen !== state.gen) return URL.revokeObjectURL(url);
    state.blobUrls.push(url);
    card.img.src = url;
  } catch (e) {
    if (e.name !== "AbortError" && gen === state.gen) card.li.classList.add("no-image");
  }
}

function makeCard(job) {
  const li = document.createElement("li");
  li.className = "card";
  li.dataset.job = job.id;
  li.dataset.filename = job.filename;
  const figure = document.createElement("figure");
  const frame = document.createElement("div");
  frame.className = "frame";
  frame.dataset.job = job.id;
  frame.style.aspectRatio = `${job.width} / ${job.height}`;
  const img = document.createElement("img");
  img.alt = `Uploaded image ${job.filename}, ${job.width} × ${job.height} pixels`;
  img.decoding = "async";
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.classList.add("overlay");
  svg.setAttribute("viewBox", `0 0 ${job.width} ${job.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  const caption = document.createElement("figcaption");
  frame.append(img, svg);
  figure.append(frame, caption);
  li.append(figure);
  imageObserver.observe(frame);
  return { li, img, svg, caption, drawn: "" };
}

function svgEl(name, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function drawBoxes(card, job, boxes) {
  const size = Math.max(job.width, job.height);
  const font = Math.max(8, size / 28);
  const groups = boxes.map((b) => {
    const color = classes.colors.get(b.label);
    const g = svgEl("g", { class: "det", "data-label": b.label });
    const title = svgEl("title", {});
    title.textContent = `${b.label} ${b.score.toFixed(2)}`;
    const common = { x: b.x1, y: b.y1, width: b.x2 - b.x1, height: b.y2 - b.y1 };
    const halo = svgEl("rect", { ...common, class: "halo" });
    const rect = svgEl("rect", { ...common, class: "box", stroke: color, "data-label": b.label });
    const text = `${b.label} ${b.score.toFixed(2)}`;
    const above = b.y1 >= font * 1.25;
    const ty = above ? b.y1 - font * 1.25 : b.y1;
    const tagWidth = font * 0.62 * text.length + font * 0.4;
    // Kept inside the image, where the card would clip it.
    const tx = Math.max(0, Math.min(b.x1, job.width - tagWidth));
    const tag = svgEl("rect", {
      x: tx,
      y: ty,
      width: tagWidth,
      height: font * 1.25,
      fill: color,
      class: "tag",
    });
    const label = svgEl("text", {
      x: tx + font * 0.2,
      y: ty + font,
      "font-size": font,
      class: "label",
    });
    label.textContent = text;
    g.append(title, halo, rect, tag, label);
    return g;
  });
  card.svg.replaceChildren(...groups);
}

function summary(job) {
  const r = job.result;
  if (!r) return "";
  if (r.task === "classify") {
    const top = r.labels[0];
    return top ? `${top.label} ${(100 * top.probability).toFixed(0)}%` : "";
  }
  if (r.task === "zero-shot") {
    const top = r.scores[0];
    return top ? `${top.label} ${(100 * top.probability).toFixed(0)}%` : "";
  }
  if (r.task === "vqa") return `${r.question} → ${r.answer}`;
  return "";
}

function updateCard(card, job) {
  const key = `${job._v}/${state.view}`;
  if (card.drawn === key) return;
  card.drawn = key;
  const boxes = shownBoxes(job);
  drawBoxes(card, job, boxes);
  const counts = countBy(boxes);
  const described = [...counts].map(([label, n]) => `${n} ${label}`).join(", ");
  card.svg.setAttribute(
    "aria-label",
    boxes.length ? `${boxes.length} boxes shown: ${described}` : "no boxes shown",
  );
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = job.filename;
  const badge = document.createElement("span");
  badge.className = `badge state-${job.state}`;
  badge.textContent = job.state;
  const chips = document.createElement("ul");
  chips.className = "chips";
  chips.setAttribute("aria-label", `Boxes shown in ${job.filename}`);
  for (const [label, n] of counts) {
    const chip = document.createElement("li");
    chip.dataset.label = label;
    chip.append(swatch(label), document.createTextNode(`${label} ${n}`));
    chips.append(chip);
  }
  const parts = [name, badge, chips];
  const extra = job.state === "failed" || job.state === "expired" ? job.error : summary(job);
  if (extra) {
    const p = document.createElement("p");
    p.className = job.state === "done" ? "summary" : "job-error";
    p.textContent = extra;
    parts.push(p);
  }
  card.caption.replaceChildren(...parts);
}

function renderGrid() {
  let ids = state.order;
  if (state.onlyHits) ids = ids.filter((id) => shownBoxes(state.jobs.get(id)).length);
  const visible = ids.slice(0, state.limit);
  const items = visible.map((id) => {
    const job = state.jobs.get(id);
    let card = state.cards.get(id);
    if (!card) {
      card = makeCard(job);
      state.cards.set(id, card);
    }
    updateCard(card, job);
    return card.li;
  });
  const grid = $("#grid");
  const same =
    grid.children.length === items.length && items.every((li, i) => grid.children[i] === li);
  if (!same) grid.replaceChildren(...items);
  const more = $("#more");
  more.hidden = ids.length <= visible.length;
  more.textContent = `Show more images (${visible.length} of ${ids.length} shown)`;
}

function setMode(text) {
  $("#live-mode").textContent = text;
}

// --- Inputs ----------------------------------------------------------------------------

function showRejected(rejected) {
  const items = rejected.map((r) => {
    const li = document.createElement("li");
    li.textContent = `${r.filename}: refused (${r.status_code}) ${r.error}`;
    return li;
  });
  $("#rejected").replaceChildren(...items);
}

function chooseFiles(files) {
  const all = [...files];
  state.files = all.filter((f) => f.type.startsWith("image/") || IMAGE_NAME.test(f.name));
  const skipped = all.length - state.files.length;
  const bytes = state.files.reduce((n, f) => n + f.size, 0);
  let text = state.files.length
    ? `${state.files.length} images chosen (${(bytes / 1048576).toFixed(1)} MiB).`
    : "No images chosen.";
  if (skipped) text += ` ${skipped} other files skipped.`;
  $("#picked").textContent = text;
  $("#upload").disabled = !state.files.length;
}

async function fileOf(entry) {
  return new Promise((resolve, reject) => entry.file(resolve, reject));
}

async function walk(entry, prefix, out) {
  if (entry.isFile) {
    const f = await fileOf(entry);
    out.push(new File([f], prefix + f.name, { type: f.type, lastModified: f.lastModified }));
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      for (const child of batch) await walk(child, `${prefix}${entry.name}/`, out);
    }
  }
}

async function droppedFiles(dataTransfer) {
  // Entries must be taken before the first await: the DataTransfer empties after the event.
  const entries = [...dataTransfer.items].map((i) => i.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...dataTransfer.files];
  const out = [];
  for (const entry of entries) await walk(entry, "", out);
  return out;
}

async function loadModels() {
  const models = await getJson("models");
  const select = $("#model");
  select.replaceChildren(
    ...models.map((m) => {
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = `${m.name} (${m.task}${m.default ? ", default" : ""})`;
      o.selected = m.default;
      o.dataset.labels = JSON.stringify(m.labels);
      return o;
    }),
  );
  const chosen = select.selectedOptions[0];
  if (chosen) JSON.parse(chosen.dataset.labels).forEach((l) => classes.ensure(l));
}

function wire() {
  Object.keys(COLORS).forEach((l) => classes.ensure(l));
  $("#files").addEventListener("change", (e) => chooseFiles(e.target.files));
  $("#folder").addEventListener("change", (e) => chooseFiles(e.target.files));
  wireDropZone($("#drop"), $("#files"), (dt) => droppedFiles(dt).then(chooseFiles, showError));
  $("#model").addEventListener("change", (e) => {
    const o = e.target.selectedOptions[0];
    if (o) JSON.parse(o.dataset.labels).forEach((l) => classes.ensure(l));
    scheduleRender();
  });
  $("#upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const files = state.files;
    const model = $("#model").value;
    run(async () => {
      $("#upload").disabled = true;
      showRejected([]);
      try {
        const accepted = await uploadBatch(files, model);
        showRejected(accepted.rejected);
        await openBatch(accepted.batch_id);
      } finally {
        $("#upload").disabled = !state.files.length;
      }
    });
  });
  $("#open-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const id = $("#batch-id").value.trim();
    run(() => openBatch(id));
  });
  wireKeyForm();
  $("#min-score").addEventListener("input", (e) => {
    state.minScore = Number(e.target.value);
    $("#min-score-out").textContent = state.minScore.toFixed(2);
    state.view += 1;
    scheduleRender();
  });
  $("#thumb-size").addEventListener("input", (e) => {
    $("#grid").style.setProperty("--thumb", `${e.target.value}px`);
    $("#thumb-size-out").textContent = `${e.target.value} px`;
  });
  $("#only-hits").addEventListener("change", (e) => {
    state.onlyHits = e.target.checked;
    scheduleRender();
  });
  $("#more").addEventListener("click", () => {
    state.limit += CARDS_PER_STEP;
    renderGrid();
  });
}

wire();
run(loadModels);
const initial = new URL(location.href).searchParams.get("batch");
if (initial) {
  // Models are open; the batch may need a key: this is the action retried after one.
  run(() => openBatch(initial));
}
