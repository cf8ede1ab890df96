// imagine web UI: talks to the job API (/api/v1) and, for PNG info and models, the A1111 endpoints.
"use strict";

const $ = (id) => document.getElementById(id);
let mode = "txt2img";
let currentJob = null;
let events = null;
let initImage = null; // HTMLImageElement of the init image, natural size
let lastPngParameters = null;

// ---- tabs
function showTab(tab) {
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
  const generating = ["txt2img", "img2img", "inpaint", "edit"].includes(tab);
  $("generate").hidden = !generating;
  $("pnginfo").hidden = tab !== "pnginfo";
  $("models").hidden = tab !== "models";
  $("merger").hidden = tab !== "merger";
  $("extras").hidden = tab !== "extras";
  $("cluster").hidden = tab !== "cluster";
  if (generating) {
    mode = tab;
    document.querySelectorAll(".only-txt2img, .only-img2img, .only-inpaint, .only-edit").forEach((el) => {
      el.hidden = !el.classList.contains("only-" + tab);
    });
  }
  if (tab === "extras") loadUpscalers().catch((err) => showError(err.message));
  if (tab === "models") loadModels();
  if (tab === "merger") loadMerger().catch((err) => showError(err.message));
  clearInterval(clusterTimer);
  if (tab === "cluster") {
    loadCluster().catch((err) => showError(err.message));
    clusterTimer = setInterval(() => loadCluster().catch(() => {}), 2000);
  }
}
let clusterTimer = null;
document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));

