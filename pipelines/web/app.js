// The sora web page: a form for POST jobs, live progress over server-sent events, the
// result, and a gallery of this browser's recent results kept in IndexedDB.
// Plain browser JavaScript, no libraries, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
// Relative to the page, so the app works under any route prefix.
const apiUrl = (path) => new URL(path, document.baseURI).href;
const jobUrl = (id, tail = "") => apiUrl(`jobs/${encodeURIComponent(id)}${tail}`);

const INTEGER_FIELDS = ["seed", "num_frames", "height", "width", "num_sampling_steps", "loop", "condition_frame_length"];
const NUMBER_FIELDS = [...INTEGER_FIELDS, "cfg_scale", "time_limit_s"];
const TERMINAL = new Set(["done", "failed", "cancelled"]);
const GALLERY_SIZE = 12;
// Seeds go out as JSON numbers; past 2^53 - 1 JavaScript would silently round them.
const MAX_SEED = Number.MAX_SAFE_INTEGER;

const state = {
  limits: {},
  fps: null,
  references: [], // {name, type, base64, url}
  job: null, // {id, seed, request, source, timer, finished}
  resultUrl: null,
  galleryUrls: [],
};

// Builds an element: el("a", {href, textContent}, child...).
function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

// fetch + JSON; a non-2xx answer throws an Error carrying the server's message and field.
async function fetchJson(url, options) {
  const response = await fetch(url, options);
  const answer = await response.json().catch(() => ({}));
  if (response.ok) return answer;
  const error = new Error(answer.error || `the server answered ${response.status} ${response.statusText}`);
  if (response.status === 503) error.message = `busy, retry in ${response.headers.get("Retry-After") || "a few"} s`;
  Object.assign(error, { status: response.status, field: answer.field });
  throw error;
}

// ------------------------------------------------------------------ the form

async function loadApi() {
  try {
    const api = await fetchJson(apiUrl("api"));
    state.limits = api.limits || {};
    state.fps = api.fps || null;
    fillForm(api.fields || {});
    applyLimits(state.limits);
    const named = ["model", "checkpoint", "scheduler"].filter((key) => api[key]).map((key) => `${key} ${api[key]}`);
    $("model-info").textContent = [...named, api.fps && `${api.fps} fps`].filter(Boolean).join(" · ");
    if (api.mask_strategy) $("mask-format").textContent = `The server's format: ${api.mask_strategy}`;
  } catch (error) {
    $("model-info").textContent = "model info unavailable";
    showError(`could not read the server's description (api): ${error.message}`);
  }
  updateVideoLength();
}

// Fills the form from request fields: the api's defaults, or a gallery item's request.
function fillForm(fields) {
  if (typeof fields.prompt === "string" && fields.prompt !== "required") $("prompt").value = fields.prompt;
  if (Array.isArray(fields.image_size)) [$("height").value, $("width").value] = fields.image_size;
  for (const name of NUMBER_FIELDS) {
    if (typeof fields[name] === "number") $(name).value = fields[name];
  }
  $("mask_strategy").value = typeof fields.mask_strategy === "string" ? fields.mask_strategy : "";
  updatePromptCount();
  updateVideoLength();
}

// min/max attributes for the light checks, and the ranges shown beside the fields.
function applyLimits(limits) {
  const side = limits.max_pixels ? Math.floor(limits.max_pixels / 16) : undefined;
  const ranges = {
    seed: [0, MAX_SEED],
    num_frames: [1, limits.max_num_frames],
    height: [16, side],
    width: [16, side],
    num_sampling_steps: [1, limits.max_sampling_steps],
    cfg_scale: [0, limits.max_cfg_scale],
    loop: [1, limits.max_loop],
    time_limit_s: [1, limits.max_time_limit_s],
  };
  for (const [name, [low, high]] of Object.entries(ranges)) {
    $(name).min = low;
    if (high !== undefined) $(name).max = high;
    $(`limit-${name}`).textContent = high !== undefined ? `${low}–${high}` : `≥ ${low}`;
  }
  $("limit-seed").textContent = "0–2⁵³−1";
  if (limits.max_prompt_chars) $("prompt").maxLength = limits.max_prompt_chars;
  if (limits.max_pixels) $("limit-image_size").textContent = `height × width ≤ ${limits.max_pixels} pixels`;
  if (limits.max_total_frames) $("limit-loop").textContent += `; clips × frames ≤ ${limits.max_total_frames}`;
  // Base64 makes each file a third larger inside the JSON body.
  const megabytes = limits.max_body_bytes && Math.floor((limits.max_body_bytes * 3) / 4 / 2 ** 20);
  $("limit-reference").textContent = [limits.max_references && `up to ${limits.max_references} files`,
    megabytes && `about ${megabytes} MiB in all`].filter(Boolean).join(", ");
  updatePromptCount();
}

