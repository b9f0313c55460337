// The dgserve web inspector: plain JavaScript over the /v1 API, drawing with SVG and canvas.
// Every URL is relative to the page (served at /inspector), so the page also works behind a
// proxy that mounts dgserve under a path prefix.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const KEY_STORAGE = "dgserve.apiKey"; // sessionStorage: the key leaves with the tab
const ROUTES = {classification: "classify", detection: "detect", segmentation: "segment",
                video_classification: "classify-video"};
// Categorical colours for graph nodes (GloRe projections) and boxes.
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"];
// A viridis-like sequential scale, so heatmaps read the same in every view.
const SCALE = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

const state = {models: [], graphs: {}, upload: null, recordA: null, recordB: null};

// ---- small helpers ---------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

function colour(value) {
  const v = Math.max(0, Math.min(1, Number.isFinite(value) ? value : 0)) * (SCALE.length - 1);
  const i = Math.min(Math.floor(v), SCALE.length - 2), f = v - i;
  const c = SCALE[i].map((a, k) => Math.round(a + (SCALE[i + 1][k] - a) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function status(message, isError = false) {
  const node = $("status");
  node.textContent = message;
  node.classList.toggle("error", isError);
}

function parseTags(text) {
  return text.split(",").map((t) => t.trim()).filter(Boolean);
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (Array.isArray(v)) v.forEach((x) => q.append(k, x));
    else if (v !== null && v !== undefined && v !== "") q.append(k, v);
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

// Column heads have one cell's width: the DAG's end nodes by their usual short names.
function shortName(name) {
  return {input: "in", output: "out"}[name] || String(name).slice(0, 3);
}

function nodeName(nodes, i) {
  return nodes && nodes[i] != null ? nodes[i] : String(i);
}

// ---- the API, with the key ----------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? {Authorization: `Bearer ${key}`} : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, {...options, headers: {...authHeaders(), ...(options.headers || {})}});
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body.error) message = `${response.status}: ${body.error.message || body.error}`;
    } catch (_) { /* not JSON: keep the status line */ }
    throw new Error(message);
  }
  return response;
}

const apiJson = async (path, options) => (await api(path, options)).json();

// Run an action from a button or an upload, and show its failure in the status line rather
// than as an unhandled rejection.
function guarded(action) {
  return async (...args) => {
    try {
      await action(...args);
    } catch (error) {
      status(error.message, true);
    }
  };
}

// ---- drawing: one DG-Net stage, one GloRe unit --------------------------------------

// The stage's possible edges: the model's graph description when known, else every forward
// pair; [source, target] node indices.
function possibleEdges(stage, graphStage) {
  if (graphStage && graphStage.edges) return graphStage.edges;
  const n = stage.nodes.length, edges = [];
  for (let t = 1; t < n; t++) for (let s = 1; s < t; s++) edges.push([s, t]);
  return edges;
}