// ---- helpers
async function api(method, url, body) {
  const response = await fetch(url, {
    method, headers: body ? { "Content-Type": "application/json" } : {}, body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = data && data.detail ? data.detail : response.statusText;
    const retry = response.headers.get("Retry-After");
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}` +
      (retry ? ` (retry in ${retry} s)` : ""));
  }
  return data;
}
function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}
// what the server says to know before trusting the images (words the model never saw in a caption)
function showWarnings(warnings) {
  const text = (warnings || []).join("\n");
  $("warnings").textContent = text;
  $("warnings").hidden = !text;
}
function fileToDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("not a readable image"));
    img.src = src;
  });
}

// ---- samplers and the current model
async function loadSamplers() {
  const samplers = await api("GET", "/sdapi/v1/samplers");
  $("sampler").innerHTML = "";
  for (const s of samplers) {
    const option = document.createElement("option");
    option.value = s.aliases[0];
    option.textContent = s.name;
    $("sampler").appendChild(option);
  }
  $("sampler").value = "dpmpp_2m";
}
// the fields and panels that act on the current model; the others are disabled or hidden, not ignored
function applyTakes(takes) {
  if (!takes) return;
  for (const id of ["clip_skip", "distilled_cfg_scale"]) {
    $(id).disabled = !takes[id];
    $(id).closest("label").classList.toggle("not-taken", !takes[id]);
  }
  $("image_cfg_scale").disabled = !takes.image_cfg_scale;
  $("image_cfg_scale").closest("label").hidden = !takes.image_cfg_scale;
  $("inpainting_mask_weight").disabled = !takes.inpainting_mask_weight;
  $("inpainting_mask_weight").closest("label").hidden = !takes.inpainting_mask_weight;
  $("resolution_binning").disabled = !takes.resolution_binning;
  $("resolution_binning").closest("label").hidden = !takes.resolution_binning;
  $("text_encoders").disabled = !takes.text_encoders;
  $("text_encoders").closest("label").classList.toggle("not-taken", !takes.text_encoders);
  $("controlnet").hidden = !(takes.controlnet || takes.t2i_adapter);
  $("image-prompts").hidden = !takes.ip_adapter;
}
async function loadModelBadge() {
  const models = await api("GET", "/api/v1/models");
  $("model-badge").textContent = "model: " + models.current;
  const refiners = $("refiner");  // any served model can take the last steps (the server refuses another latent space)
  const keep = refiners.value;
  refiners.length = 1;  // "None" stays
  for (const m of models.models) refiners.add(new Option(m.name, m.name));
  refiners.value = [...refiners.options].some((o) => o.value === keep) ? keep : "";
  // the current model's own defaults: what the CLI and the job API use when nothing is given
  const current = models.models.find((m) => m.name === models.current);
  applyTakes(current && current.takes);
  if (current && current.defaults) {
    $("steps").value = current.defaults.steps;
    $("cfg_scale").value = current.defaults.cfg_scale;
    if ([...$("sampler").options].some((o) => o.value === current.defaults.sampler)) {
      $("sampler").value = current.defaults.sampler;
    }
  }
  return models;
}

// ---- init image and mask drawing
$("init-file").addEventListener("change", async (e) => {
  if (!e.target.files.length) return;
  initImage = await loadImage(await fileToDataURL(e.target.files[0]));
  const ctx = $("init-canvas").getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, 256, 256);
  ctx.drawImage(initImage, 0, 0, 256, 256);
  clearMask();
  drawOutpaint();
});

// ---- outpainting: the grown canvas, drawn to scale with the new border striped
const SIDES = ["left", "right", "up", "down"];
function outpaintBorders() {
  const out = {};
  for (const side of SIDES) out["outpaint_" + side] = Math.max(0, Math.round(Number($("outpaint_" + side).value) || 0));
  return out;
}
function drawOutpaint() {
  const b = outpaintBorders();
  const preview = $("outpaint-preview");
  const ctx = preview.getContext("2d");
  ctx.clearRect(0, 0, preview.width, preview.height);
  if (!initImage) { $("outpaint-size").textContent = ""; return; }
  const w = initImage.naturalWidth + b.outpaint_left + b.outpaint_right;
  const h = initImage.naturalHeight + b.outpaint_up + b.outpaint_down;
  const k = Math.min(preview.width / w, preview.height / h);
  ctx.save();
  ctx.scale(k, k);
  const stripes = document.createElement("canvas");
  stripes.width = stripes.height = 8;
  const sctx = stripes.getContext("2d");
  sctx.fillStyle = "#ddd"; sctx.fillRect(0, 0, 8, 8);
  sctx.strokeStyle = "#999"; sctx.beginPath(); sctx.moveTo(0, 8); sctx.lineTo(8, 0); sctx.stroke();
  ctx.fillStyle = ctx.createPattern(stripes, "repeat");
  ctx.fillRect(0, 0, w, h);
  ctx.drawImage(initImage, b.outpaint_left, b.outpaint_up);
  ctx.restore();
  const grown = SIDES.some((side) => b["outpaint_" + side] > 0);
  $("outpaint-size").textContent = grown ? `${w}x${h} px` : "";
}
SIDES.forEach((side) => $("outpaint_" + side).addEventListener("input", drawOutpaint));
function clearMask() {
  $("mask-canvas").getContext("2d").clearRect(0, 0, 256, 256);
}
$("clear-mask").addEventListener("click", clearMask);
$("mask-file").addEventListener("change", async (e) => {
  if (!e.target.files.length) return;
  const mask = await loadImage(await fileToDataURL(e.target.files[0]));
  const ctx = $("mask-canvas").getContext("2d");
  clearMask();
  // white = regenerate: show the mask's white parts as white strokes
  const off = document.createElement("canvas");
  off.width = off.height = 256;
  const octx = off.getContext("2d");
  octx.drawImage(mask, 0, 0, 256, 256);
  const data = octx.getImageData(0, 0, 256, 256);
  for (let i = 0; i < data.data.length; i += 4) data.data[i + 3] = data.data[i] > 127 ? 255 : 0;
  ctx.putImageData(data, 0, 0);
});
let drawing = false;
function paint(e) {
  if (!drawing) return;
  const rect = $("mask-canvas").getBoundingClientRect();
  const ctx = $("mask-canvas").getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.beginPath();
  ctx.arc((e.clientX - rect.left) * 256 / rect.width, (e.clientY - rect.top) * 256 / rect.height,
    Number($("brush").value) / 2, 0, 2 * Math.PI);
  ctx.fill();
}
$("mask-canvas").addEventListener("pointerdown", (e) => { drawing = true; paint(e); });
$("mask-canvas").addEventListener("pointermove", paint);
window.addEventListener("pointerup", () => { drawing = false; });

function initImageData() {
  const c = document.createElement("canvas");
  c.width = initImage.naturalWidth;
  c.height = initImage.naturalHeight;
  c.getContext("2d").drawImage(initImage, 0, 0);
  return c.toDataURL("image/png");
}
function maskData() {
  // the drawn strokes, scaled to the init image: white = regenerate, black = keep
  const c = document.createElement("canvas");
  c.width = initImage.naturalWidth;
  c.height = initImage.naturalHeight;
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, c.width, c.height);
  ctx.drawImage($("mask-canvas"), 0, 0, c.width, c.height);
  return c.toDataURL("image/png");
}

// ---- generate
function pickedTextEncoders() {
  const select = $("text_encoders");
  const picked = [...select.selectedOptions].map((o) => o.value);
  return select.disabled || !picked.length ? null : picked;
}
function requestBody() {
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  const body = {
    kind: mode, prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler: $("sampler").value, schedule: $("schedule").value || null, steps: number("steps"),
    cfg_scale: number("cfg_scale"), guidance_rescale: number("guidance_rescale") || 0, seed: number("seed"),
    distilled_cfg_scale: number("distilled_cfg_scale") ?? 3.5,
    n: number("n"), width: number("width"),
    height: number("height"), clip_skip: $("clip_skip").disabled ? null : number("clip_skip"),
    noise_seed_delta: number("noise_seed_delta") || 0,
    backend: $("backend").value, tile: number("tile") || null, vae_tile: number("vae_tile") || null,
    vae: $("vae").value === "Automatic" ? null : $("vae").value,
    text_encoders: pickedTextEncoders(),
  };
  if (mode === "txt2img" && !$("resolution_binning").disabled) body.resolution_binning = $("resolution_binning").checked;
  if (mode !== "edit" && $("refiner").value) {
    body.refiner = $("refiner").value;
    body.refiner_switch_at = number("refiner_switch_at");
  }
  if (mode === "txt2img" && $("hires-enable").checked) {
    body.hires_scale = number("hires_scale");
    body.hires_upscaler = $("hires_upscaler").value;
    body.hires_strength = number("hires_strength");
    body.hires_steps = number("hires_steps") || null;
    body.sr_noise_level = number("sr_noise_level");
  }
  if (mode !== "txt2img") {
    if (!initImage) throw new Error("choose an init image first");
    body.init_image = initImageData();
    body.strength = number("strength");
    body.resize_mode = $("resize_mode").value;
    if (!$("inpainting_mask_weight").disabled) body.inpainting_mask_weight = number("inpainting_mask_weight");
    if (mode === "img2img" && !$("image_cfg_scale").disabled) body.image_cfg_scale = number("image_cfg_scale");
  }
  const controls = controlUnits();
  if (controls.length && !$("controlnet").hidden) body.controls = controls;
  const prompts = imagePromptUnits();
  if (prompts.length && !$("image-prompts").hidden) body.image_prompts = prompts;
  if (mode === "edit") {  // an edit by inversion: one deterministic image
    body.source_prompt = $("source_prompt").value;
    body.null_text = $("null_text").checked;
    body.edit_mask = $("edit_mask").checked;
    body.n = 1;
  }
  if (mode === "inpaint") {
    body.mask = maskData();
    body.inpaint_fill = $("inpaint_fill").value;
    body.mask_blur = number("mask_blur");
    body.inpaint_only_masked = $("inpaint_only_masked").checked;
    body.inpaint_padding = number("inpaint_padding");
    body.mask_invert = $("mask_invert").checked;
    const borders = outpaintBorders();
    body.outpaint_left = borders.outpaint_left;
    body.outpaint_right = borders.outpaint_right;
    body.outpaint_up = borders.outpaint_up;
    body.outpaint_down = borders.outpaint_down;
  }
  return body;
}
function setBusy(busy) {
  $("generate-button").disabled = busy;
  $("cancel-button").disabled = !busy;
}
$("gen-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError(null);
  let body;
  try { body = requestBody(); } catch (err) { showError(err.message); return; }
  try {
    started(await api("POST", "/api/v1/jobs", body));
  } catch (err) {
    showError(err.message);
  }
});
$("cancel-button").addEventListener("click", async () => {
  if (currentJob) await api("DELETE", "/api/v1/jobs/" + currentJob).catch((err) => showError(err.message));
});

function started(job) {
  showWarnings(job.warnings);
  currentJob = job.id;
  setBusy(true);
  $("status-text").textContent = "queued";
  $("progress").value = 0;
  follow(job.id);
}

function follow(id) {
  if (events) events.close();
  events = new EventSource(`/api/v1/jobs/${id}/events`);
  events.addEventListener("progress", (e) => {
    const d = JSON.parse(e.data);
    $("progress").value = d.progress;
    $("status-text").textContent = d.status === "queued" ? (d.message ? "queued, " + d.message : "queued") :
      `step ${d.step} of ${d.total}` + (d.eta_seconds != null ? ` (about ${Math.ceil(d.eta_seconds)} s left)` : "")
      + (d.worker ? ` on ${d.worker}` : "");
    if (d.preview) {
      $("preview").src = "data:image/png;base64," + d.preview;
      $("preview").hidden = false;
    }
  });
  for (const end of ["done", "failed", "cancelled"]) {
    events.addEventListener(end, (e) => {
      events.close();
      events = null;
      setBusy(false);
      const job = JSON.parse(e.data);
      $("status-text").textContent = end;
      $("progress").value = end === "done" ? 1 : $("progress").value;
      if (end === "failed") showError(job.error);
      if (end === "done") addToGallery(job);
    });
  }
}

function addToGallery(job) {
  for (const image of job.images) {
    const figure = document.createElement("figure");
    figure.className = "result";
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = job.request.prompt;
    const caption = document.createElement("figcaption");
    caption.textContent = image.parameters;
    const row = document.createElement("div");
    row.className = "row";
    const download = document.createElement("a");
    download.href = image.url;
    download.download = `${image.seed}-${job.kind}.png`;
    download.textContent = "Download";
    const info = document.createElement("button");
    info.type = "button";
    info.className = "png-info";
    info.textContent = "PNG info";
    info.addEventListener("click", async () => {
      const blob = await (await fetch(image.url)).blob();
      showTab("pnginfo");
      await showPngInfo(blob);
    });
    row.append(download, info);
    figure.append(img, row, caption);
    $("gallery").prepend(figure);
  }
}

// ---- PNG info
async function showPngInfo(blob) {
  const url = await fileToDataURL(blob);
  $("png-preview").src = url;
  $("png-preview").hidden = false;
  try {
    const result = await api("POST", "/sdapi/v1/png-info", { image: url });
    $("png-parameters").textContent = result.info || "(this image carries no generation parameters)";
    const items = result.items || {};
    $("png-provenance").textContent = [["invisible watermark", items.imagine_watermark],
      ["signature", items.imagine_signature]].filter(([, v]) => v).map(([k, v]) => `${k}: ${v}`).join("\n");
    lastPngParameters = result.info ? result.parameters : null;
    $("send-to-txt2img").disabled = !lastPngParameters;
  } catch (err) {
    $("png-parameters").textContent = err.message;
    $("send-to-txt2img").disabled = true;
  }
}
$("png-file").addEventListener("change", (e) => e.target.files.length && showPngInfo(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) showPngInfo(e.dataTransfer.files[0]);
});
$("send-to-txt2img").addEventListener("click", () => {
  const p = lastPngParameters;
  $("prompt").value = p["Prompt"] || "";
  $("negative_prompt").value = p["Negative prompt"] || "";
  if (p["Steps"]) $("steps").value = p["Steps"];
  if (p["CFG scale"]) $("cfg_scale").value = p["CFG scale"];
  if (p["Seed"]) $("seed").value = p["Seed"];
  $("clip_skip").value = p["Clip skip"] || "";
  $("noise_seed_delta").value = p["ENSD"] || 0;
  $("guidance_rescale").value = p["Guidance rescale"] || 0;
  $("distilled_cfg_scale").value = p["Distilled CFG Scale"] || 3.5;
  $("resolution_binning").checked = p["Resolution binning"] !== "off";
  $("inpainting_mask_weight").value = p["Conditional mask weight"] || 1;
  $("image_cfg_scale").value = p["Image CFG scale"] || 1.5;
  const vae = (p["VAE"] || "").replace(/\.[^.]+$/, "");
  $("vae").value = [...$("vae").options].some((o) => o.value === vae) ? vae : "Automatic";
  const modules = Object.keys(p).filter((k) => /^Module \d+$/.test(k)).map((k) => p[k]);
  for (const o of $("text_encoders").options) o.selected = modules.includes(o.value);
  if (p["Size"]) {
    const [w, h] = p["Size"].split("x");
    $("width").value = w;
    $("height").value = h;
  }
  if (p["Sampler"]) {
    const match = [...$("sampler").options].find((o) => o.textContent === p["Sampler"]);
    if (match) $("sampler").value = match.value;
  }
  $("schedule").value = p["Schedule type"] === "Karras" ? "karras" : "";
  $("hires-enable").checked = Boolean(p["Hires upscale"]);  // A1111's hires fix fields
  if (p["Hires upscale"]) {
    $("hires").open = true;
    $("hires_scale").value = p["Hires upscale"];
    $("hires_strength").value = p["Denoising strength"] || 0;
    $("hires_steps").value = p["Hires steps"] || "";
    $("sr_noise_level").value = p["SR noise level"] || "";
    const upscaler = p["Hires upscaler"];
    if (upscaler && ![...$("hires_upscaler").options].some((o) => o.value === upscaler)) {
      $("hires_upscaler").add(new Option(upscaler, upscaler));  // a path: kept as the PNG names it
    }
    if (upscaler) $("hires_upscaler").value = upscaler;
  }
  $("tile").value = p["Tile size"] || "";
  $("vae_tile").value = p["VAE tile"] || "";
  showTab("txt2img");
});

// ---- LoRAs: picking one inserts A1111's tag into the prompt
async function loadLoras() {
  const loras = await api("GET", "/sdapi/v1/loras");
  const select = $("lora-picker");
  select.length = 1;
  for (const l of loras) select.add(new Option(l.name, l.name));
}

$("lora-picker").addEventListener("change", () => {
  const name = $("lora-picker").value;
  if (!name) return;
  const prompt = $("prompt");
  prompt.value = (prompt.value ? prompt.value.replace(/\s*$/, " ") : "") + `<lora:${name}:1>`;
  $("lora-picker").value = "";
});

// ---- embeddings: picking one writes its name into the prompt (that is how a prompt uses it)
async function loadEmbeddings() {
  const { loaded } = await api("GET", "/sdapi/v1/embeddings");
  const select = $("embedding-picker");
  select.length = 1;
  for (const name of Object.keys(loaded)) select.add(new Option(name, name));
}

$("embedding-picker").addEventListener("change", () => {
  const name = $("embedding-picker").value;
  if (!name) return;
  const prompt = $("prompt");
  prompt.value = (prompt.value ? prompt.value.replace(/\s*$/, " ") : "") + name;
  $("embedding-picker").value = "";
});

// ---- checkpoint merger (POST /api/v1/merge)
async function loadMerger() {
  const [models, loras] = await Promise.all([api("GET", "/api/v1/models"), api("GET", "/sdapi/v1/loras")]);
  for (const id of ["merge-a", "merge-b", "merge-c"]) {
    const select = $(id);
    const keep = select.value;
    select.length = id === "merge-c" ? 1 : 0;
    for (const m of models.models) select.add(new Option(m.title, m.name));
    if (id === "merge-b" && loras.length) {  // B may be an adapter: A + M dW (the merger's add difference)
      const group = document.createElement("optgroup");
      group.label = "LoRA / LyCORIS (adds M x its update)";
      for (const l of loras) group.appendChild(new Option(l.name, l.name));
      select.appendChild(group);
    }
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  }
}

$("merge-m").addEventListener("input", () => { $("merge-m-value").textContent = $("merge-m").value; });

$("merge-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = {
    primary: $("merge-a").value, secondary: $("merge-b").value, tertiary: $("merge-c").value || null,
    mode: $("merge-mode").value, multiplier: Number($("merge-m").value), name: $("merge-name").value.trim(),
    format: $("merge-format").value || null, dtype: $("merge-dtype").value || null,
  };
  $("merge-run").disabled = true;
  $("merge-result").classList.remove("err");
  $("merge-result").textContent = "merging...";
  try {
    const done = await api("POST", "/api/v1/merge", body);
    $("merge-result").textContent = `wrote ${done.title} (${done.path}); it is served now`;
    await loadMerger();
  } catch (err) {
    $("merge-result").classList.add("err");
    $("merge-result").textContent = err.message;
  } finally {
    $("merge-run").disabled = false;
  }
});

// ---- models
async function loadVaes() {
  const vaes = await api("GET", "/sdapi/v1/sd-vae");
  const select = $("vae");
  const keep = select.value;
  select.length = 1;  // "Automatic" stays
  for (const v of vaes) select.add(new Option(v.model_name, v.model_name));
  select.value = [...select.options].some((o) => o.value === keep) ? keep : "Automatic";
  const listed = await api("GET", "/api/v1/models");
  const encoders = $("text_encoders");
  const picked = new Set([...encoders.selectedOptions].map((o) => o.value));
  encoders.length = 0;
  for (const name of listed.text_encoders || []) {
    const option = new Option(name, name);
    option.selected = picked.has(name);
    encoders.add(option);
  }
}

async function loadModels() {
  loadVaes().catch((err) => showError(err.message));
  loadLoras().catch((err) => showError(err.message));
  loadEmbeddings().catch((err) => showError(err.message));
  const [models, options] = await Promise.all([api("GET", "/sdapi/v1/sd-models"), api("GET", "/sdapi/v1/options")]);
  const list = $("model-list");
  list.innerHTML = "";
  for (const m of models) {
    const li = document.createElement("li");
    const use = document.createElement("button");
    const current = m.title === options.sd_model_checkpoint;
    use.textContent = current ? "current" : "use";
    use.disabled = current;
    use.addEventListener("click", async () => {
      await api("POST", "/sdapi/v1/options", { sd_model_checkpoint: m.title }).catch((err) => showError(err.message));
      await loadModelBadge();
      loadModels();
      loadEmbeddings().catch((err) => showError(err.message));  // another text encoder fits others
    });
    li.append(use, document.createTextNode(` ${m.title}  (${m.filename})`));
    list.appendChild(li);
  }
}

// ---- cluster: the workers behind this server, its queue and the recent failures (GET /api/v1/cluster)
function cells(row, values) {
  const tr = document.createElement("tr");
  for (const v of values) {
    const td = document.createElement(row);
    td.textContent = v;
    tr.appendChild(td);
  }
  return tr;
}

async function loadCluster() {
  const info = await api("GET", "/api/v1/cluster");
  const now = Date.now() / 1000;
  $("cluster-queue").textContent = info.queue === "redis"
    ? `a Redis queue: ${info.jobs.queued} queued, ${info.jobs.running} running, ${info.jobs.finished} finished jobs kept`
      + ` (a worker's job runs again elsewhere ${info.lease_seconds} s after it stops answering)`
    : `embedded: this server runs its jobs itself (${info.jobs.queued} queued, ${info.jobs.running} running)`;
  const workers = $("cluster-workers");
  workers.innerHTML = "";
  workers.appendChild(cells("th", ["worker", "device", "can load", "holds", "job", "done", "seen"]));
  for (const w of info.workers) {
    workers.appendChild(cells("td", [w.name, w.device, w.models.join(", "), w.held.join(", "), w.job || "idle",
      w.jobs_done ?? "", w.seen ? `${Math.max(0, Math.round(now - w.seen))} s ago` : ""]));
  }
  const models = $("cluster-models");
  models.innerHTML = "";
  models.appendChild(cells("th", ["model", "queued", "running"]));
  for (const [name, c] of Object.entries(info.models || {})) models.appendChild(cells("td", [name, c.queued, c.running]));
  const failures = $("cluster-failures");
  failures.innerHTML = "";
  for (const f of info.failures) {
    const li = document.createElement("li");
    li.textContent = `${f.id} (${f.model}), ${Math.round(now - f.time)} s ago: ${f.error}`;
    failures.appendChild(li);
  }
}

showTab("txt2img");
loadSamplers().then(loadModelBadge).catch((err) => showError(err.message));
loadVaes().catch((err) => showError(err.message));
loadLoras().catch((err) => showError(err.message));
loadEmbeddings().catch((err) => showError(err.message));

// ---- ControlNet units: an image (uploaded or drawn), its preprocessor, a model, weight and step range
let controlModels = null;
let controlModules = null;
async function controlLists() {
  if (!controlModels) {
    // the extension's lists hold the IP-Adapters too (A1111 runs them as units); they have their own panel here
    const ip = new Set((await api("GET", "/api/v1/ip-adapters")).ip_adapters.map((a) => a.title));
    controlModels = (await api("GET", "/controlnet/model_list")).model_list.filter((m) => !ip.has(m));
    controlModules = (await api("GET", "/controlnet/module_list")).module_list.filter((m) => !m.startsWith("ip-adapter"));
  }
}
function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  return o;
}
async function addControlUnit() {
  await controlLists();
  const unit = document.createElement("fieldset");
  unit.className = "control-unit";
  unit.innerHTML = `
    <legend>Unit</legend>
    <div class="row">
      <canvas class="control-canvas" width="128" height="128" title="draw white strokes on black"></canvas>
      <img class="control-preview" alt="preprocessor output" hidden>
    </div>
    <div class="grid">
      <label>Image <input type="file" class="control-file" accept="image/*"></label>
      <label>Preprocessor <select class="control-module"></select></label>
      <label>Model <select class="control-model"></select></label>
      <label>Weight <input type="number" class="control-weight" step="0.05" value="1"></label>
      <label>Starting step (fraction) <input type="number" class="control-start" min="0" max="1" step="0.05" value="0"></label>
      <label>Ending step (fraction) <input type="number" class="control-end" min="0" max="1" step="0.05" value="1"></label>
      <label>Control mode <select class="control-mode">
        <option value="balanced">Balanced</option><option value="prompt">My prompt is more important</option>
        <option value="control">ControlNet is more important</option></select></label>
    </div>
    <div class="row">
      <button type="button" class="control-detect">Preview preprocessor</button>
      <button type="button" class="control-clear">Clear</button>
      <button type="button" class="control-remove">Remove unit</button>
    </div>`;
  const q = (cls) => unit.querySelector("." + cls);
  for (const m of controlModules) q("control-module").appendChild(option(m, m));
  q("control-model").appendChild(option("", "automatic (the one trained for the preprocessor)"));
  for (const m of controlModels) q("control-model").appendChild(option(m.split(" [")[0], m));
  const canvas = q("control-canvas");
  const ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, 128, 128); q("control-preview").hidden = true; };
  clear();
  unit.drawn = false;
  q("control-file").addEventListener("change", async (e) => {
    if (!e.target.files.length) return;
    const img = await loadImage(await fileToDataURL(e.target.files[0]));
    ctx.drawImage(img, 0, 0, 128, 128);
    unit.drawn = true;
  });
  let down = false;
  const stroke = (e) => {
    if (!down) return;
    const rect = canvas.getBoundingClientRect();
    ctx.fillStyle = "#fff";
    ctx.beginPath();
    ctx.arc((e.clientX - rect.left) * 128 / rect.width, (e.clientY - rect.top) * 128 / rect.height, 3, 0, 2 * Math.PI);
    ctx.fill();
    unit.drawn = true;
  };
  canvas.addEventListener("pointerdown", (e) => { down = true; stroke(e); });
  canvas.addEventListener("pointermove", stroke);
  window.addEventListener("pointerup", () => { down = false; });
  q("control-clear").addEventListener("click", () => { clear(); unit.drawn = false; });
  q("control-remove").addEventListener("click", () => { unit.remove(); countUnits(); });
  q("control-detect").addEventListener("click", async () => {
    showError(null);
    try {
      const r = await api("POST", "/controlnet/detect", {
        controlnet_module: q("control-module").value, controlnet_input_images: [canvas.toDataURL("image/png")],
      });
      q("control-preview").src = "data:image/png;base64," + r.images[0];
      q("control-preview").hidden = false;
    } catch (err) { showError(err.message); }
  });
  $("control-units").appendChild(unit);
  countUnits();
  return unit;
}
function countUnits() {
  $("control-count").textContent = document.querySelectorAll(".control-unit").length;
}
function controlUnits() {
  return [...document.querySelectorAll(".control-unit")].map((unit, i) => {
    const q = (cls) => unit.querySelector("." + cls);
    if (!unit.drawn && mode === "txt2img") throw new Error(`ControlNet unit ${i + 1} has no image: upload or draw one`);
    const number = (cls) => Number(q(cls).value);
    return {
      image: unit.drawn ? q("control-canvas").toDataURL("image/png") : null, module: q("control-module").value,
      model: q("control-model").value || null, weight: number("control-weight"), start: number("control-start"),
      end: number("control-end"), mode: q("control-mode").value,
    };
  });
}
$("add-control").addEventListener("click", () => addControlUnit().catch((err) => showError(err.message)));

