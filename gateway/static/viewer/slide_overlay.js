// The detections over a slide: one canvas above OpenSeadragon, redrawn at every frame of
// the viewport from the last answer of GET /v1/slides/{id}/detections for the visible
// level-0 rectangle (fetched again, debounced, when the viewport settles). Boxes are drawn
// per class in the viewer's colours; where the server answers a density grid (too many
// boxes in view to draw), the grid is drawn as a heat map.
//
// A canvas, not SVG or OpenSeadragon overlays: tens of thousands of DOM nodes would not pan
// smoothly, while a canvas redraw of the boxes in view costs a few milliseconds.

const FETCH_DEBOUNCE_MS = 250;
const PAD = 0.1; // the rectangle asked for is the view plus this much of it on each side
const TAGS_UP_TO = 400; // boxes in view past which labels are not written
const TAG_MIN_PX = 28; // boxes narrower than this on screen get no label
const HIT_SLOP_PX = 3;

// Viridis: ordered by lightness, read with colour-blindness and in greyscale print.
const RAMP = [
  [68, 1, 84],
  [59, 82, 139],
  [33, 145, 140],
  [94, 201, 98],
  [253, 231, 37],
];

export function heatColor(t) {
  const x = Math.min(1, Math.max(0, t)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x));
  const f = x - i;
  return RAMP[i].map((c, k) => Math.round(c + f * (RAMP[i + 1][k] - c)));
}

export class SlideOverlay {
  // fetchRegion(rect, signal) -> the detections answer; minScore() -> the slider's value;
  // onAnswer(answer) after each answer is drawn; onSelect(text or null) on a click.
  constructor({ canvas, classes, minScore, fetchRegion, onAnswer, onSelect, onError }) {
    Object.assign(this, { canvas, classes, minScore, fetchRegion, onAnswer, onSelect, onError });
    this.viewer = null;
    this.tiled = null;
    this.answer = null;
    this.drawn = [];
    this.selected = null;
    this.visible = true;
    this.outline = null; // the tissue mask's outline ({path, w, h} in mask pixels), when shown
    this.seq = 0;
    this.timer = null;
    this.abort = null;
    this.inFlight = 0;
    this.frame = 0;
  }

  // No fetch waiting or under way: the answer drawn is for where the viewport stands.
  get idle() {
    return this.timer === null && this.inFlight === 0;
  }

  attach(viewer, tiled, width, height) {
    this.detach();
    Object.assign(this, { viewer, tiled, width, height });
    const redraw = () => this.redraw();
    viewer.addHandler("update-viewport", redraw);
    viewer.addHandler("resize", redraw);
    viewer.addHandler("viewport-change", () => this.refetch());
    viewer.addHandler("canvas-click", (e) => this.click(e));
    this.refetch(0);
  }

  detach() {
    clearTimeout(this.timer);
    this.timer = null;
    this.abort?.abort();
    Object.assign(this, { viewer: null, tiled: null, answer: null, selected: null, outline: null });
    this.seq += 1;
    this.redraw();
  }

