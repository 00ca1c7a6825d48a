// lmm-steer's web page: feature browser, playground (steered beside unsteered), inspect view.
// Plain JavaScript against the server's own HTTP API; the API key lives in session storage only.
// One unit for steering values everywhere: raw activations, what the API's `value` takes.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "lmm-steer-api-key";
const state = { model: null, multimodal: false, edits: [], presets: [], scene: null, sweepTyped: false, inspected: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") for (const [event, fn] of Object.entries(v)) node.addEventListener(event, fn);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : String(c));
  return node;
}

const fmt = (v) => String(Number(Number(v).toPrecision(4)));  // 4 significant digits

// A context with its activating token between « and », as text with that token marked; its first
// `templateChars` characters (the chat template's text, not the corpus's) set apart.
function marked(text, templateChars = 0) {
  const out = document.createDocumentFragment();
  let inMark = false, buf = "", bufMark = false, bufTemplate = false;
  const flush = () => {
    if (!buf) return;
    let node = bufMark ? el("mark", {}, buf) : document.createTextNode(buf);
    if (bufTemplate) node = el("span", { class: "template", title: "from the chat template, not the corpus" }, node);
    out.append(node);
    buf = "";
  };
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (ch === "«" || ch === "»") { flush(); inMark = ch === "«"; continue; }
    const template = i < templateChars;
    if (buf && (template !== bufTemplate || inMark !== bufMark)) flush();
    bufTemplate = template; bufMark = inMark; buf += ch;
  }
  flush();
  if (templateChars > 0 && text.indexOf("«") >= 0 && text.indexOf("«") < templateChars) {
    out.append(" ", el("span", { class: "badge" }, "fires on the chat template"));
  }
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

// The image a request carries: a chosen file, else the generated scene (multimodal models only).
async function attachedImage(input) {
  if (!state.multimodal) return null;
  return (await fileDataURL(input)) || (state.scene && state.scene.image) || null;
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
  if (name === "inspect") imageNotes();
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
    hit.contexts.slice(0, 2).map((c, i) => el("div", { class: "muted context" }, marked(c, (hit.template_chars || [])[i] || 0))))));
  $("search-status").textContent = `${data.data.length} features for “${query}”`;
}

function stat(dl, name, value) {
  if (value === undefined || value === null) return;
  dl.append(el("dt", {}, name), el("dd", {}, typeof value === "number" ? fmt(value) : value));
}

// What each of `sae score`'s numbers measures (docs/explain.md). ceiling_iou is left out: it is the
// best IoU of one object or the background, which an explanation naming two objects can beat, so it
// bounds nothing; best_iou is the bound.
const SCORE_LABELS = {
  iou: "IoU of the explanation (its grounding against the active patches, mean over the scored images)",
  best_iou: "best possible IoU under this grounder (a bound: the best phrase of annotated values)",
  random_iou: "IoU of the explanation on another feature's images (baseline)",
  names_attribute: "names the ground-truth attribute",
  clip: "CLIP score (explanation against its highlighted top images, 100 × cosine)",
  shuffled_clip: "CLIP score of explanations shuffled among features (baseline)",
};
const SCORE_SKIPPED = new Set(["ceiling_iou", "best_phrase", "attribute", "named"]);
const pairs = (v) => (Array.isArray(v) ? v.map((p) => (Array.isArray(p) ? p[1] : p)).join(", ") : null);

function maxLabel(over) {
  if (over === "top_image_patches") return "max activation (the peak patch of its top images)";
  return state.multimodal ? "max activation over all tokens of the catalog's corpus (text and every image token)"
    : "max activation over all tokens of the catalog's corpus";
}

function proposalText(p) {
  if (!p || typeof p.value !== "number") return (p && p.basis) || "No value proposed: choose one.";
  const where = p.scope ? ` on the ${p.scope} scope` : "";
  return `Proposed value ${fmt(p.value)}${where} (${p.calibrated ? "calibrated" : "uncalibrated"}): ${p.basis.replace(/^(un)?calibrated: /, "")}.`;
}