// A stage as one <svg data-stage>: its DAG in topological order (open edges by weight, closed
// edges faint, skipped nodes grey) beside its adjacency heatmap (adjacency[target][source]).
function stageSvg(stage, graphStage) {
  const nodes = stage.nodes, n = nodes.length, adj = stage.adjacency || [];
  const gap = 56, dagW = Math.max(160, (n - 1) * gap + 40), cell = Math.max(14, Math.min(26, 160 / n));
  const heatX = dagW + 30, height = Math.max(150, n * cell + 60);
  const root = svg("svg", {width: heatX + n * cell + 40, height, "data-stage": stage.stage, class: "stage"});
  root.append(svg("title", {}, `stage ${stage.stage}`));
  const dag = svg("g", {class: "dag"}), midY = height - 40;
  const x = (i) => 20 + i * gap;
  const open = new Set();
  for (let t = 0; t < n; t++) for (let s = 0; s < n; s++) if ((adj[t] || [])[s] > 0) open.add(`${s},${t}`);
  const closed = possibleEdges(stage, graphStage).filter(([s, t]) => !open.has(`${s},${t}`));
  const arc = (s, t) => {
    const rise = Math.min(midY - 12, 18 * (t - s));
    return `M${x(s)},${midY} Q${(x(s) + x(t)) / 2},${midY - 2 * rise} ${x(t)},${midY}`;
  };
  for (const [s, t] of closed) {
    dag.append(svg("path", {d: arc(s, t), fill: "none", stroke: "#c9ced8", "stroke-dasharray": "3 3",
                            "data-edge": `${s}-${t}`, "data-open": "false"}));
  }
  for (const key of open) {
    const [s, t] = key.split(",").map(Number), w = adj[t][s];
    const path = svg("path", {d: arc(s, t), fill: "none", stroke: colour(w), "stroke-width": 1 + 4 * Math.min(1, w),
                              "data-edge": `${s}-${t}`, "data-open": "true"});
    path.append(svg("title", {}, `${nodeName(nodes, s)} → ${nodeName(nodes, t)}: ${w.toFixed(3)}`));
    dag.append(path);
  }
  nodes.forEach((name, i) => {
    const ran = !stage.executed || stage.executed[i];
    dag.append(svg("circle", {cx: x(i), cy: midY, r: 9, fill: ran ? "#fff" : "#d0d4dc",
                              stroke: ran ? "#1d2330" : "#9aa1ad", "data-node": name}));
    dag.append(svg("text", {x: x(i), y: midY + 24, "text-anchor": "middle"}, name));
  });
  const summary = stage.open_edges != null
    ? `${stage.stage}: ${stage.open_edges}/${stage.possible_edges} edges open, ${stage.skipped_nodes} skipped`
    : stage.stage;
  dag.append(svg("text", {x: 4, y: 14}, summary));
  root.append(dag);
  root.append(heatmap(adj, heatX, 36, cell, nodes, "heatmap"));
  return root;
}

// An n×n matrix as coloured cells with row (target) and column (source) names.
function heatmap(matrix, x0, y0, cell, names, cls, max = 1) {
  const g = svg("g", {class: cls, transform: `translate(${x0},${y0})`});
  matrix.forEach((row, t) => row.forEach((v, s) => {
    const rect = svg("rect", {x: s * cell, y: t * cell, width: cell - 1, height: cell - 1,
                              fill: colour(max > 0 ? v / max : 0)});
    rect.append(svg("title", {}, `${nodeName(names, s)} → ${nodeName(names, t)}: ${Number(v).toFixed(3)}`));
    g.append(rect);
  }));
  if (names) {
    names.forEach((name, i) => {
      g.append(svg("text", {x: i * cell + cell / 2, y: -4, "text-anchor": "middle"}, shortName(name)));
      g.append(svg("text", {x: matrix.length * cell + 4, y: i * cell + cell * 0.7}, String(name).slice(0, 8)));
    });
  }
  return g;
}

// A GloRe projection map, [H][W] (or [T][H][W] for video: the middle frame), drawn over the
// image when there is one: each location coloured by the graph node it projects to.
function projectionCanvas(unit, image) {
  let grid = unit.projection || [];
  if (Array.isArray(grid[0]) && Array.isArray(grid[0][0])) grid = grid[Math.floor(grid.length / 2)];
  const h = grid.length, w = h ? grid[0].length : 0;
  const size = 192, canvas = el("canvas", {width: size, height: size, "data-unit": unit.unit});
  const ctx = canvas.getContext("2d");
  if (image) ctx.drawImage(image, 0, 0, size, size);
  ctx.globalAlpha = image ? 0.45 : 1;
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < w; c++) {
      ctx.fillStyle = PALETTE[grid[r][c] % PALETTE.length];
      ctx.fillRect((c * size) / w, (r * size) / h, Math.ceil(size / w), Math.ceil(size / h));
    }
  }
  const top = ((unit.projection_summary || {}).top_nodes || [])
    .map((t) => `node ${t.node}: ${(100 * t.fraction).toFixed(0)}%`).join(", ");
  return el("figure", {class: "module", "data-unit": unit.unit}, canvas,
            el("figcaption", {text: `${unit.unit} (${unit.num_nodes} nodes) ${top}`}));
}

function renderConnectivity(connectivity, model, stagesBox, gloreBox, image) {
  stagesBox.replaceChildren();
  gloreBox.replaceChildren();
  const graph = state.graphs[model] || {stages: []};
  for (const stage of (connectivity || {}).stages || []) {
    const graphStage = (graph.stages || []).find((g) => g.name === stage.stage);
    stagesBox.append(el("div", {class: "module"}, stageSvg(stage, graphStage)));
  }
  for (const unit of (connectivity || {}).glore_units || []) gloreBox.append(projectionCanvas(unit, image));
}

