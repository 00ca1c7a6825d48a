// lmm-steer's web page: feature browser, playground (steered beside unsteered), inspect view.
// Plain JavaScript against the server's own HTTP API; the API key lives in session storage only.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "lmm-steer-api-key";
const state = { model: null, edits: [], presets: [] };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") for (const [event, fn] of Object.entries(v)) node.addEventListener(event, fn);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : String(c));
  return node;
}

// A context with its activating token between « and », as text with that token marked.
function marked(text) {
  const out = document.createDocumentFragment();
  for (const [i, part] of text.split(/[«»]/).entries()) out.append(i % 2 ? el("mark", {}, part) : part);
  return out;
}

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || `${r.status} ${r.statusText}`);
  return data;
}

async function imageURL(path) {  // authorised fetch, so pages work behind API keys too
  const r = await fetch(path, { headers: headers(false) });
  if (!r.ok) throw new Error(`${path}: ${r.status}`);
  return URL.createObjectURL(await r.blob());
}

function showError(e) { $("error").textContent = String((e && e.message) || e); $("error").hidden = false; }
function clearError() { $("error").hidden = true; }

function fileDataURL(input) {
  const file = input.files && input.files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function userMessage(text, image) {
  const content = image ? [{ type: "image_url", image_url: { url: image } }] : [];
  content.push({ type: "text", text });
  return [{ role: "user", content }];
}

// -- routing ----------------------------------------------------------------------------------

const VIEWS = ["features", "feature", "playground", "inspect"];

function route() {
  clearError();
  const hash = location.hash || "#/features";
  const [, view, arg] = hash.split("/");
  const name = VIEWS.includes(view) ? view : "features";
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== name;
  for (const v of ["features", "playground", "inspect"]) {
    const current = v === name || (v === "features" && name === "feature");
    if (current) $(`nav-${v}`).setAttribute("aria-current", "page"); else $(`nav-${v}`).removeAttribute("aria-current");
  }
  if (name === "feature") showFeature(Number(arg)).catch(showError);
}

// -- feature browser --------------------------------------------------------------------------

async function search(query) {
  $("search-status").textContent = "Searching…";
  const data = await api(`/v1/features?q=${encodeURIComponent(query)}&limit=20`);
  const list = $("search-results");
  list.replaceChildren(...data.data.map((hit) => el("li", {},
    el("a", { href: `#/feature/${hit.id}` }, `Feature ${hit.id}`), " ",
    el("span", { class: "muted" }, `score ${hit.score.toFixed(3)}`),
    el("div", {}, hit.explanation || el("span", { class: "muted" }, "no explanation")),
    hit.contexts.slice(0, 2).map((c) => el("div", { class: "muted" }, marked(c))))));
  $("search-status").textContent = `${data.data.length} features for “${query}”`;
}

function stat(dl, name, value) {
  if (value === undefined || value === null) return;
  dl.append(el("dt", {}, name), el("dd", {}, typeof value === "number" ? Number(value.toPrecision(4)) : value));
}

async function showFeature(id) {
  const info = await api(`/v1/features/${id}`);
  $("feature-title").textContent = `Feature ${info.id}`;
  $("feature-explanation").textContent = info.explanation || "No explanation in the catalog.";
  const dl = $("feature-stats");
  dl.replaceChildren();
  const s = info.stats || {};
  stat(dl, "density", s.density);
  stat(dl, "maximum activation", s.max_activation);
  if (s.steer && s.steer.value !== undefined) stat(dl, "calibrated value", s.steer.value);
  stat(dl, "decoder norm", info.decoder_norm);
  for (const [k, v] of Object.entries(info.scores || {})) if (typeof v === "number" || typeof v === "boolean") stat(dl, k, String(v));
  // sae score's best_phrase: [[field, value], ...], the explanation that would have scored best_iou
  const best = (info.scores || {}).best_phrase;
  if (Array.isArray(best) && best.length) stat(dl, "best possible explanation", best.map((pair) => pair[1]).join(" "));
  $("feature-to-playground").onclick = () => { addEdit(info); location.hash = "#/playground"; };
  const images = $("feature-images");
  images.replaceChildren();
  const grids = (s.top_images || []).filter((im) => im.grid).map((im) => im.grid);
  for (const [k, im] of info.top_images.entries()) {
    // the highlighted image as the explainer saw it, and beside it the activations as a heatmap
    const img = el("img", { alt: `Top image ${k + 1} of feature ${info.id}, its active patches highlighted` });
    const heat = el("canvas", { role: "img", "aria-label": `Heatmap of feature ${info.id} over top image ${k + 1}` });
    images.append(el("figure", {}, img, heat, el("figcaption", {}, `activation ${Number(im.activation).toFixed(3)}`)));
    imageURL(im.url).then(async (u) => {
      img.src = u;
      await img.decode();
      if (grids[k]) drawHeatmap(heat, img, grids[k]);
    }).catch(showError);
  }
  if (!info.top_images.length) images.append(el("p", { class: "muted" }, "No top images in the catalog."));
  const contexts = s.top_contexts || [];
  $("feature-contexts").replaceChildren(...contexts.map((c) => el("li", {}, marked(c.text),
    el("span", { class: "muted" }, `  (${Number(c.activation).toFixed(2)})`))));
}

// -- playground -------------------------------------------------------------------------------

function addEdit(info) {
  if (state.edits.some((e) => e.id === info.id)) return;
  const s = info.stats || {};
  const calibrated = s.steer && typeof s.steer.value === "number" ? s.steer.value : null;
  const peak = Number(s.max_activation) || 0;
  state.edits.push({ id: info.id, explanation: info.explanation, calibrated, peak, mode: "clamp",
                     amount: calibrated !== null ? 1 : Math.round(3 * peak * 100) / 100 || 10 });
  renderEdits();
}

function editValue(e) { return e.calibrated !== null ? e.amount * e.calibrated : e.amount; }

function renderEdits() {
  const list = $("play-features");
  list.replaceChildren(...state.edits.map((e) => {
    const what = e.calibrated !== null ? `strength (× ${e.calibrated.toFixed(2)})` : "value";
    const [lo, hi, step] = e.calibrated !== null ? [-4, 4, 0.1] : [-Math.max(6 * e.peak, 10), Math.max(6 * e.peak, 10), 0.01];
    const label = `Feature ${e.id} ${what}`;
    const range = el("input", { type: "range", min: lo, max: hi, step, value: e.amount, "aria-label": label });
    const number = el("input", { type: "number", step, value: e.amount, "aria-label": `${label}, exact` });
    const sync = (v) => { e.amount = Number(v); range.value = v; number.value = v; };
    range.addEventListener("input", () => sync(range.value));
    number.addEventListener("change", () => sync(number.value));
    const mode = el("select", { "aria-label": `Feature ${e.id} mode` },
      ["clamp", "add", "scale"].map((m) => el("option", m === e.mode ? { selected: "" } : {}, m)));
    mode.addEventListener("change", () => { e.mode = mode.value; });
    const remove = el("button", { type: "button", class: "secondary", "aria-label": `Remove feature ${e.id}` }, "Remove");
    remove.addEventListener("click", () => { state.edits = state.edits.filter((x) => x !== e); renderEdits(); });
    return el("li", {}, el("strong", {}, `Feature ${e.id}`), el("span", {}, e.explanation || ""),
      el("span", { class: "muted" }, what), range, number, mode, remove);
  }));
  $("sweep-feature").replaceChildren(...state.edits.map((e) => el("option", { value: e.id }, `Feature ${e.id}`)));
}

function steering(override) {
  const features = state.edits.map((e) => ({ id: e.id, mode: e.mode,
    value: override && override.id === e.id ? override.value : editValue(e) }));
  const body = { features };
  if ($("play-scope").value) body.scope = $("play-scope").value;
  if ($("play-preset").value) body.preset = $("play-preset").value;
  return features.length || body.preset ? body : null;
}

async function chatBody(withSteering, override) {
  const body = { messages: userMessage($("play-prompt").value, await fileDataURL($("play-image"))),
                 max_tokens: Number($("play-max").value) || 48, temperature: 0, seed: 0 };
  if (withSteering) { const s = steering(override); if (s) body.steering = s; }
  return body;
}

async function streamInto(body, out) {
  out.textContent = "";
  const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true),
                                                   body: JSON.stringify({ ...body, stream: true }) });
  if (!r.ok) { const data = await r.json().catch(() => ({})); throw new Error((data.error && data.error.message) || r.statusText); }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const line = event.trim();
      if (!line.startsWith("data:")) continue;
      const payload = line.slice(5).trim();
      if (payload === "[DONE]") return;
      const chunk = JSON.parse(payload);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) out.textContent += delta.content;
    }
  }
}

