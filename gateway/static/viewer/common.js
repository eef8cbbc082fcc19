// What the viewer's pages share: API calls with the key header, the key form, errors, the
// server-sent events reader, and the class colours with their checkboxes.
// Every API call goes through fetch (or XHR for upload progress) so that an API key can be
// sent as a header; images therefore arrive as blobs, since <img src> cannot send one.

export const API = new URL("../v1/", location.href);
export const KEY_STORE = "hepato.apiKey";
// Okabe-Ito colours: told apart with colour-blindness, and black text reads on each.
export const COLORS = {
  fibrosis: "#56B4E9",
  inflammation: "#E69F00",
  steatosis: "#009E73",
  ballooning: "#F0E442",
};
export const EXTRA_COLORS = ["#FFFFFF", "#D55E00", "#CC79A7", "#0072B2", "#999999"];

export const $ = (sel) => document.querySelector(sel);
export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class AuthNeeded extends Error {}
export class Stale extends Error {}
export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
  }
}

// --- API ------------------------------------------------------------------------------

export const apiKey = () => sessionStorage.getItem(KEY_STORE);

export function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, "X-API-Key": key } : extra;
}

export function refused() {
  askForKey(apiKey() ? "The API key was refused." : null);
  return new AuthNeeded("an API key is needed");
}

export async function api(path, options = {}) {
  const res = await fetch(new URL(path, API), {
    ...options,
    headers: authHeaders(options.headers),
  });
  if (res.status === 401) throw refused();
  return res;
}

export async function detailOf(res) {
  try {
    const body = await res.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return res.statusText;
  }
}

export async function getJson(path, options) {
  const res = await api(path, options);
  if (!res.ok) throw new ApiError(res.status, await detailOf(res));
  return res.json();
}

// --- Server-sent events over fetch (EventSource cannot send the key header) ------------

export async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) yield { ...event, data: event.data.join("\n") };
        event = { event: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) continue; // keep-alive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const raw = colon < 0 ? "" : line.slice(colon + 1);
      const val = raw.startsWith(" ") ? raw.slice(1) : raw;
      if (field === "event") event.event = val;
      else if (field === "data") event.data.push(val);
      else if (field === "id") event.id = val;
    }
  }
}

// --- Errors, actions and the key form ---------------------------------------------------

export function showError(e) {
  const box = $("#error");
  box.textContent = e instanceof ApiError ? `The server answered ${e.message}` : String(e.message || e);
  box.hidden = false;
}

let lastAction = null;

// Runs a user action; the last one is run again once a key is entered.
export function run(action) {
  lastAction = action;
  $("#error").hidden = true;
  action().catch((e) => {
    if (!(e instanceof AuthNeeded) && !(e instanceof Stale) && e.name !== "AbortError") {
      showError(e);
    }
  });
}

export function askForKey(problem) {
  const section = $("#key-section");
  section.hidden = false;
  if (problem) $("#key-why").textContent = `${problem} Enter a valid API key.`;
  $("#api-key").focus();
}

// A drop zone that also opens `input`'s file chooser on click, Enter or Space; what is
// dropped goes to `onDrop` (the DataTransfer).
export function wireDropZone(drop, input, onDrop) {
  drop.addEventListener("click", () => input.click());
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    onDrop(e.dataTransfer);
  });
}

export function wireKeyForm() {
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("#api-key").value.trim());
    $("#api-key").value = "";
    $("#key-section").hidden = true;
    if (lastAction) run(lastAction);
  });
}

// --- Classes: colours, checkboxes and swatches --------------------------------------------

export class Classes {
  constructor(fieldset, onChange) {
    this.fieldset = fieldset;
    this.onChange = onChange;
    this.labels = [];
    this.colors = new Map(Object.entries(COLORS));
    this.hidden = new Set();
  }

  ensure(label) {
    if (this.labels.includes(label)) return;
    this.labels.push(label);
    if (!this.colors.has(label)) {
      const extra = this.colors.size - Object.keys(COLORS).length;
      this.colors.set(label, EXTRA_COLORS[extra % EXTRA_COLORS.length]);
    }
    const id = `class-${this.labels.length}`;
    const wrap = document.createElement("label");
    wrap.className = "inline class-toggle";
    wrap.htmlFor = id;
    const box = document.createElement("input");
    box.type = "checkbox";
    box.id = id;
    box.value = label;
    box.checked = !this.hidden.has(label);
    box.addEventListener("change", () => {
      if (box.checked) this.hidden.delete(label);
      else this.hidden.add(label);
      this.onChange();
    });
    wrap.append(box, this.swatch(label), document.createTextNode(label));
    this.fieldset.append(wrap);
  }

  shown(label) {
    return !this.hidden.has(label);
  }

  swatch(label) {
    const s = document.createElement("span");
    s.className = "swatch";
    s.setAttribute("aria-hidden", "true");
    s.style.backgroundColor = this.colors.get(label);
    return s;
  }
}