async function showFeature(id) {
  const info = await api(`/v1/features/${id}`);
  $("feature-title").textContent = `Feature ${info.id}`;
  $("feature-explanation").textContent = info.explanation || "No explanation in the catalog.";
  const dl = $("feature-stats");
  dl.replaceChildren();
  const s = info.stats || {};
  stat(dl, "density (share of the catalog corpus's tokens it fires on)", s.density);
  stat(dl, maxLabel(info.max_activation_over), s.max_activation);
  const peaks = (info.top_images || []).map((im) => im.peak_patch).filter((v) => typeof v === "number");
  if (peaks.length && info.max_activation_over !== "top_image_patches") {
    stat(dl, "top image patch activation (the largest patch of its top images' base view)", Math.max(...peaks));
  }
  if (s.steer && typeof s.steer.value === "number") stat(dl, "calibrated value", s.steer.value);
  if (s.effect && s.effect.best) stat(dl, "measured effect (lmm-steer sae effects, on its calibration split)", `clamp ${fmt(s.effect.value)} on the image: says ${s.effect.best} in ${Math.round(100 * s.effect.rate)}% of ${s.effect.type} questions; ${s.effect.type === "colour" ? "shape" : "colour"} answers kept ${Math.round(100 * s.effect.kept_other)}%`);
  stat(dl, "decoder norm", info.decoder_norm);
  const scores = info.scores || {};
  for (const [k, v] of Object.entries(scores)) {
    if (SCORE_SKIPPED.has(k) || !(typeof v === "number" || typeof v === "boolean")) continue;
    stat(dl, SCORE_LABELS[k] || k, typeof v === "boolean" ? (v ? "yes" : "no") : v);
  }
  stat(dl, "ground-truth attribute (the annotated value its activations overlap best)", pairs(scores.attribute));
  stat(dl, "values the explanation names", pairs(scores.named));
  // sae score's best_phrase: [[field, value], ...], the explanation that would have scored best_iou
  const best = scores.best_phrase;
  if (Array.isArray(best) && best.length) stat(dl, "best possible explanation", best.map((pair) => pair[1]).join(" "));
  $("feature-proposal").textContent = proposalText(info.proposal);
  $("feature-to-playground").onclick = () => { addEdit(info); location.hash = "#/playground"; };
  const images = $("feature-images");
  images.replaceChildren();
  const grids = (s.top_images || []).filter((im) => im.grid).map((im) => im.grid);
  for (const [k, im] of info.top_images.entries()) {
    // the highlighted image as the explainer saw it, and beside it the activations as a heatmap
    const img = el("img", { alt: `Top image ${k + 1} of feature ${info.id}, its active patches highlighted` });
    const heat = el("canvas", { role: "img", "aria-label": `Heatmap of feature ${info.id} over top image ${k + 1}` });
    images.append(el("figure", {}, img, heat, el("figcaption", {}, imageCaption(im))));
    imageURL(im.url).then(async (u) => {
      img.src = u;
      await img.decode();
      if (grids[k]) drawHeatmap(heat, img, grids[k]);
    }).catch(showError);
  }
  $("feature-images-section").hidden = !info.top_images.length;
  const contexts = info.contexts || [];
  $("feature-contexts").replaceChildren(...contexts.map((c) => el("li", {}, marked(c.text, c.template_chars),
    typeof c.activation === "number" ? el("span", { class: "muted" }, `  (${c.activation.toFixed(2)})`) : "")));
  $("feature-contexts-section").hidden = !contexts.length;
  $("feature-contexts-note").hidden = !contexts.some((c) => c.template_chars > 0);
}

// Each number under a top image says which population it comes from (see FeatureImage.ranked_by).
function imageCaption(im) {
  const lines = [];
  const ranks = (what) => (im.ranked_by === what ? " (ranks it)" : "");
  if (typeof im.mean_patch === "number") lines.push(`mean over its ${im.patches} patches ${fmt(im.mean_patch)}${ranks("mean_patch")}`);
  if (typeof im.peak_patch === "number") lines.push(`peak patch ${fmt(im.peak_patch)}${ranks("peak_patch")}`);
  if (im.ranked_by === "strongest_token") lines.push(`strongest token of its example ${fmt(im.activation)} (ranks it)`);
  if (!lines.length && typeof im.activation === "number") lines.push(`activation ${fmt(im.activation)}`);
  return lines.flatMap((line, i) => (i ? [el("br"), line] : [line]));
}

