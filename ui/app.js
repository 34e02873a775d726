// The prediction page: pick, drop or paste an image, see it, and get the top classes from POST /predict/file;
// "why?" asks POST /explain for the heat map of what the model looked at and draws it over the image.
"use strict";

const TOP_K = 5;
const $ = (id) => document.getElementById(id);
let modelClasses = null;
let latest = 0;  // the newest request: an older answer arriving later is dropped
let current = null;  // the file shown, for "why?"

function apiHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

// What an error answer means, in plain words (the server's own message is already written for people).
function explain(status, detail) {
  const text = typeof detail === "string" ? detail : "";
  switch (status) {
    case 400: return `This file could not be used: ${text || "it is not an image the server can read."}`;
    case 401: return $("api-key").value.trim()
      ? "The server did not accept this API key. Check it under “API key”."
      : "This server needs an API key: open “API key” above and enter it.";
    case 413: return `The file is too large for this server. ${text}`.trim();
    case 422: return "The server did not understand the request.";
    case 503: return "The server is busy or still starting. Try again in a few seconds.";
    case 504: return "The server took too long to answer. Try again.";
    default: return `The server answered with an error (${status}). ${text}`.trim();
  }
}

function showError(message) {
  $("bars").replaceChildren();
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "No result.";
}

function showBars(result, ms) {
  $("error").hidden = true;
  const items = result.top_k.map((c) => {
    const pct = (100 * c.confidence).toFixed(1);
    const li = document.createElement("li");
    li.innerHTML = `<div class="label"><span class="name"></span><span class="pct">${pct}%</span></div>` +
      `<div class="track" aria-hidden="true"><div class="fill"></div></div>`;
    li.querySelector(".fill").style.width = `${pct}%`; // set through the CSSOM: the page's CSP refuses inline styles
    li.querySelector(".name").textContent = c.class_name;
    li.setAttribute("aria-label", `${c.class_name}: ${pct} percent`);
    return li;
  });
  $("bars").replaceChildren(...items);
  $("status").textContent = `Most likely: ${result.class_name} (${(100 * result.confidence).toFixed(1)}%), ` +
    `answered in ${Math.round(ms)} ms.`;
}

function hideWhy() {
  $("why-map").hidden = true;
  $("why-map").removeAttribute("src");
  $("why-note").hidden = true;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// The heat map of the predicted class (POST /explain), over the preview while "why?" is ticked.
async function showWhy() {
  if (!current) return;
  const request = latest;
  $("why-note").hidden = false;
  $("why-note").textContent = "Looking for where the model looked…";
  let response, body = null;
  try {
    const image = await readAsDataURL(current);
    response = await fetch("/explain", { method: "POST", body: JSON.stringify({ image_base64: image, top_k: 1 }),
      headers: { "Content-Type": "application/json", ...apiHeaders() } });
    body = await response.json();
  } catch (e) {
    if (request === latest) $("why-note").textContent = "Could not reach the server.";
    return;
  }
  if (request !== latest || !$("why").checked) return;
  if (!response.ok) {
    $("why-note").textContent = explain(response.status, body && body.detail);
    return;
  }
  $("why-map").src = `data:image/png;base64,${body.heatmap_png}`;
  $("why-map").alt = `Heat map: where the model saw ${body.explained_class_name}`;
  $("why-map").hidden = false;
  $("why-note").textContent = `Red: what raised the score of ${body.explained_class_name} most (Grad-CAM, ` +
    "over the image as the model saw it).";
}

async function classify(file, name) {
  const request = ++latest;
  current = file;
  hideWhy();
  if ($("preview").src.startsWith("blob:")) URL.revokeObjectURL($("preview").src);
  $("preview").src = URL.createObjectURL(file);
  $("preview-name").textContent = name || file.name || "pasted image";
  $("preview-box").hidden = false;
  $("status").textContent = "Classifying…";
  const form = new FormData();
  form.append("file", file, file.name || "image");
  form.append("top_k", String(TOP_K));
  const start = performance.now();
  let response;
  try {
    response = await fetch("/predict/file", { method: "POST", body: form, headers: apiHeaders() });
  } catch (e) {
    if (request === latest) showError("Could not reach the server. Is it still running?");
    return;
  }
  const ms = performance.now() - start;
  let body = null;
  try { body = await response.json(); } catch (e) { /* a proxy's HTML error page, say */ }
  if (request !== latest) return;
  if (!response.ok) {
    showError(explain(response.status, body && body.detail));
    return;
  }
  showBars(body, ms);
  if ($("why").checked) showWhy();
}

async function loadModel() {
  try {
    const response = await fetch("/model");
    if (!response.ok) throw new Error(String(response.status));
    const info = await response.json();
    modelClasses = info.classes;
    const arch = (info.model_config && info.model_config.arch) || "model";
    const acc = info.metrics && info.metrics.val_acc;
    $("model-info").textContent = `${arch}, ${info.classes.length} classes (${info.classes.slice(0, 10).join(", ")}` +
      `${info.classes.length > 10 ? ", …" : ""})` + (acc ? `, validation accuracy ${(100 * acc).toFixed(1)}%` : "") + ".";
  } catch (e) {
    $("model-info").textContent = "The model is not loaded yet: the server may still be starting.";
    setTimeout(loadModel, 3000);  // ask again: the samples shown depend on the model's classes
    return;
  }
  loadSamples();
}

// Sample images whose label the served model knows (CIFAR-10 ones for a CIFAR-10 model).
async function loadSamples() {
  let samples = [];
  try { samples = await (await fetch("/ui/samples/samples.json")).json(); } catch (e) { return; }
  const buttons = samples.filter((s) => !modelClasses || modelClasses.includes(s.label)).map((s) => {
    const button = document.createElement("button");
    button.type = "button";
    button.innerHTML = `<img alt="" src="/ui/samples/${s.file}"><span></span>`;
    button.querySelector("span").textContent = s.label;
    button.setAttribute("aria-label", `Try the sample image of a ${s.label}`);
    button.addEventListener("click", async () => {
      const blob = await (await fetch(`/ui/samples/${s.file}`)).blob();
      classify(new File([blob], s.file, { type: blob.type }), `sample: ${s.label}`);
    });
    return button;
  });
  $("samples").replaceChildren(...buttons);
}

function setup() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (e) => {
    if (e.target.files[0]) classify(e.target.files[0]);
  });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files[0]) classify(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...e.clipboardData.files][0];
    if (file) classify(file);
  });
  $("preview").addEventListener("error", () => { $("preview-box").hidden = true; });
  $("why").addEventListener("change", () => ($("why").checked ? showWhy() : hideWhy()));
  const saved = sessionStorage.getItem("cater-api-key");
  if (saved) $("api-key").value = saved;
  $("api-key").addEventListener("change", () => sessionStorage.setItem("cater-api-key", $("api-key").value.trim()));
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