async function generate(event) {
  event.preventDefault();
  clearError();
  $("play-run").disabled = true;
  try {
    const [steered, plain] = await Promise.all([chatBody(true), chatBody(false)]);
    await Promise.all([streamInto(steered, $("out-steered")), streamInto(plain, $("out-unsteered"))]);
  } catch (e) { showError(e); } finally { $("play-run").disabled = false; }
}

async function sweep() {
  clearError();
  const id = Number($("sweep-feature").value);
  const values = $("sweep-values").value.split(",").map((v) => Number(v.trim())).filter((v) => Number.isFinite(v));
  if (!state.edits.length || !values.length) { showError("Add a feature and give values to sweep."); return; }
  const rows = $("sweep-table").tBodies[0];
  rows.replaceChildren();
  $("sweep-table").hidden = false;
  try {
    for (const value of values) {
      const cell = el("td", {}, "…");
      rows.append(el("tr", {}, el("th", { scope: "row" }, String(value)), cell));
      const reply = await api("/v1/chat/completions", await chatBody(true, { id, value }));
      cell.textContent = reply.choices[0].message.content;
    }
  } catch (e) { showError(e); }
}

let suggestTimer = null;
function suggest() {
  clearTimeout(suggestTimer);
  const q = $("play-add").value.trim();
  if (!q || /^\d+:/.test(q)) return;
  suggestTimer = setTimeout(async () => {
    try {
      const data = await api(`/v1/features?q=${encodeURIComponent(q)}&limit=8`);
      $("play-suggestions").replaceChildren(...data.data.map((h) =>
        el("option", { value: `${h.id}: ${(h.explanation || h.contexts[0] || "").slice(0, 60)}` })));
    } catch (e) { showError(e); }
  }, 200);
}