function updatePromptCount() {
  const max = state.limits.max_prompt_chars;
  $("limit-prompt").textContent = max ? `${$("prompt").value.length}/${max} characters` : "";
}

// The seed's long-video formula: consecutive clips share the carried frames.
function updateVideoLength() {
  const frames = Number($("num_frames").value), loop = Number($("loop").value) || 1;
  const carried = loop > 1 ? Number($("condition_frame_length").value) || 0 : 0;
  if (!frames) return;
  $("limit-condition_frame_length").textContent = `0–${frames - 1}; used from the second clip on`;
  const total = loop * (frames - carried) + carried;
  const seconds = state.fps ? `, ${(total / state.fps).toFixed(1)} s at ${state.fps} fps` : "";
  $("video-length").textContent = `The video: ${total} frames${seconds}.`;
}

// ------------------------------------------------------------------ errors

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function clearErrors() {
  showError("");
  document.querySelectorAll(".field-error").forEach((node) => (node.textContent = ""));
  document.querySelectorAll(".invalid").forEach((node) => node.classList.remove("invalid"));
}

// The server names a field ("image_size", "reference[1]"); height and width share one message.
function showFieldError(field, message) {
  let key = String(field || "").replace(/\[\d+\]$/, "");
  if (key === "height" || key === "width") key = "image_size";
  const box = $(`error-${key}`);
  if (!box) return showError(message);
  box.textContent = message;
  const inputs = { image_size: ["height", "width"], reference: ["drop-zone"] }[key] || [key];
  inputs.forEach((id) => $(id).classList.add("invalid"));
}

// ------------------------------------------------------------------ references

async function addFiles(files) {
  const max = state.limits.max_references || Infinity;
  for (const file of files) {
    if (state.references.length >= max) {
      showFieldError("reference", `at most ${max} reference files`);
      break;
    }
    // Some systems give no type for a video container; only a known other type is refused.
    if (file.type && !/^(image|video)\//.test(file.type)) {
      showFieldError("reference", `${file.name}: not an image or a video`);
      continue;
    }
    const dataUrl = await readAsDataUrl(file);
    state.references.push({
      name: file.name,
      type: file.type,
      base64: dataUrl.slice(dataUrl.indexOf(",") + 1), // the server wants bare base64, no "data:" prefix
      url: URL.createObjectURL(file),
    });
  }
  renderReferences();
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = Object.assign(new FileReader(), { onload: () => resolve(reader.result), onerror: () => reject(reader.error) });
    reader.readAsDataURL(file);
  });
}

function renderReferences() {
  $("reference-preview").replaceChildren(...state.references.map((ref, index) => {
    const media = ref.type.startsWith("image/")
      ? el("img", { src: ref.url, alt: ref.name })
      : el("video", { src: ref.url, muted: true, loop: true, autoplay: true, playsInline: true });
    const remove = el("button", { type: "button", className: "remove", textContent: "×", title: `remove ${ref.name}` });
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(ref.url);
      state.references.splice(index, 1);
      renderReferences();
    });
    // The caption gives the index that the mask strategy's first number refers to.
    return el("figure", { className: "reference-item" }, media, el("figcaption", { textContent: `${index}: ${ref.name}` }), remove);
  }));
}

function setUpDropZone() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault(); // without it the browser opens the dropped file itself
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    addFiles([...event.dataTransfer.files]);
  });
  $("reference").addEventListener("change", async (event) => {
    await addFiles([...event.target.files]);
    event.target.value = ""; // so that choosing the same file again fires "change" again
  });
}

// ------------------------------------------------------------------ submitting

// Sends only what has a value; the server fills in the rest from its config.
function buildRequest() {
  const body = { prompt: $("prompt").value };
  for (const name of NUMBER_FIELDS) {
    if (name !== "height" && name !== "width" && $(name).value !== "") body[name] = Number($(name).value);
  }
  if ($("height").value !== "" && $("width").value !== "") {
    body.image_size = [Number($("height").value), Number($("width").value)];
  }
  // Carried frames matter from the second clip on only: a one-clip request leaves them out,
  // so that a short clip is never refused over them.
  if ((body.loop || 1) === 1) delete body.condition_frame_length;
  const strategy = $("mask_strategy").value.trim();
  if (strategy) body.mask_strategy = strategy;
  if (state.references.length) body.reference = state.references.map((ref) => ref.base64);
  return body;
}

