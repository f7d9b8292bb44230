// SimpleBits review page: two synchronised canvases (pan, zoom, window/level), keyboard navigation,
// filters and a rating form saved to the local server (SQLite) on submit, under the reader's name.
// The original is the source radiograph at native resolution (the DICOM's VOI applied by the server:
// the default window/level is the DICOM's); the simplified image, made at working resolution, is
// upsampled smoothly onto the same geometry, optionally under a signed-difference overlay (key d).
"use strict";

const READER_KEY = "simplebits.reader";  // localStorage: the page asks for the name once per browser

const state = {
  studies: [], shown: [], index: 0,
  view: { zoom: 1, panX: 0, panY: 0 },
  window: { center: 127.5, width: 255 },
  images: { orig: null, simpl: null },   // {w, h, grey: Uint8ClampedArray, canvas: OffscreenCanvas-like}
  diff: null,        // canvas at working resolution: simplified - original, blue darker / red brighter
  showDiff: false,
  fullRes: false,    // the original shown is larger than the working resolution
  reader: (localStorage.getItem(READER_KEY) || "").trim(),
};
const $ = (id) => document.getElementById(id);
const canvases = { orig: $("view-orig"), simpl: $("view-simpl") };

// ---------------------------------------------------------------------------------------- data
async function loadStudies(keepId = null) {
  // The ratings shown are this reader's current ones; other readers' never prefill the form.
  const query = state.reader ? `?reader=${encodeURIComponent(state.reader)}` : "";
  const response = await fetch("/api/studies" + query, { cache: "no-store" });
  if (!response.ok) throw new Error("could not load the study list");
  state.studies = (await response.json()).studies;
  const named = state.studies.find((s) => s.positive_name);
  if (named) $("filter").querySelector("option[value=positive]").textContent = `truth: ${named.positive_name}`;
  applyFilter(keepId);
}

function setReader(name) {
  state.reader = name.trim();
  if (state.reader) localStorage.setItem(READER_KEY, state.reader); else localStorage.removeItem(READER_KEY);
  loadStudies(current() && current().study_id).catch((err) => { $("status").textContent = err.message; });
}

function isMisclassified(s) { return s.correct_orig === false || s.correct_simpl === false; }

function applyFilter(keepId) {
  const f = $("filter").value;
  state.shown = state.studies.filter((s) =>
    f === "all" ? true : f === "misclassified" ? isMisclassified(s) : f === "positive" ? s.label === 1 : !s.rating);
  const at = state.shown.findIndex((s) => s.study_id === keepId);
  state.index = at >= 0 ? at : 0;
  showStudy();
}

function current() { return state.shown[state.index]; }

function loadGrey(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const c = document.createElement("canvas");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const rgba = ctx.getImageData(0, 0, c.width, c.height).data;
      const grey = new Uint8ClampedArray(c.width * c.height);
      for (let i = 0; i < grey.length; i++) grey[i] = rgba[4 * i];
      resolve({ w: c.width, h: c.height, grey, canvas: c });
    };
    img.onerror = () => reject(new Error("could not load " + url));
    img.src = url;
  });
}

// ---------------------------------------------------------------------------------------- drawing
function applyWindow(image) {
  // Window/level on the 8-bit grey values, into the image's own canvas (at its own resolution).
  const { center, width } = state.window;
  const low = center - width / 2, ctx = image.canvas.getContext("2d");
  const out = ctx.createImageData(image.w, image.h);
  for (let i = 0; i < image.grey.length; i++) {
    const v = Math.max(0, Math.min(255, ((image.grey[i] - low) / width) * 255));
    out.data[4 * i] = out.data[4 * i + 1] = out.data[4 * i + 2] = v; out.data[4 * i + 3] = 255;
  }
  ctx.putImageData(out, 0, 0);
}

function differenceCanvas(orig, simpl) {
  // Signed change at working resolution (both images there), as colour whose alpha grows with the
  // magnitude, scaled to the study's largest change (as the report's panel does).
  const c = document.createElement("canvas");
  c.width = simpl.w; c.height = simpl.h;
  const ctx = c.getContext("2d"), out = ctx.createImageData(simpl.w, simpl.h);
  let limit = 1;
  for (let i = 0; i < simpl.grey.length; i++) limit = Math.max(limit, Math.abs(simpl.grey[i] - orig.grey[i]));
  for (let i = 0; i < simpl.grey.length; i++) {
    const d = (simpl.grey[i] - orig.grey[i]) / limit;
    out.data[4 * i] = d > 0 ? 220 : 30; out.data[4 * i + 1] = 40; out.data[4 * i + 2] = d > 0 ? 30 : 220;
    out.data[4 * i + 3] = Math.round(0.85 * 255 * Math.abs(d));
  }
  ctx.putImageData(out, 0, 0);
  return c;
}