async function pickSuggestion(event) {
  if (event.type === "keydown" && event.key !== "Enter") return;
  event.preventDefault();
  const m = /^\s*(\d+)/.exec($("play-add").value);
  if (!m) return;
  try { addEdit(await api(`/v1/features/${m[1]}`)); $("play-add").value = ""; } catch (e) { showError(e); }
}

// -- inspect ----------------------------------------------------------------------------------

function drawHeatmap(canvas, image, grid) {
  const ctx = canvas.getContext("2d");
  canvas.width = 192; canvas.height = 192;
  ctx.drawImage(image, 0, 0, 192, 192);
  const rows = grid.length, cols = grid[0].length;
  const peak = Math.max(1e-9, ...grid.flat());
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const a = grid[r][c] / peak;
      if (a <= 0) continue;
      ctx.fillStyle = `rgba(255, 40, 0, ${0.65 * a})`;
      ctx.fillRect((c * 192) / cols, (r * 192) / rows, 192 / cols, 192 / rows);
    }
  }
}

function featureButtons(id) {
  return [el("a", { href: `#/feature/${id}` }, `Feature ${id}`),
          el("button", { type: "button", class: "secondary", "aria-label": `Add feature ${id} to the playground`,
                         on: { click: async () => { try { addEdit(await api(`/v1/features/${id}`)); } catch (e) { showError(e); } } } },
             "Add to playground")];
}

async function inspect(event) {
  event.preventDefault();
  clearError();
  $("inspect-status").textContent = "Inspecting…";
  try {
    const image = await fileDataURL($("inspect-image"));
    const result = await api("/v1/inspect", { messages: userMessage($("inspect-prompt").value, image),
                                              top_k: 5, grid_features: 5 });
    const grids = $("inspect-grids");
    grids.replaceChildren();
    if (image && result.images.length) {
      const picture = new Image();
      picture.src = image;
      await picture.decode();
      for (const [id, grid] of Object.entries(result.images[0].features)) {
        const canvas = el("canvas", { role: "img", "aria-label": `Heatmap of feature ${id} over the image` });
        drawHeatmap(canvas, picture, grid);
        grids.append(el("figure", { class: "heatmap" }, canvas, el("figcaption", {}, featureButtons(Number(id)))));
      }
    }
    const pooled = [...(result.pooled.image || []).map((f) => ["image", f]), ...(result.pooled.text || []).map((f) => ["text", f])];
    $("inspect-pooled").replaceChildren(...pooled.map(([kind, f]) => el("li", {}, `${kind}: `, featureButtons(f.id),
      ` ${f.activation.toFixed(2)} `, el("span", { class: "muted" }, f.explanation || ""))));
    $("inspect-positions").replaceChildren(...(result.positions || []).filter((p) => p.kind === "text").map((p) =>
      el("li", {}, el("code", {}, JSON.stringify(p.token)), " ",
        p.features.slice(0, 3).map((f) => el("a", { href: `#/feature/${f.id}` }, `${f.id} (${f.activation.toFixed(1)}) `)))));
    $("inspect-status").textContent = `${result.num_tokens} tokens, ${result.image_tokens} of them image tokens`;
  } catch (e) { $("inspect-status").textContent = ""; showError(e); }
}

// -- start ------------------------------------------------------------------------------------

async function start() {
  $("api-key").value = sessionStorage.getItem(KEY) || "";
  $("api-key").addEventListener("change", () => { sessionStorage.setItem(KEY, $("api-key").value); load().catch(showError); });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search($("search-q").value).catch(showError); });
  $("play-form").addEventListener("submit", generate);
  $("sweep-run").addEventListener("click", sweep);
  $("play-add").addEventListener("input", suggest);
  $("play-add").addEventListener("keydown", pickSuggestion);
  $("play-add").addEventListener("change", pickSuggestion);
  $("inspect-form").addEventListener("submit", inspect);
  window.addEventListener("hashchange", route);
  route();
  await load();
}

async function load() {
  const models = await api("/v1/models");
  state.model = models.data[0].id;
  $("model-name").textContent = state.model;
  state.presets = models.data.filter((m) => m.preset);
  $("play-preset").replaceChildren(el("option", { value: "" }, "none"),
    ...state.presets.map((m) => el("option", { value: m.preset.name }, `${m.preset.name}: ${m.preset.description}`)));
}

start().catch(showError);