// -- playground -------------------------------------------------------------------------------

function addEdit(info) {
  if (state.edits.some((e) => e.id === info.id)) return;
  const p = info.proposal || {};
  const max = Number((info.stats || {}).max_activation) || null;
  const value = typeof p.value === "number" ? p.value : max ? Math.round(3 * max * 100) / 100 : 10;
  state.edits.push({ id: info.id, explanation: info.explanation, max, over: info.max_activation_over, proposal: p,
                     value, mode: "clamp" });
  if (p.scope && !$("play-scope").value) {
    $("play-scope").value = p.scope;
    $("play-scope-note").textContent = `set to ${p.scope}: feature ${info.id}'s proposed value is for it`;
  }
  renderEdits();
}

function renderEdits() {
  const list = $("play-features");
  list.replaceChildren(...state.edits.map((e) => {
    const p = e.proposal || {};
    const proposed = typeof p.value === "number" ? p.value : e.value;
    const hi = Math.max(2 * Math.abs(proposed), 6 * (e.max || 0), 10);
    const label = `Feature ${e.id} value`;
    const range = el("input", { type: "range", min: -hi, max: hi, step: "any", value: e.value, "aria-label": label });
    const number = el("input", { type: "number", step: "any", value: e.value, "aria-label": `${label}, exact` });
    const sync = (v) => { e.value = Number(v); range.value = v; number.value = v; };
    range.addEventListener("input", () => sync(range.value));
    number.addEventListener("change", () => sync(number.value));
    const mode = el("select", { "aria-label": `Feature ${e.id} mode` },
      ["clamp", "add", "scale"].map((m) => el("option", m === e.mode ? { selected: "" } : {}, m)));
    mode.addEventListener("change", () => { e.mode = mode.value; });
    const reset = el("button", { type: "button", class: "secondary", "aria-label": `Feature ${e.id}: use the proposed value` },
      "Proposed");
    reset.addEventListener("click", () => sync(proposed));
    const remove = el("button", { type: "button", class: "secondary", "aria-label": `Remove feature ${e.id}` }, "Remove");
    remove.addEventListener("click", () => { state.edits = state.edits.filter((x) => x !== e); renderEdits(); });
    const facts = [e.max ? `max ${fmt(e.max)} (${e.over === "top_image_patches" ? "peak image patch" : "any token"})` : null,
      typeof p.value === "number" ? `proposed ${fmt(p.value)}${p.scope ? ` on the ${p.scope} scope` : ""}, `
        + (p.calibrated ? "calibrated" : "uncalibrated") : null].filter(Boolean).join(" · ");
    return el("li", {}, el("strong", {}, `Feature ${e.id}`), el("span", {}, e.explanation || ""),
      el("span", { class: "muted" }, "value"), range, number, mode, reset, remove,
      el("div", { class: "muted note wide", title: p.basis || "" }, facts, p.basis ? el("br") : "", p.basis || ""));
  }));
  const chosen = $("sweep-feature").value;
  $("sweep-feature").replaceChildren(...state.edits.map((e) => el("option", { value: e.id }, `Feature ${e.id}`)));
  if (state.edits.some((e) => String(e.id) === chosen)) $("sweep-feature").value = chosen;
  sweepDefaults();
}

// Until the visitor types values, the sweep proposes 0, half, once and twice the feature's proposed value.
function sweepDefaults() {
  const e = state.edits.find((x) => String(x.id) === $("sweep-feature").value);
  if (!e || state.sweepTyped) return;
  const p = typeof e.proposal.value === "number" ? e.proposal.value : e.value;
  $("sweep-values").value = [0, p / 2, p, 2 * p].map((v) => fmt(Math.round(v * 100) / 100)).join(", ");
}

function steering(override) {
  const features = state.edits.map((e) => ({ id: e.id, mode: e.mode,
    value: override && override.id === e.id ? override.value : e.value }));
  const body = { features };
  if ($("play-scope").value) body.scope = $("play-scope").value;
  if ($("play-preset").value) body.preset = $("play-preset").value;
  return features.length || body.preset ? body : null;
}