// ---- predictions over the image ------------------------------------------------------

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser cannot show this file as an image"));
    image.src = src;
  });
}

// Draw the image (or a blank of its size) scaled to at most 384 px, then what the task
// predicted over it: boxes for detection, the label map for segmentation.
async function drawPredictions(canvas, image, info, predictions, task) {
  predictions = asList(predictions);
  const width = (image && image.naturalWidth) || info.width || 64;
  const height = (image && image.naturalHeight) || info.height || 64;
  const scale = Math.min(384 / width, 384 / height, 8);
  canvas.width = Math.round(width * scale);
  canvas.height = Math.round(height * scale);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (image) ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  if (task === "detection") {
    ctx.lineWidth = 2;
    ctx.font = "12px system-ui, sans-serif";
    predictions.forEach((p) => {
      const [x1, y1, x2, y2] = p.box.map((v) => v * scale);
      const text = `${p.label} ${p.score.toFixed(2)}`, ty = Math.max(14, y1);
      ctx.strokeStyle = ctx.fillStyle = PALETTE[p.index % PALETTE.length];
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.fillRect(x1, ty - 14, ctx.measureText(text).width + 6, 14); // a label that reads on any background
      ctx.fillStyle = "#fff";
      ctx.fillText(text, x1 + 3, ty - 3);
    });
  } else if (task === "segmentation" && predictions[0] && predictions[0].label_map) {
    const map = await loadImage(`data:image/png;base64,${predictions[0].label_map}`);
    ctx.globalAlpha = image ? 0.5 : 1;
    ctx.drawImage(map, 0, 0, canvas.width, canvas.height);
    ctx.globalAlpha = 1;
  }
}

function predictionItems(list, predictions, task) {
  predictions = asList(predictions);
  list.replaceChildren();
  if (task === "segmentation") {
    for (const c of (predictions[0] || {}).classes || []) {
      list.append(barItem(c.label, `${c.label} ${(100 * c.pixel_fraction).toFixed(1)}% of pixels`, c.pixel_fraction));
    }
    return;
  }
  for (const p of predictions) list.append(barItem(p.label, `${p.label} ${p.score.toFixed(4)}`, p.score));
}

// Segmentation answers one prediction object per image; the other tasks a list.
function asList(predictions) {
  return Array.isArray(predictions) ? predictions : predictions ? [predictions] : [];
}

function barItem(label, text, fraction) {
  const bar = el("span", {class: "bar"});
  bar.style.width = `${Math.round(120 * fraction)}px`; // CSSOM, which the page's CSP allows (a style attribute it does not)
  return el("li", {"data-label": label}, text, bar);
}

// ---- models ---------------------------------------------------------------------------

function modelTask(name) {
  const model = state.models.find((m) => m.name === name);
  if (!model) return null;
  const version = model.versions.find((v) => v.version === model.default_version) || model.versions[0];
  return version ? version.task : null;
}

async function loadModels() {
  const body = await apiJson("v1/models");
  state.models = body.models;
  for (const model of body.models) {
    const version = model.versions.find((v) => v.version === model.default_version) || model.versions[0];
    if (version && version.graph) state.graphs[model.name] = version.graph;
  }
  for (const id of ["model", "records-model", "aggregate-model"]) {
    const select = $(id), keep = select.value;
    select.replaceChildren();
    if (id === "records-model") select.append(el("option", {value: "", text: "any"}));
    for (const model of body.models) {
      const task = modelTask(model.name);
      const label = `${model.name} (${task || "?"}${model.ready ? "" : ", not ready"})`;
      select.append(el("option", {value: model.name, text: id === "records-model" ? model.name : label}));
    }
    if (keep) select.value = keep;
  }
  status(`${body.models.length} models`);
}

// ---- the single-image view ----------------------------------------------------------