// ---- image prompts (IP-Adapter)
let ipAdapters = null;
async function addImagePrompt() {
  if (!ipAdapters) ipAdapters = (await api("GET", "/api/v1/ip-adapters")).ip_adapters;
  const unit = document.createElement("fieldset");
  unit.className = "image-prompt-unit";
  unit.innerHTML = `
    <legend>Image prompt</legend>
    <img class="image-prompt-preview" alt="reference image" hidden>
    <div class="grid">
      <label>Image <input type="file" class="image-prompt-file" accept="image/*"></label>
      <label>Type <select class="image-prompt-type">
        <option value="content">content</option><option value="palette">palette</option>
        <option value="intensity">intensity</option></select></label>
      <label>IP-Adapter <select class="image-prompt-model"></select></label>
      <label>Scale <span class="image-prompt-scale-value">1</span>
        <input type="range" class="image-prompt-scale" min="0" max="1.5" step="0.05" value="1"></label>
    </div>
    <button type="button" class="image-prompt-remove">Remove</button>`;
  const q = (cls) => unit.querySelector("." + cls);
  q("image-prompt-model").appendChild(option("", "automatic (the first of the type that fits)"));
  for (const a of ipAdapters) q("image-prompt-model").appendChild(option(a.title.split(" [")[0], `${a.title} (${a.type})`));
  q("image-prompt-scale").addEventListener("input", () => {
    q("image-prompt-scale-value").textContent = q("image-prompt-scale").value;
  });
  q("image-prompt-file").addEventListener("change", async (e) => {
    if (!e.target.files[0]) return;
    unit.image = await fileToDataURL(e.target.files[0]);
    q("image-prompt-preview").src = unit.image;
    q("image-prompt-preview").hidden = false;
  });
  q("image-prompt-remove").addEventListener("click", () => { unit.remove(); countImagePrompts(); });
  $("image-prompt-units").appendChild(unit);
  countImagePrompts();
  return unit;
}
function countImagePrompts() {
  $("image-prompt-count").textContent = document.querySelectorAll(".image-prompt-unit").length;
}
function imagePromptUnits() {
  return [...document.querySelectorAll(".image-prompt-unit")].map((unit, i) => {
    const q = (cls) => unit.querySelector("." + cls);
    if (!unit.image) throw new Error(`image prompt ${i + 1} has no image: choose one`);
    return { image: unit.image, type: q("image-prompt-type").value, model: q("image-prompt-model").value || null,
             scale: Number(q("image-prompt-scale").value) };
  });
}
$("add-image-prompt").addEventListener("click", () => addImagePrompt().catch((err) => showError(err.message)));
$("variations-button").addEventListener("click", async () => {
  showError(null);
  try {
    const prompts = imagePromptUnits();
    if (!prompts.length) throw new Error("add an image prompt first: variations are drawn from its image");
    const number = (id) => ($(id).value === "" ? null : Number($(id).value));
    started(await api("POST", "/api/v1/variations", {
      image: prompts[0].image, scale: prompts[0].scale, ip_adapter: prompts[0].model, type: prompts[0].type,
      n: number("n") || 4,
      prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, seed: number("seed"),
      steps: number("steps"), sampler: $("sampler").value, cfg_scale: number("cfg_scale"),
    }));
  } catch (err) {
    showError(err.message);
  }
});