async function chatBody(withSteering, override) {
  const body = { messages: userMessage($("play-prompt").value, await attachedImage($("play-image"))),
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

// The scene question being asked, if the prompt is still one of the scene's questions.
function askedQuestion() {
  if (!state.scene || $("play-image").files.length) return null;
  return state.scene.questions.find((q) => q.prompt === $("play-prompt").value) || null;
}

const normalise = (s) => s.trim().toLowerCase().replace(/[.!\s]+$/, "");

function verdicts() {
  const q = askedQuestion();
  for (const which of ["steered", "unsteered"]) {
    const out = $(`out-${which}`).textContent;
    $(`verdict-${which}`).textContent = q && out ? (normalise(out) === normalise(q.answer) ? "· right" : "· not the ground truth") : "";
  }
}

async function generate(event) {
  event.preventDefault();
  clearError();
  $("play-run").disabled = true;
  verdicts();
  try {
    const [steered, plain] = await Promise.all([chatBody(true), chatBody(false)]);
    await Promise.all([streamInto(steered, $("out-steered")), streamInto(plain, $("out-unsteered"))]);
    verdicts();
  } catch (e) { showError(e); } finally { $("play-run").disabled = false; }
}

async function sweep() {
  clearError();
  const id = Number($("sweep-feature").value);
  const values = $("sweep-values").value.split(",").map((v) => Number(v.trim())).filter((v) => Number.isFinite(v));
  if (!state.edits.length || !values.length) { showError("Add a feature and give values to sweep."); return; }
  const others = state.edits.filter((e) => e.id !== id);
  $("sweep-caption").textContent = `Sweep of feature ${id} (raw values)` + (others.length
    ? `; held fixed: ${others.map((e) => `feature ${e.id} at ${fmt(e.value)}`).join(", ")}` : "");
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

// -- a generated scene --------------------------------------------------------------------------

async function newScene() {
  clearError();
  const body = {};
  if ($("scene-seed").value.trim() !== "") body.seed = Number($("scene-seed").value);
  if ($("scene-index").value.trim() !== "") body.index = Number($("scene-index").value);
  $("scene-new").disabled = true;
  $("scene-status").textContent = "Generating…";
  try {
    const scene = await api("/v1/scenes", body);
    state.scene = scene;
    $("scene-image").src = scene.image;
    $("scene-caption").textContent = `${scene.caption} (seed ${scene.seed}, scene ${scene.index})`;
    $("scene-question").replaceChildren(...scene.questions.map((q, i) =>
      el("option", { value: String(i) }, q.question)));
    $("play-image").value = "";
    askQuestion(0);
    $("scene").hidden = false;
    $("scene-status").textContent = "";
    imageNotes();
  } catch (e) { $("scene-status").textContent = ""; showError(e); } finally { $("scene-new").disabled = false; }
}

function askQuestion(i) {
  const q = state.scene.questions[i];
  if (!q) return;
  $("scene-question").value = String(i);
  $("play-prompt").value = q.prompt;
  $("scene-answer-text").textContent = q.answer;
  for (const which of ["steered", "unsteered"]) { $(`out-${which}`).textContent = ""; $(`verdict-${which}`).textContent = ""; }
}

function imageNotes() {
  const scene = state.scene ? "none chosen: the generated scene is attached" : "";
  $("play-image-note").textContent = $("play-image").files.length ? "" : scene;
  $("inspect-image-note").textContent = $("inspect-image").files.length ? "" : scene;
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

// A token as it reads: its decoded text, line breaks and tabs shown, spaces kept.
const shown = (text) => text.replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";

function renderPositions() {
  const result = state.inspected;
  if (!result) return;
  const all = (result.positions || []).filter((p) => p.kind === "text");
  const showTemplate = $("inspect-show-template").checked;
  const visible = all.filter((p) => showTemplate || !p.template);
  $("inspect-positions").replaceChildren(...visible.map((p) =>
    el("li", p.template ? { class: "template-row" } : {}, el("code", { class: "tok", title: `token ${JSON.stringify(p.token)}` }, shown(p.text)),
      p.template ? el("span", { class: "badge" }, p.special ? "special" : "template") : "", " ",
      p.features.slice(0, 3).map((f) => el("a", { href: `#/feature/${f.id}`, title: f.explanation || "" },
        `${f.id} (${f.activation.toFixed(1)}) `)))));
  const hidden = all.length - visible.length;
  if (hidden) $("inspect-positions").append(el("li", { class: "muted" }, `${hidden} chat-template positions hidden`));
}

async function inspect(event) {
  event.preventDefault();
  clearError();
  $("inspect-status").textContent = "Inspecting…";
  try {
    const image = await attachedImage($("inspect-image"));
    const everything = $("inspect-special").checked;
    const result = await api("/v1/inspect", { messages: userMessage($("inspect-prompt").value, image), top_k: 5,
                                              grid_features: 5, include_special_tokens: everything,
                                              include_template_tokens: everything });
    state.inspected = result;
    const explained = new Map([...(result.pooled.image || []), ...(result.pooled.text || [])].map((f) => [f.id, f.explanation]));
    const grids = $("inspect-grids");
    grids.replaceChildren();
    if (image && result.images.length) {
      const picture = new Image();
      picture.src = image;
      await picture.decode();
      for (const [id, grid] of Object.entries(result.images[0].features)) {
        const what = explained.get(Number(id)) || "";
        const canvas = el("canvas", { role: "img", "aria-label": `Heatmap of feature ${id}${what ? `, ${what},` : ""} over the image` });
        drawHeatmap(canvas, picture, grid);
        grids.append(el("figure", { class: "heatmap" }, canvas, el("figcaption", {},
          el("div", { class: "heat-label" }, el("strong", {}, `Feature ${id}`), what ? `: ${what}` : ""),
          featureButtons(Number(id)))));
      }
    }
    const pooled = [...(result.pooled.image || []).map((f) => ["image", f]), ...(result.pooled.text || []).map((f) => ["text", f])];
    $("inspect-pooled").replaceChildren(...pooled.map(([kind, f]) => el("li", {}, `${kind}: `, featureButtons(f.id),
      ` ${f.activation.toFixed(2)} `, el("span", { class: "muted" }, f.explanation || ""))));
    const counts = result.pooled_tokens || {};
    $("inspect-pooled-note").textContent = `Mean activation over ${counts.text} text and ${counts.image} image tokens: `
      + (everything ? "every token, special and chat-template tokens included."
        : "the tokenizer's special tokens, the first (attention-sink) position and the rest of the chat template are left out.");
    renderPositions();
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
  $("sweep-values").addEventListener("input", () => { state.sweepTyped = true; });
  $("sweep-feature").addEventListener("change", sweepDefaults);
  $("play-add").addEventListener("input", suggest);
  $("play-add").addEventListener("keydown", pickSuggestion);
  $("play-add").addEventListener("change", pickSuggestion);
  $("play-preset").addEventListener("change", presetDescription);
  $("play-image").addEventListener("change", imageNotes);
  $("inspect-image").addEventListener("change", imageNotes);
  $("scene-new").addEventListener("click", newScene);
  $("scene-question").addEventListener("change", () => askQuestion(Number($("scene-question").value)));
  $("inspect-form").addEventListener("submit", inspect);
  $("inspect-show-template").addEventListener("change", renderPositions);
  window.addEventListener("hashchange", route);
  // the model card first: a page opened straight at #/feature/N labels its numbers by whether the
  // model takes images; routing still happens when the card cannot be read (a missing API key)
  try { await load(); } finally { route(); }
}

function presetDescription() {
  const chosen = state.presets.find((m) => m.preset.name === $("play-preset").value);
  $("play-preset-description").textContent = chosen ? chosen.preset.description : "";
  $("play-preset-description").hidden = !chosen;
  $("play-preset").title = chosen ? chosen.preset.description : "";
}

async function load() {
  const models = await api("/v1/models");
  state.model = models.data[0].id;
  state.multimodal = Boolean(models.data[0].multimodal);
  $("model-name").textContent = state.model;
  for (const id of ["scene-box", "play-image-row", "inspect-image-row"]) $(id).hidden = !state.multimodal;
  state.presets = models.data.filter((m) => m.preset);
  // the name in the list (a description can run to 500 characters), the description as its tooltip
  // and, for the chosen one, below the list
  $("play-preset").replaceChildren(el("option", { value: "" }, "none"),
    ...state.presets.map((m) => el("option", { value: m.preset.name, title: m.preset.description }, m.preset.name)));
  presetDescription();
}

start().catch(showError);