async function upload(file) {
  const model = $("model").value, task = modelTask(model);
  if (!model || !ROUTES[task]) throw new Error("choose a model first");
  status(`sending ${file.name} to ${model}…`);
  const url = `v1/models/${encodeURIComponent(model)}/${ROUTES[task]}${query({tag: parseTags($("upload-tags").value)})}`;
  const body = await apiJson(url, {method: "POST", body: file,
                                   headers: {"Content-Type": file.type || "application/octet-stream"}});
  const result = body.results[0];
  if (state.upload) URL.revokeObjectURL(state.upload);
  state.upload = URL.createObjectURL(file);
  const image = file.type.startsWith("image/") ? await loadImage(state.upload).catch(() => null) : null;
  await drawPredictions($("image-canvas"), image, result.image, result.predictions, task);
  $("image-caption").textContent = `${file.name}, ${result.image.width}×${result.image.height}`;
  predictionItems($("predictions"), result.predictions, task);
  $("record-link").replaceChildren(result.id
    ? el("span", {}, "Record ", el("code", {text: result.id}), " ",
         el("button", {type: "button", "data-open": result.id, text: "open in Records"}))
    : el("span", {class: "muted", text: "no record was stored for this image"}));
  renderConnectivity(result.connectivity, model, $("stages"), $("glore"), image);
  status(`${model} v${body.version}: ${task}`);
}

function setUpDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", guarded(async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) await upload(e.dataTransfer.files[0]);
  }));
  $("file").addEventListener("change", guarded(async (e) => {
    const file = e.target.files[0];
    e.target.value = ""; // so that choosing the same file again (say, for another model) uploads it again
    if (file) await upload(file);
  }));
}

// ---- records: browse, open, compare ---------------------------------------------------

// The newest `show` records that match: the listing pages oldest first, so page forward with
// ?since= from the window's start and keep the tail.
async function recentRecords(filters, windowS, show) {
  const page = 500;
  let since = windowS ? new Date(Date.now() - windowS * 1000).toISOString() : null;
  const seen = new Map();
  for (let i = 0; i < 100; i++) {
    const body = await apiJson(`v1/inspections${query({...filters, since, limit: page, connectivity: "false"})}`);
    for (const r of body.records) seen.set(r.id, r);
    if (body.count < page) break;
    const last = body.records[body.records.length - 1].created_at;
    if (last === since) break; // a page of one instant: nothing newer can be reached this way
    since = last;
  }
  return [...seen.values()].slice(-show).reverse();
}

async function listRecords() {
  const filters = {model: $("records-model").value, label: $("records-label").value.trim(),
                   tag: parseTags($("records-tag").value)};
  const show = Math.max(1, Math.min(1000, Number($("records-limit").value) || 50));
  const records = await recentRecords(filters, Number($("records-window").value) || 0, show);
  const body = $("records").tBodies[0];
  body.replaceChildren();
  for (const r of records) {
    const top = ((r.prediction || {}).predictions || [])[0] || {};
    const tags = Object.entries(r.tags || {}).map(([k, v]) => `${k}:${v}`).join(" ");
    body.append(el("tr", {"data-id": r.id},
      el("td", {text: new Date(r.created_at).toLocaleString()}), el("td", {text: `${r.model} v${r.version}`}),
      el("td", {text: top.label || ""}), el("td", {text: top.score != null ? top.score.toFixed(3) : ""}),
      el("td", {text: tags}),
      el("td", {}, el("button", {type: "button", "data-open": r.id, "data-pane": "a", text: "A"}),
                   el("button", {type: "button", "data-open": r.id, "data-pane": "b", text: "B"}))));
  }
  status(`${records.length} records, newest first`);
}

async function openRecord(id, pane) {
  const record = await apiJson(`v1/inspections/${encodeURIComponent(id)}`);
  const box = $(`record-${pane}`), task = record.task;
  const prediction = record.prediction || {}, predictions = prediction.predictions || [];
  // Only where the task draws over the image: the blank stands in for it at its size.
  const canvas = task === "detection" || task === "segmentation" ? el("canvas", {width: 0, height: 0}) : null;
  const list = el("ol");
  const stages = el("div", {class: "modules"}), glore = el("div", {class: "modules"});
  const tags = Object.entries(record.tags || {}).map(([k, v]) => `${k}:${v}`).join(", ") || "none";
  const picture = el("button", {type: "button", text: "Server picture"});
  const pictureBox = el("div");
  picture.addEventListener("click", guarded(() => showServerPicture(
    `v1/inspections/${encodeURIComponent(id)}/connectivity.svg`, pictureBox)));
  box.replaceChildren(
    el("h3", {}, `${pane.toUpperCase()}: `, el("code", {text: record.id})),
    el("p", {class: "muted", text: `${record.model} v${record.version} · ${task} · ${record.created_at} · tags ${tags}`}),
    canvas, list, stages, glore, picture, pictureBox);
  // The store keeps no input image (it may be private), so predictions are drawn on a blank.
  if (canvas) await drawPredictions(canvas, null, prediction.image || {}, predictions, task);
  predictionItems(list, predictions, task);
  renderConnectivity(record.connectivity, record.model, stages, glore, null);
  state[pane === "a" ? "recordA" : "recordB"] = record;
  showDifference();
  status(`opened ${record.id} in ${pane.toUpperCase()}`);
}