// Light checks, so that obvious slips are caught before an upload. The server checks fully,
// the mask strategy included: its messages name the tuple and the number at fault.
function validate(body) {
  const problems = [];
  if (!body.prompt.trim()) problems.push(["prompt", "a prompt is required"]);
  // The inputs' min, max and step attributes (set from the limits) do the range checks.
  for (const name of NUMBER_FIELDS.filter((name) => !$(name).validity.valid)) {
    const kind = INTEGER_FIELDS.includes(name) ? "a whole number" : "a number";
    problems.push([name, `${name}: must be ${kind} from ${$(name).min || "-∞"} to ${$(name).max || "∞"}`]);
  }
  const { max_pixels, max_total_frames, max_body_bytes } = state.limits;
  const [height, width] = body.image_size || [];
  if (max_pixels && height * width > max_pixels) {
    problems.push(["image_size", `${height}×${width} is ${height * width} pixels; the limit is ${max_pixels}`]);
  }
  const clips = body.loop || 1, frames = body.num_frames;
  if (max_total_frames && frames && clips * frames > max_total_frames) {
    problems.push(["loop", `${clips} clips × ${frames} frames; the limit is ${max_total_frames} frames in all`]);
  }
  if (clips > 1 && frames && body.condition_frame_length >= frames) {
    problems.push(["condition_frame_length", "must be fewer than the frames per clip"]);
  }
  const bytes = JSON.stringify(body).length;
  if (max_body_bytes && bytes > max_body_bytes) {
    problems.push(["reference", `the files are too large together (${(bytes / 2 ** 20).toFixed(1)} MiB encoded)`]);
  }
  return problems;
}