// ---- upscalers: hires fix's list (with Latent) and the Extras tab (POST /api/v1/upscale)
let upscalersLoaded = false;
async function loadUpscalers() {
  if (upscalersLoaded) return;
  const data = await api("GET", "/api/v1/upscalers");
  const fill = (select, names, keep) => {
    select.querySelectorAll("option:not([value=''])").forEach((o) => o.remove());
    names.forEach((n) => select.appendChild(option(n, n)));
    if (keep && names.includes(keep)) select.value = keep;
  };
  fill($("hires_upscaler"), [...data.hires_only, ...data.upscalers], "Lanczos");
  const sr = data.upscalers.find((n) => !["Lanczos", "Bicubic", "Bilinear", "Nearest"].includes(n));
  fill($("extras-upscaler"), data.upscalers, sr || "Lanczos");
  fill($("extras-upscaler-2"), data.upscalers, null);
  upscalersLoaded = true;
}
loadUpscalers().catch((err) => showError(err.message));

$("extras-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  showError(null);
  const files = [...$("extras-files").files];
  const status = $("extras-status");
  status.classList.remove("error");
  try {
    if (!files.length) throw new Error("choose one or more pictures to upscale");
    const number = (id) => ($(id).value === "" ? null : Number($(id).value));
    const images = await Promise.all(files.map(fileToDataURL));
    const body = {
      images, upscaler: $("extras-upscaler").value, prompt: $("extras-prompt").value, seed: number("extras-seed") || 0,
      sr_noise_level: number("extras-noise"), crop: $("extras-crop").checked, tile: number("extras-tile") || null,
    };
    if ($("extras-mode").value === "to") body.to = [number("extras-width"), number("extras-height")];
    else body.scale = number("extras-scale");
    if ($("extras-upscaler-2").value) {
      body.upscaler_2 = $("extras-upscaler-2").value;
      body.upscaler_2_visibility = number("extras-visibility");
    }
    $("extras-run").disabled = true;
    status.textContent = "upscaling " + files.length + " picture" + (files.length > 1 ? "s" : "") + "...";
    const data = await api("POST", "/api/v1/upscale", body);
    const gallery = $("extras-gallery");
    data.images.forEach((im, i) => {
      const figure = document.createElement("figure");
      figure.className = "result";
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + im.base64;
      img.alt = files[i] ? files[i].name : "upscaled";
      const link = document.createElement("a");
      link.href = img.src;
      link.download = (files[i] ? files[i].name.replace(/\.[^.]*$/, "") : "picture") + "-upscaled.png";
      link.textContent = "download";
      const caption = document.createElement("figcaption");
      caption.textContent = im.parameters;
      figure.append(img, link, caption);
      gallery.prepend(figure);
    });
    status.textContent = "done";
  } catch (err) {
    status.textContent = err.message;
    status.classList.add("error");
  } finally {
    $("extras-run").disabled = false;
  }
});