// Where A's and B's paths differ: per stage the edges open in one and closed in the other.
function showDifference() {
  const a = state.recordA, b = state.recordB, out = $("compare-diff");
  if (!a || !b) { out.textContent = ""; return; }
  const bStages = new Map(((b.connectivity || {}).stages || []).map((s) => [s.stage, s]));
  const lines = [];
  for (const sa of (a.connectivity || {}).stages || []) {
    const sb = bStages.get(sa.stage);
    if (!sb) continue;
    const diff = [];
    sa.adjacency.forEach((row, t) => row.forEach((w, s) => {
      const wb = (sb.adjacency[t] || [])[s] || 0;
      if ((w > 0) !== (wb > 0)) diff.push(`${nodeName(sa.nodes, s)}→${nodeName(sa.nodes, t)} ${w > 0 ? "A" : "B"} only`);
    }));
    lines.push(`${sa.stage}: ${diff.length ? diff.join(", ") : "same path"}`);
  }
  out.textContent = lines.length ? `A vs B: ${lines.join(" · ")}` : "A and B have no DG-Net stage in common";
}

async function showServerPicture(path, box) {
  const blob = await (await api(path)).blob();
  const old = box.querySelector("img");
  if (old) URL.revokeObjectURL(old.src);
  box.replaceChildren(el("img", {class: "server-picture", src: URL.createObjectURL(blob), alt: path}));
}

// ---- the aggregate view --------------------------------------------------------------

function aggregateParams() {
  return {group_by: $("aggregate-group").value.trim(), label: $("aggregate-label").value.trim(),
          tag: parseTags($("aggregate-tag").value), top_k: $("aggregate-topk").value};
}

async function summarize() {
  const model = $("aggregate-model").value;
  const summary = await apiJson(`v1/models/${encodeURIComponent(model)}/connectivity${query(aggregateParams())}`);
  const graph = state.graphs[model] || {stages: []};
  const nodesOf = (stage) => ((graph.stages || []).find((g) => g.name === stage) || {}).nodes;
  $("aggregate-count").textContent =
    `${summary.count} images in ${summary.groups.length} groups` + (summary.ungrouped ? `, ${summary.ungrouped} without the group key` : "");

  const groupsBox = $("groups"), patternsBox = $("patterns");
  groupsBox.replaceChildren();
  patternsBox.replaceChildren();
  const stageNames = ((summary.modules || {}).stages || []).map((m) => m.name);
  for (const name of stageNames) {
    const row = el("div", {class: "group-row", "data-stage": name}, el("h3", {text: name}));
    const patterns = el("table", {"data-stage": name},
      el("thead", {}, el("tr", {}, ...["Group", "Distinct", "Entropy (bits)", "Pattern (open edges)", "Count", "Share"]
        .map((h) => el("th", {text: h})))));
    const tbody = el("tbody");
    for (const group of summary.groups) {
      const stage = (group.stages || []).find((s) => s.stage === name);
      if (!stage) continue;
      const nodes = nodesOf(name), freq = stage.adjacency_open_frequency, cell = 22;
      const box = svg("svg", {width: freq.length * cell + 70, height: freq.length * cell + 40, "data-group": group.key});
      box.append(svg("text", {x: 0, y: 12}, `${group.key} (${group.count})`));
      box.append(heatmap(freq, 0, 30, cell, nodes, "heatmap"));
      row.append(el("div", {class: "module"}, box));
      const p = stage.adjacency_patterns || {top: []};
      p.top.forEach((pattern, i) => {
        const edges = pattern.open.map(([t, s]) => `${nodeName(nodes, s)}→${nodeName(nodes, t)}`).join(" ");
        tbody.append(el("tr", {},
          el("td", {text: i === 0 ? `${group.key}` : ""}), el("td", {text: i === 0 ? String(p.distinct) : ""}),
          el("td", {text: i === 0 ? p.entropy_bits.toFixed(2) : ""}), el("td", {}, el("code", {text: edges || "none"})),
          el("td", {text: String(pattern.count)}), el("td", {text: `${(100 * pattern.share).toFixed(1)}%`})));
      });
    }
    groupsBox.append(row);
    patterns.append(tbody);
    patternsBox.append(el("h3", {text: name}), patterns);
  }
  const unitNames = ((summary.modules || {}).glore_units || []).map((m) => m.name);
  for (const name of unitNames) {
    const row = el("div", {class: "group-row", "data-unit": name}, el("h3", {text: `${name}: share of locations per node`}));
    for (const group of summary.groups) {
      const unit = (group.glore_units || []).find((u) => u.unit === name);
      if (unit) row.append(el("div", {class: "module"}, sharesSvg(group, unit.projection_share)));
    }
    groupsBox.append(row);
  }
  distanceMatrix(summary.distance || {keys: [], matrix: []});
  status(`${model}: summary of ${summary.count} images`);
}