function draw() {
  // Both viewers share the original's geometry; the working-resolution (square, centre-padded by
  // ingest) simplified image covers the square of side max(w, h) centred on it.
  const base = state.images.orig;
  for (const key of ["orig", "simpl"]) {
    const canvas = canvases[key], image = state.images[key];
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(canvas.clientWidth * dpr));
    canvas.height = Math.max(1, Math.round(canvas.clientHeight * dpr));
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!image || !base) continue;
    const fit = Math.min(canvas.width / base.w, canvas.height / base.h) * state.view.zoom;
    const cx = canvas.width / 2 + state.view.panX * dpr, cy = canvas.height / 2 + state.view.panY * dpr;
    const w = key === "orig" ? base.w * fit : Math.max(base.w, base.h) * fit, h = key === "orig" ? base.h * fit : w;
    ctx.imageSmoothingEnabled = true;  // smooth upsampling (and anti-aliased downsampling of a large source)
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(image.canvas, cx - w / 2, cy - h / 2, w, h);
    if (key === "simpl" && state.showDiff && state.diff) ctx.drawImage(state.diff, cx - w / 2, cy - h / 2, w, h);
  }
  canvases.orig.dataset.natural = base ? `${base.w}x${base.h}` : "";
  $("orig-size").textContent = base ? `${base.w} × ${base.h} px${state.fullRes ? "" : " (working resolution)"}` : "";
  $("wl").textContent = `window ${Math.round(state.window.width)} · level ${Math.round(state.window.center)} · zoom ${state.view.zoom.toFixed(2)}×`
    + (state.showDiff ? " · difference shown (blue darker, red brighter)" : "");
}

function toggleDifference() {
  state.showDiff = !state.showDiff;
  draw();
}

function redrawWindowed() {
  for (const key of ["orig", "simpl"]) if (state.images[key]) applyWindow(state.images[key]);
  draw();
}

function resetView() {
  state.view = { zoom: 1, panX: 0, panY: 0 };
  state.window = { center: 127.5, width: 255 };
  redrawWindowed();
}

// ---------------------------------------------------------------------------------------- study + form
const fmt = (v, d = 2) => (typeof v === "number" ? v.toFixed(d) : "–");

function renderFacts(s) {
  // Values are [text, verdict?]; everything goes through textContent (no markup from data).
  const a = s.attributes || {};
  const rows = [
    ["truth", [s.label_name]],
    [`P(${s.positive_name}) original`, [fmt(s.p_orig), s.correct_orig]],
    [`P(${s.positive_name}) simplified`, [fmt(s.p_simpl), s.correct_simpl]],
    ["bits/pixel", [`${fmt(s.bpd_orig)} → ${fmt(s.bpd_simpl)}`]],
    ["bits saved", [typeof s.bits_saved === "number" ? Math.round(s.bits_saved).toLocaleString() : "–"]],
    ["view · sex · age", [[a.view, a.sex, a.age_band].filter(Boolean).join(" · ") || "–"]],
  ];
  const dl = $("facts");
  dl.replaceChildren();
  for (const [key, [text, verdict]] of rows) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = key;
    dd.textContent = String(text) + " ";
    if (typeof verdict === "boolean") {
      const span = document.createElement("span");
      span.className = verdict ? "ok" : "bad";
      span.textContent = verdict ? "correct" : "wrong";
      dd.append(span);
    }
    dl.append(dt, dd);
  }
}

function fillForm(rating) {
  const form = $("rating");
  for (const el of form.elements.keeps_finding) el.checked = !!rating && el.value === rating.keeps_finding;
  for (const el of form.elements.signs) el.checked = !!rating && rating.signs.includes(el.value);
  form.elements.comment.value = rating ? rating.comment : "";
  $("status").textContent = rating ? `saved ${rating.updated_at.replace("T", " ").replace("+00:00", " UTC")}`
    : state.reader ? "not yet rated" : "enter your name as Reader (top) to rate";
}

function renderMaps(s) {
  // The study's saliency maps (simplebits explain), a row of thumbnails beside the simplified
  // image; hidden for a study without maps. URLs come from the server's whitelist (/api/studies).
  const row = $("maps"), maps = (s && s.maps) || [];
  row.replaceChildren();
  row.hidden = maps.length === 0;
  for (const map of maps) {
    const figure = document.createElement("figure"), link = document.createElement("a");
    const img = document.createElement("img"), caption = document.createElement("figcaption");
    link.href = map.url; link.target = "_blank"; link.rel = "noopener";
    img.src = map.url; img.alt = `${map.title} map of ${s.study_id}`; img.dataset.method = map.method;
    caption.textContent = map.title;
    link.append(img);
    figure.append(link, caption);
    row.append(figure);
  }
}

function updateProgress() {
  const rated = state.studies.filter((s) => s.rating).length;
  $("progress").textContent = `${rated} of ${state.studies.length} rated`;
}

