// The page to try a model (try.html): it calls the gateway's own REST API, as any client
// would. GET v1/models lists the models, GET v1/models/{m} gives a model's versions and
// preprocessing contract, POST v1/models/{m}[/versions/{v}]/classify (multipart, one `file`
// part) classifies. URLs are relative: the page works under a proxy's path prefix too.
// Text goes into the page as text (textContent), never as HTML: labels and messages are
// the server's data.
"use strict";

const $ = (id) => document.getElementById(id);
const keysOn = document.body.dataset.keys === "on";
let image = null; // the File to classify

function headers() {
  const key = $("key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

// The API's answer as JSON, or an Error carrying the envelope's message and code.
async function call(path, init = {}) {
  const resp = await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) } });
  let body = null;
  try {
    body = await resp.json();
  } catch (_) {
    // not JSON: the status says it
  }
  if (!resp.ok) {
    const err = (body && body.error) || {};
    const error = new Error(`${resp.status}: ${err.message || resp.statusText}`);
    error.status = resp.status;
    throw error;
  }
  return body;
}

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  select.append(o);
}

async function loadModels() {
  $("model").replaceChildren();
  try {
    const { models } = await call("v1/models");
    for (const m of models) option($("model"), m.name, m.default ? `${m.name} (default)` : m.name);
    if (!models.length) {
      say("The gateway serves no model.", true);
      return;
    }
    const preferred = models.find((m) => m.default) || models[0];
    $("model").value = preferred.name;
    await loadModel();
  } catch (error) {
    say(keysOn && error.status === 401 ? `${error.message}. Enter an API key.` : error.message, true);
  }
}

async function loadModel() {
  const name = $("model").value;
  const detail = await call(`v1/models/${encodeURIComponent(name)}`);
  $("version").replaceChildren();
  option($("version"), "", "routed"); // the canary weights choose; the answer says which
  for (const v of detail.versions) option($("version"), v, v);
  $("top-k").max = String(detail.num_classes);
  if (Number($("top-k").value) > detail.num_classes) $("top-k").value = String(detail.num_classes);
  showContract(detail.contract);
  say(`${name}: ${detail.arch}, ${detail.num_classes} classes, ${detail.precision}, on ${detail.kernels}`);
  $("classify").disabled = image === null;
}

function showContract(contract) {
  const list = $("contract");
  list.replaceChildren();
  for (const [key, value] of Object.entries(contract)) {
    if (value === null || value === undefined) continue;
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = Array.isArray(value) ? value.join(", ") : String(value);
    list.append(dt, dd);
  }
}

function choose(file) {
  if (!file) return;
  image = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.alt = file.name;
  preview.hidden = false;
  $("classify").disabled = !$("model").value;
  if ($("model").value) classify();
}

async function classify() {
  if (!image || !$("model").value) return;
  const model = encodeURIComponent($("model").value);
  const version = $("version").value;
  const path = version
    ? `v1/models/${model}/versions/${encodeURIComponent(version)}/classify`
    : `v1/models/${model}/classify`;
  const form = new FormData();
  form.append("file", image, image.name);
  const topK = $("top-k").value.trim();
  $("bars").replaceChildren();
  $("latency").textContent = "";
  say("Classifying...");
  $("classify").disabled = true;
  const started = performance.now();
  try {
    const body = await call(`${path}${topK ? `?top_k=${encodeURIComponent(topK)}` : ""}`, {
      method: "POST",
      body: form,
    });
    const ms = performance.now() - started;
    showBars(body.predictions[0]);
    say(`${body.model}, version ${body.version}`);
    $("latency").textContent = `${ms.toFixed(1)} ms round trip (request to answer, from this browser)`;
  } catch (error) {
    say(error.message, true);
  } finally {
    $("classify").disabled = false;
  }
}

function showBars(predictions) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const p of predictions) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    label.title = `class ${p.index}`;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${Math.max(0, Math.min(1, p.score)) * 100}%`; // CSSOM: allowed by the policy
    track.append(fill);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = p.score.toFixed(4);
    li.append(label, track, score);
    bars.append(li);
  }
}

function wire() {
  $("key-field").hidden = !keysOn;
  $("key").addEventListener("change", loadModels);
  $("model").addEventListener("change", () => loadModel().catch((e) => say(e.message, true)));
  $("file").addEventListener("change", () => choose($("file").files[0]));
  $("ask").addEventListener("submit", (e) => {
    e.preventDefault(); // the page posts through fetch, never as a form
    classify();
  });
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    choose(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") $("file").click();
  });
  loadModels();
}

wire();