async function submit(event) {
  event.preventDefault();
  if (state.job) return; // one job at a time
  clearErrors();
  const body = buildRequest();
  const problems = validate(body);
  if (problems.length) return problems.forEach(([field, message]) => showFieldError(field, message));
  setBusy(true);
  setStatus("submitting…");
  try {
    const answer = await fetchJson(apiUrl("jobs"), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const { reference, ...request } = body; // the gallery keeps the settings, not the uploads
    state.job = { id: answer.id, seed: body.seed ?? answer.seed, request, finished: false };
    $("progress").value = 0;
    // Stacked on a narrow screen, the progress is below the form: bring it into view.
    if (matchMedia("(max-width: 899px)").matches) $("progress").scrollIntoView({ behavior: "smooth" });
    update(answer);
    watch(state.job);
  } catch (error) {
    setBusy(false);
    setStatus("ready");
    if (error.field) showFieldError(error.field, error.message);
    else showError(error.message);
  }
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
}

const setStatus = (text) => ($("status").textContent = text);

// ------------------------------------------------------------------ following a job

// Server-sent events bring one update per diffusion step; if they fail, poll instead.
function watch(job) {
  if (!window.EventSource) return poll(job);
  job.source = new EventSource(jobUrl(job.id, "/events"));
  job.source.onmessage = (event) => update(JSON.parse(event.data));
  job.source.onerror = () => {
    job.source.close(); // EventSource would otherwise reconnect on its own, forever
    if (!job.finished) poll(job);
  };
}

async function poll(job) {
  if (job.finished) return;
  try {
    update(await fetchJson(jobUrl(job.id)));
  } catch (error) {
    // A job the server no longer knows will not come back; anything else may pass.
    if (error.status === 404) return update({ id: job.id, status: "failed", error: error.message });
    setStatus(`connection trouble (${error.message}); retrying`);
  }
  if (!job.finished) job.timer = setTimeout(() => poll(job), 1000);
}

function update(info) {
  const job = state.job;
  if (!job || job.finished || info.id !== job.id) return;
  if (info.seed !== undefined) job.seed = info.seed;
  if (info.total_steps) {
    $("progress").max = info.total_steps;
    $("progress").value = info.status === "done" ? info.total_steps : info.step || 0;
  }
  setStatus(describe(info));
  if (TERMINAL.has(info.status)) finish(job, info);
}

function describe(info) {
  switch (info.status) {
    case "queued":
      return `queued (${info.position ?? 0} ahead)`;
    case "running": {
      const parts = [];
      if (info.loops > 1) parts.push(`clip ${info.clip} of ${info.loops}`);
      if (info.total_steps) parts.push(`step ${info.step}/${info.total_steps}`);
      if (info.elapsed_s != null) parts.push(`${info.elapsed_s.toFixed(1)} s elapsed`);
      if (info.eta_s != null) parts.push(`about ${Math.round(info.eta_s)} s left`);
      return parts.join(", ") || "running";
    }
    case "done":
      return "fetching the video…"; // "done" once it is here, so the page never says done without one
    case "failed":
      return `failed: ${info.error || "unknown error"}`;
    default:
      return info.status; // "cancelled"
  }
}

async function finish(job, info) {
  job.finished = true;
  if (job.source) job.source.close();
  clearTimeout(job.timer);
  state.job = null;
  setBusy(false);
  if (info.status !== "done") return;
  let video;
  try {
    const response = await fetch(jobUrl(job.id, "/video"));
    if (!response.ok) throw new Error(`the server answered ${response.status} ${response.statusText}`);
    video = await response.blob();
  } catch (error) {
    setStatus("done, but the video could not be fetched");
    return showError(`the video could not be fetched: ${error.message}`);
  }
  showResult(video, job.seed);
  setStatus("done");
  const { prompt } = job.request;
  saveToGallery({ video, prompt, seed: job.seed, request: job.request, created: Date.now() })
    .catch((error) => showError(`the result could not be kept in the gallery: ${error && error.message}`));
}

async function cancel() {
  const job = state.job;
  if (!job) return;
  $("cancel").disabled = true;
  try {
    update(await fetchJson(jobUrl(job.id), { method: "DELETE" }));
  } catch (error) {
    showError(`cancel failed: ${error.message}`);
    $("cancel").disabled = !state.job;
  }
}

function showResult(blob, seed) {
  // A Blob URL, not the server's: the same Blob goes into the gallery and outlives the job.
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.resultUrl = URL.createObjectURL(blob);
  $("result-video").src = state.resultUrl;
  Object.assign($("download"), { href: state.resultUrl, download: `sora-${seed}.mp4`, hidden: false });
}

// ------------------------------------------------------------------ gallery (IndexedDB)

let database = null;
function openDatabase() {
  database ??= new Promise((resolve, reject) => {
    const request = indexedDB.open("sora-gallery", 1);
    request.onupgradeneeded = () => request.result.createObjectStore("results", { keyPath: "key", autoIncrement: true });
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  return database;
}

// Runs `work(store)` in one transaction; resolves with its request's result once committed.
async function withStore(mode, work) {
  const db = await openDatabase();
  return new Promise((resolve, reject) => {
    const transaction = db.transaction("results", mode);
    const request = work(transaction.objectStore("results"));
    transaction.oncomplete = () => resolve(request && request.result);
    transaction.onerror = transaction.onabort = () => reject(transaction.error);
  });
}

async function saveToGallery(record) {
  await withStore("readwrite", (store) => store.add(record));
  // Keys grow with each result, so the smallest ones are the oldest.
  const keys = await withStore("readonly", (store) => store.getAllKeys());
  const stale = keys.sort((a, b) => a - b).slice(0, Math.max(0, keys.length - GALLERY_SIZE));
  if (stale.length) await withStore("readwrite", (store) => stale.forEach((key) => store.delete(key)));
  await renderGallery();
}

async function renderGallery() {
  let records;
  try {
    records = await withStore("readonly", (store) => store.getAll());
  } catch (error) {
    $("gallery-empty").textContent = `The gallery is unavailable in this browser (${error && error.message}).`;
    return;
  }
  state.galleryUrls.forEach((url) => URL.revokeObjectURL(url));
  state.galleryUrls = [];
  records.sort((a, b) => b.key - a.key); // newest first
  $("gallery").replaceChildren(...records.map(galleryItem));
  $("gallery-empty").hidden = records.length > 0;
}

function galleryItem(record) {
  const url = URL.createObjectURL(record.video);
  state.galleryUrls.push(url);
  const size = record.request.image_size ? `, ${record.request.image_size.join("×")}` : "";
  const reuse = el("button", { type: "button", className: "use-settings", textContent: "use these settings" });
  reuse.addEventListener("click", () => {
    fillForm({ ...record.request, seed: record.seed });
    $("form").scrollIntoView({ behavior: "smooth" });
  });
  return el("article", { className: "gallery-item" },
    el("video", { src: url, controls: true, muted: true, loop: true, playsInline: true, preload: "metadata" }),
    el("p", { className: "gallery-prompt", textContent: record.prompt }),
    el("p", { className: "gallery-meta muted", textContent: `seed ${record.seed}${size}, ${new Date(record.created).toLocaleString()}` }),
    el("div", { className: "gallery-actions" },
      el("a", { href: url, download: `sora-${record.seed}.mp4`, textContent: "download" }), reuse));
}

async function clearGallery() {
  try {
    await withStore("readwrite", (store) => store.clear());
  } catch (error) {
    showError(`could not clear the gallery: ${error && error.message}`);
  }
  await renderGallery();
}

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("random-seed").addEventListener("click", () => ($("seed").value = crypto.getRandomValues(new Uint32Array(1))[0]));
  $("clear-gallery").addEventListener("click", clearGallery);
  $("prompt").addEventListener("input", updatePromptCount);
  ["num_frames", "loop", "condition_frame_length"].forEach((id) => $(id).addEventListener("input", updateVideoLength));
  setUpDropZone();
  loadApi();
  renderGallery();
});