async function showStudy() {
  const s = current();
  $("position").textContent = s ? `${state.index + 1} / ${state.shown.length}` : "0 / 0";
  updateProgress();
  if (!s) {
    $("study-id").textContent = "no studies match this filter";
    $("facts").replaceChildren(); fillForm(null); renderMaps(null);
    state.images = { orig: null, simpl: null }; state.diff = null; draw();
    return;
  }
  $("study-id").textContent = s.study_id;
  renderFacts(s);
  fillForm(s.rating);
  renderMaps(s);
  const base = `/studies/${encodeURIComponent(s.study_id)}/`;
  try {
    // The original shown (native resolution where the source is readable: s.original_url, from the
    // server's whitelist) and the working-resolution original that the difference needs.
    const working = base + "original.png";
    const [orig, work, simpl] = await Promise.all([
      loadGrey(s.original_url || working).catch(() => loadGrey(working)),  // a source that failed to decode
      loadGrey(working), loadGrey(base + "simplified.png")]);
    if (current() !== s) return;  // the reader moved on while loading
    state.images = { orig, simpl };
    state.fullRes = orig.w !== work.w || orig.h !== work.h;
    state.diff = work.w === simpl.w && work.h === simpl.h ? differenceCanvas(work, simpl) : null;
    redrawWindowed();
  } catch (err) {
    $("status").textContent = err.message;
  }
}

async function saveRating() {
  const s = current();
  if (!s) return;
  const form = $("rating");
  const keeps = form.elements.keeps_finding.value;
  if (!keeps) { $("status").textContent = "choose yes, partly or no first"; return; }
  if (!state.reader) { $("status").textContent = "enter your name as Reader first"; $("reader").focus(); return; }
  const body = {
    reader: state.reader,
    keeps_finding: keeps,
    signs: Array.from(form.elements.signs).filter((el) => el.checked).map((el) => el.value),
    comment: form.elements.comment.value,
  };
  $("status").textContent = "saving…";
  const response = await fetch(`/api/ratings/${encodeURIComponent(s.study_id)}`, {
    method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) { $("status").textContent = "not saved: " + answer.error; return; }
  s.rating = answer;
  fillForm(answer);
  updateProgress();
}

function step(delta) {
  if (!state.shown.length) return;
  state.index = Math.max(0, Math.min(state.shown.length - 1, state.index + delta));
  showStudy();
}

// ---------------------------------------------------------------------------------------- input
function bindCanvas(canvas) {
  let drag = null;
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("mousedown", (e) => {
    drag = { x: e.clientX, y: e.clientY, level: e.button === 2 || e.shiftKey };
    canvas.classList.add("dragging");
  });
  window.addEventListener("mouseup", () => { drag = null; canvas.classList.remove("dragging"); });
  window.addEventListener("mousemove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    drag.x = e.clientX; drag.y = e.clientY;
    if (drag.level) {
      state.window.width = Math.max(1, Math.min(512, state.window.width + dx));
      state.window.center = Math.max(0, Math.min(255, state.window.center + dy / 2));
      redrawWindowed();
    } else {
      state.view.panX += dx; state.view.panY += dy;
      draw();
    }
  });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const factor = Math.exp(-e.deltaY * 0.0015);
    const zoom = Math.max(0.2, Math.min(40, state.view.zoom * factor));
    // Zoom about the cursor: keep the point under the mouse where it is.
    const rect = canvas.getBoundingClientRect();
    const cx = e.clientX - rect.left - rect.width / 2, cy = e.clientY - rect.top - rect.height / 2;
    const k = zoom / state.view.zoom;
    state.view.panX = cx - (cx - state.view.panX) * k;
    state.view.panY = cy - (cy - state.view.panY) * k;
    state.view.zoom = zoom;
    draw();
  }, { passive: false });
}

function onKey(e) {
  const typing = e.target.tagName === "TEXTAREA" || (e.target.tagName === "INPUT" && e.target.type === "text");
  if (typing) return;
  if (e.key === "ArrowRight" || e.key === "j") step(1);
  else if (e.key === "ArrowLeft" || e.key === "k") step(-1);
  else if (e.key === "r") resetView();
  else if (e.key === "d") toggleDifference();
  else if (["1", "2", "3"].includes(e.key)) {
    const value = ["yes", "partly", "no"][Number(e.key) - 1];
    for (const el of $("rating").elements.keeps_finding) el.checked = el.value === value;
    saveRating();
  } else if (e.key === "Enter" && e.target.tagName !== "BUTTON") { saveRating(); }
  else return;
  e.preventDefault();
}

window.addEventListener("DOMContentLoaded", () => {
  bindCanvas(canvases.orig); bindCanvas(canvases.simpl);
  $("reader").value = state.reader;
  // No autofocus on the name field: arrow keys keep browsing; saving without a name asks for it.
  $("reader").addEventListener("change", (e) => setReader(e.target.value));
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("filter").addEventListener("change", () => applyFilter(current() && current().study_id));
  $("rating").addEventListener("submit", (e) => { e.preventDefault(); saveRating(); });
  document.addEventListener("keydown", onKey);
  window.addEventListener("resize", draw);
  loadStudies().catch((err) => { $("study-id").textContent = err.message; });
});