function sharesSvg(group, shares) {
  const w = 12, h = 60, box = svg("svg", {width: shares.length * w + 10, height: h + 24, "data-group": group.key});
  box.append(svg("text", {x: 0, y: 12}, `${group.key} (${group.count})`));
  shares.forEach((share, node) => {
    const bar = svg("rect", {x: node * w, y: 18 + h * (1 - share), width: w - 2, height: h * share,
                             fill: PALETTE[node % PALETTE.length]});
    bar.append(svg("title", {}, `node ${node}: ${(100 * share).toFixed(1)}%`));
    box.append(bar);
  });
  return box;
}

function distanceMatrix(distance) {
  const box = $("distance"), keys = distance.keys, n = keys.length, cell = Math.max(16, Math.min(36, 360 / Math.max(n, 1)));
  const max = Math.max(1e-9, ...distance.matrix.flat());
  const root = svg("svg", {width: n * cell + 120, height: n * cell + 40, id: "distance-matrix", "data-groups": n});
  const g = svg("g", {transform: "translate(0,30)"});
  distance.matrix.forEach((row, i) => row.forEach((v, j) => {
    const rect = svg("rect", {x: j * cell, y: i * cell, width: cell - 1, height: cell - 1, fill: colour(v / max),
                              "data-row": keys[i], "data-col": keys[j]});
    rect.append(svg("title", {}, `${keys[i]} vs ${keys[j]}: ${v.toFixed(3)}`));
    g.append(rect);
  }));
  keys.forEach((k, i) => {
    g.append(svg("text", {x: n * cell + 4, y: i * cell + cell * 0.7}, k));
    g.append(svg("text", {x: i * cell + cell / 2, y: -4, "text-anchor": "middle"}, String(k).slice(0, 3)));
  });
  root.append(g);
  box.replaceChildren(el("p", {class: "legend", text: `${distance.metric || "distance"}; darkest 0, brightest ${max.toFixed(3)}`}), root);
}

// ---- wiring ---------------------------------------------------------------------------

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", guarded(async (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
    await loadModels();
  }));
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
  setUpDrop();
  $("records-form").addEventListener("submit", guarded(async (e) => { e.preventDefault(); await listRecords(); }));
  $("aggregate-form").addEventListener("submit", guarded(async (e) => { e.preventDefault(); await summarize(); }));
  $("aggregate-picture").addEventListener("click", guarded(() => showServerPicture(
    `v1/models/${encodeURIComponent($("aggregate-model").value)}/connectivity.svg${query(aggregateParams())}`,
    $("aggregate-server-picture"))));
  // Buttons that open a record: in the listing (pane A or B) and under an upload's result.
  document.addEventListener("click", guarded(async (e) => {
    const button = e.target.closest("button[data-open]");
    if (!button) return;
    if (!button.dataset.pane) showView("records");
    await openRecord(button.dataset.open, button.dataset.pane || "a");
  }));
  guarded(loadModels)();
}

document.addEventListener("DOMContentLoaded", init);
