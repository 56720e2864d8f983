// The page's whole logic: submit the form, follow the job's events, show the video, remember recent jobs.
"use strict";
const $ = (id) => document.getElementById(id);
const RECENT_KEY = "cinemo-rt.recent";
const MEANINGS = ["almost still", "a little motion", "medium motion", "a lot of motion", "the most motion"];

function headers() {
  const key = $("api-key").value || localStorage.getItem("cinemo-rt.key") || "";
  return key ? { Authorization: "Bearer " + key } : {};
}

function showBucket() {
  const value = Number($("bucket").value);
  $("bucket-value").textContent = value;
  $("bucket-meaning").textContent = MEANINGS[Math.min(4, Math.floor(value / 4))];
}

function pickImage(file) {
  if (!file) return;
  const transfer = new DataTransfer();
  transfer.items.add(file);
  $("image").files = transfer.files;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("drop-text").textContent = file.name;
}

function recentJobs() {
  try { return JSON.parse(localStorage.getItem(RECENT_KEY)) || []; } catch { return []; }
}

function remember(job) {
  const jobs = recentJobs().filter((j) => j.id !== job.id);
  const what = (job.kind === "edit" ? "edit: " : "") + job.request.prompt;
  jobs.unshift({ id: job.id, prompt: what, state: job.state, when: Date.now() });
  localStorage.setItem(RECENT_KEY, JSON.stringify(jobs.slice(0, 10)));
  showRecent();
}

function showRecent() {
  const list = $("recent");
  list.replaceChildren();
  for (const job of recentJobs()) {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = "#" + job.id;
    link.textContent = `${new Date(job.when).toLocaleString()}: "${job.prompt}" (${job.state})`;
    link.onclick = () => follow(job.id);
    item.append(link);
    list.append(item);
  }
}

function describe(job) {
  if (job.state === "queued") return `queued, position ${job.position ?? "?"}`;
  if (job.state === "running") return `denoising: step ${job.step} of ${job.total}`;
  if (job.state === "failed") return "failed: " + job.error;
  if (job.state === "done" && job.unet_calls) return `done (${job.unet_calls} UNet calls)`;
  return job.state;
}

async function showVideo(job) {
  const response = await fetch(job.urls.video, { headers: headers() });
  if (!response.ok) { $("status").textContent = "the video could not be fetched: " + response.status; return; }
  const url = URL.createObjectURL(await response.blob());
  const isGif = job.request.format === "gif";
  $("video").hidden = isGif;
  $("gif").hidden = !isGif;
  if (isGif) { $("gif").src = url; } else { $("video").src = url; }
  $("download").href = url;
  $("download").download = `cinemo-${job.id}.${job.request.format}`;
  $("download").hidden = false;
}

function showWarnings(job) {
  const list = $("warnings");
  list.replaceChildren();
  for (const text of job.warnings || []) {
    const item = document.createElement("li");
    item.textContent = text;
    list.append(item);
  }
  list.hidden = !list.children.length;
}

function update(job) {
  $("status").textContent = describe(job);
  showWarnings(job);
  $("status").className = job.state === "failed" ? "failed" : "";
  if (job.total) $("progress").max = job.total;  // final states carry no step counts: keep the last
  $("progress").value = job.state === "done" ? $("progress").max : (job.step || 0);
  remember(job);
}

// Server-sent events read with fetch (EventSource cannot send the API key header).
async function follow(id) {
  $("job").hidden = false;
  for (const el of ["video", "gif", "download", "warnings"]) $(el).hidden = true;
  $("progress").value = 0;
  const response = await fetch(`/v1/animations/${id}/events`, { headers: headers() });
  if (!response.ok) { $("status").textContent = (await response.json()).detail; return; }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", job = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const message = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = message.split("\n").find((line) => line.startsWith("data: "));
      if (data) { job = JSON.parse(data.slice(6)); update(job); }
    }
  }
  if (job && job.state === "done") await showVideo(job);
}

// The model's facts (GET /v1/model): its size, frames, closed vocabulary and training, above the form.
async function showModel() {
  const response = await fetch("/v1/model", { headers: headers() });
  if (response.status === 503) { setTimeout(showModel, 2000); return; }  // still loading: ask again
  if (!response.ok) return;  // a key needed (401): the page works without the facts
  const m = await response.json();
  const size = `${m.width}x${m.height} pixels, ${m.video_frames} frames (the input image, then ${m.frames})`;
  $("model-summary").textContent = `Model: ${m.name}, videos of ${size}` +
    (m.parameters ? `, ${(m.parameters / 1e6).toFixed(1)} M UNet parameters.` : ".");
  if (m.vocabulary) {
    $("model-vocabulary").textContent = "It knows only these words (others are ignored): " +
      m.vocabulary.filter((w) => w.length > 1).join(", ");
    $("model-vocabulary").hidden = false;
  }
  if (m.trained_on) {
    $("model-training").textContent = "Trained on " + m.trained_on + ".";
    $("model-training").hidden = false;
  }
  $("model").hidden = false;
}

function refused(status, body) {
  $("job").hidden = false;
  for (const el of ["video", "gif", "download", "warnings"]) $(el).hidden = true;
  const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  $("status").textContent = `refused (${status}): ${detail}`;
  $("status").className = "failed";
}

async function submitEdit(event) {
  event.preventDefault();
  const form = new FormData($("edit-form"));
  for (const [name, value] of [...form.entries()]) {
    if (value === "" || (value instanceof File && !value.name)) form.delete(name);
  }
  await postJob("/v1/edits", form, $("edit-submit"));
}

// One job submission for both forms: the button is off while it is sent and followed.
async function postJob(url, form, button) {
  button.disabled = true;
  try {
    const response = await fetch(url, { method: "POST", body: form, headers: headers() });
    const body = await response.json();
    if (!response.ok) { refused(response.status, body); return; }
    remember(body);
    await follow(body.id);
  } finally {
    button.disabled = false;
  }
}

async function submit(event) {
  event.preventDefault();
  const form = new FormData($("form"));
  for (const [name, value] of [...form.entries()]) if (value === "") form.delete(name);
  if ($("api-key").value) localStorage.setItem("cinemo-rt.key", $("api-key").value);
  await postJob("/v1/animations", form, $("submit"));
}

// Fast leaves steps and sampler to the server's preset (disabled fields are not sent).
function showFast() {
  for (const name of ["steps", "sampler"]) document.querySelector(`[name=${name}]`).disabled = $("fast").checked;
}

$("bucket").addEventListener("input", showBucket);
$("fast").addEventListener("change", showFast);
$("image").addEventListener("change", () => pickImage($("image").files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pickImage(e.dataTransfer.files[0]); });
$("form").addEventListener("submit", submit);
$("edit-form").addEventListener("submit", submitEdit);
showBucket();
showModel();
showFast();
showRecent();