  // Fetch the view's detections once the viewport has been still for a moment.
  refetch(delay = FETCH_DEBOUNCE_MS) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.fetch(), delay);
  }

  // As refetch, but leaves an already scheduled fetch where it is (live progress ticks).
  refetchSoon(delay) {
    if (!this.timer) this.refetch(delay);
  }

  // The view's level-0 rectangle (where the viewport is heading), padded, inside the slide.
  region() {
    const view = this.tiled.viewportToImageRectangle(this.viewer.viewport.getBounds(false));
    const px = view.width * PAD;
    const py = view.height * PAD;
    const x0 = Math.max(0, Math.floor(view.x - px));
    const y0 = Math.max(0, Math.floor(view.y - py));
    const x1 = Math.min(this.width, Math.ceil(view.x + view.width + px));
    const y1 = Math.min(this.height, Math.ceil(view.y + view.height + py));
    return x1 > x0 && y1 > y0 ? { x: x0, y: y0, w: x1 - x0, h: y1 - y0 } : null;
  }

  async fetch() {
    this.timer = null;
    if (!this.tiled) return;
    this.abort?.abort();
    const seq = ++this.seq;
    const rect = this.region();
    if (!rect) {
      this.answer = null;
      this.redraw();
      return;
    }
    const abort = new AbortController();
    this.abort = abort;
    this.inFlight += 1;
    try {
      const answer = await this.fetchRegion(rect, abort.signal);
      if (seq !== this.seq) return;
      this.answer = { ...answer, rect };
      if (this.selected && !(answer.boxes || []).some((b) => b.id === this.selected.id)) {
        this.select(null);
      }
      this.draw();
      this.canvas.dataset.answered = String(seq);
      this.onAnswer(this.answer);
    } catch (e) {
      if (e.name !== "AbortError" && seq === this.seq) this.onError(e);
    } finally {
      this.inFlight -= 1;
    }
  }

  redraw() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  // Level-0 pixels to canvas pixels, as the viewport is now (mid-animation included).
  transform() {
    const vp = this.viewer.viewport;
    const a = vp.pixelFromPoint(this.tiled.imageToViewportCoordinates(0, 0, true), true);
    const b = vp.pixelFromPoint(
      this.tiled.imageToViewportCoordinates(this.width, this.height, true),
      true,
    );
    return { ox: a.x, oy: a.y, sx: (b.x - a.x) / this.width, sy: (b.y - a.y) / this.height };
  }

  draw() {
    const canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const cw = canvas.clientWidth;
    const ch = canvas.clientHeight;
    if (canvas.width !== Math.round(cw * dpr) || canvas.height !== Math.round(ch * dpr)) {
      canvas.width = Math.round(cw * dpr);
      canvas.height = Math.round(ch * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cw, ch);
    this.drawn = [];
    const answer = this.answer;
    let mode = "none";
    if (this.outline && this.tiled) this.drawOutline(ctx, this.transform(), dpr);
    if (this.visible && answer && this.tiled) {
      const t = this.transform();
      if (answer.mode === "density") {
        mode = "density";
        this.drawDensity(ctx, t, cw, ch);
      } else {
        mode = "boxes";
        this.drawBoxes(ctx, t, cw, ch);
      }
    }
    canvas.dataset.mode = mode;
    canvas.dataset.drawn = String(this.drawn.length);
  }

  drawOutline(ctx, { ox, oy, sx, sy }, dpr) {
    const { path, w, h } = this.outline;
    const kx = (sx * this.width) / w; // screen px per mask px
    const ky = (sy * this.height) / h;
    ctx.save();
    ctx.setTransform(dpr * kx, 0, 0, dpr * ky, dpr * ox, dpr * oy);
    ctx.strokeStyle = "rgba(0, 114, 178, 0.9)";
    ctx.lineWidth = 2 / Math.max(kx, ky); // 2 screen px whatever the zoom
    ctx.stroke(path);
    ctx.restore();
  }

  shownBoxes() {
    const min = this.minScore();
    return (this.answer?.boxes || []).filter((b) => b.score >= min && this.classes.shown(b.label));
  }

  drawBoxes(ctx, { ox, oy, sx, sy }, cw, ch) {
    const paths = new Map();
    const halo = new Path2D();
    for (const box of this.shownBoxes()) {
      const x = ox + box.x1 * sx;
      const y = oy + box.y1 * sy;
      const w = Math.max(2, (box.x2 - box.x1) * sx);
      const h = Math.max(2, (box.y2 - box.y1) * sy);
      if (x > cw || y > ch || x + w < 0 || y + h < 0) continue;
      this.drawn.push({ box, x, y, w, h });
      halo.rect(x, y, w, h);
      if (!paths.has(box.label)) paths.set(box.label, new Path2D());
      paths.get(box.label).rect(x, y, w, h);
    }
    ctx.lineJoin = "miter";
    ctx.strokeStyle = "rgba(0, 0, 0, 0.7)";
    ctx.lineWidth = 4;
    ctx.stroke(halo);
    ctx.lineWidth = 2;
    for (const [label, path] of paths) {
      ctx.strokeStyle = this.classes.colors.get(label) || "#FFFFFF";
      ctx.stroke(path);
    }
    if (this.drawn.length <= TAGS_UP_TO) this.drawTags(ctx);
    const sel = this.selected && this.drawn.find((d) => d.box.id === this.selected.id);
    if (sel) {
      ctx.setLineDash([6, 4]);
      ctx.strokeStyle = "#FFFFFF";
      ctx.lineWidth = 2;
      ctx.strokeRect(sel.x - 4, sel.y - 4, sel.w + 8, sel.h + 8);
      ctx.setLineDash([]);
    }
  }

  drawTags(ctx) {
    const font = 12;
    ctx.font = `600 ${font}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    for (const { box, x, y, w } of this.drawn) {
      if (w < TAG_MIN_PX) continue;
      const text = `${box.label} ${box.score.toFixed(2)}`;
      const tw = ctx.measureText(text).width + 6;
      const ty = y >= font + 4 ? y - font - 4 : y;
      ctx.fillStyle = this.classes.colors.get(box.label) || "#FFFFFF";
      ctx.fillRect(x - 1, ty, tw, font + 4);
      ctx.fillStyle = "#000000";
      ctx.fillText(text, x + 2, ty + 2);
    }
  }

  cellValue(cell) {
    let n = 0;
    for (const [label, count] of Object.entries(cell.counts || {})) {
      if (this.classes.shown(label)) n += count;
    }
    return n;
  }

  densityMax() {
    let max = 0;
    for (const cell of this.answer?.cells || []) max = Math.max(max, this.cellValue(cell));
    return max;
  }

  drawDensity(ctx, { ox, oy, sx, sy }, cw, ch) {
    const max = this.densityMax();
    if (!max) return;
    for (const cell of this.answer.cells) {
      const n = this.cellValue(cell);
      if (!n) continue;
      const x = ox + cell.x * sx;
      const y = oy + cell.y * sy;
      const w = cell.w * sx;
      const h = cell.h * sy;
      if (x > cw || y > ch || x + w < 0 || y + h < 0) continue;
      const t = n / max;
      const [r, g, b] = heatColor(t);
      ctx.fillStyle = `rgba(${r}, ${g}, ${b}, ${(0.3 + 0.45 * t).toFixed(3)})`;
      // A hair wider than the cell so that neighbours leave no seam between them.
      ctx.fillRect(x, y, w + 0.5, h + 0.5);
    }
  }

  select(box) {
    this.selected = box;
    this.onSelect(box);
    this.redraw();
  }

  click(event) {
    if (!event.quick || !this.tiled || !this.visible) return;
    const p = event.position;
    if (this.answer?.mode === "density") {
      const at = this.tiled.viewerElementToImageCoordinates(p);
      const cell = this.answer.cells.find(
        (c) => at.x >= c.x && at.x < c.x + c.w && at.y >= c.y && at.y < c.y + c.h,
      );
      this.onSelect(null, cell || null);
      return;
    }
    let best = null;
    for (const d of this.drawn) {
      const inside =
        p.x >= d.x - HIT_SLOP_PX &&
        p.x <= d.x + d.w + HIT_SLOP_PX &&
        p.y >= d.y - HIT_SLOP_PX &&
        p.y <= d.y + d.h + HIT_SLOP_PX;
      if (inside && (!best || d.w * d.h < best.w * best.h)) best = d;
    }
    this.select(best ? best.box : null);
  }
}
