// The edge-imagegen page: a form over the native API (/api/...), progress over Server-Sent Events.
// No framework and no network beyond the device: it must work on a kiosk with no internet.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const kiosk = params.get("kiosk") === "1";
let token = params.get("token") || localStorage.getItem("edge-token") || "";
let config = null;
let current = null; // {id, source: EventSource}
let idleTimer = null;

function withToken(url) {
  if (!token) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
}

async function api(method, path, body) {
  const headers = {"Content-Type": "application/json"};
  if (token) headers.Authorization = "Bearer " + token;
  const resp = await fetch(path, {method, headers, body: body ? JSON.stringify(body) : undefined});
  const data = await resp.json().catch(() => ({status: "error", error: resp.statusText}));
  if (resp.status === 401) {
    $("token-box").hidden = false;
    $("token").focus();
  }
  return {status: resp.status, data};
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// --- the form --------------------------------------------------------------------------------------
function fillForm(c) {
  const d = c.defaults, l = c.limits;
  $("model").textContent = c.model;
  $("negative_prompt").value = d.negative_prompt;
  $("steps").value = d.steps; $("steps").max = l.max_steps;
  $("guidance").value = d.guidance; $("guidance").min = l.min_guidance; $("guidance").max = l.max_guidance;
  $("count").value = d.count; $("count").max = l.max_count;
  const sched = $("scheduler");
  sched.replaceChildren(new Option("Model default", ""), ...c.schedulers.map((n) => new Option(n, n)));
  if (d.scheduler) sched.value = d.scheduler;
  const [w, h] = c.size;
  const sizes = c.fixed_size ? [[w, h]] : [[w, h], [w * 3 / 4, h], [w, h * 3 / 4], [w / 2, h / 2]];
  $("size").replaceChildren(...sizes.map(([sw, sh]) => new Option(`${sw} × ${sh}`, `${sw}x${sh}`)));
  $("size").disabled = c.fixed_size;
  $("size").title = c.fixed_size ? "This model makes one size only" : "";
  const examples = $("examples");
  examples.replaceChildren(...c.examples.map((text) => {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = text;
    b.addEventListener("click", () => { $("prompt").value = text; $("prompt").focus(); });
    return b;
  }));
  examples.hidden = !c.examples.length;
}

function readForm() {
  const job = {prompt: $("prompt").value.trim()};
  if (!kiosk) {
    job.negative_prompt = $("negative_prompt").value;
    job.steps = Number($("steps").value);
    job.guidance = Number($("guidance").value);
    job.count = Number($("count").value);
    job.seed = Number($("seed").value);
    if ($("scheduler").value) job.scheduler = $("scheduler").value;
    const [w, h] = $("size").value.split("x").map(Number);
    if (!config.fixed_size) { job.width = w; job.height = h; }
  }
  return job;
}

function reuse(job) {
  $("prompt").value = job.prompt;
  $("negative_prompt").value = job.negative_prompt;
  $("steps").value = job.steps; $("guidance").value = job.guidance;
  $("count").value = job.count; $("seed").value = job.seed;
  $("scheduler").value = job.scheduler || "";
  if (job.width && job.height) $("size").value = `${job.width}x${job.height}`;
  window.scrollTo(0, 0);
  $("prompt").focus();
}

// --- a job -----------------------------------------------------------------------------------------
async function generate(event) {
  event.preventDefault();
  if (current) return;
  showError("");
  const job = readForm();
  if (!job.prompt) { showError("prompt: please type what the picture should show"); $("prompt").focus(); return; }
  $("generate").disabled = true;
  const {status, data} = await api("POST", "/api/jobs", job);
  if (status !== 202 && status !== 200) {
    $("generate").disabled = false;
    showError(data.error || `error ${status}`);
    return;
  }
  watch(data.id);
}

function setProgress(text, fraction) {
  $("progress-text").textContent = text;
  const pct = Math.round(fraction * 100);
  $("bar-fill").style.width = pct + "%";
  document.querySelector(".bar").setAttribute("aria-valuenow", String(pct));
}

function watch(id) {
  $("result").hidden = true;
  $("progress").hidden = false;
  $("preview").hidden = true;
  document.body.classList.add("busy");
  setProgress("Sent…", 0);
  const source = new EventSource(withToken(`/api/jobs/${id}/events`));
  current = {id, source};
  source.addEventListener("queued", (e) => {
    const d = JSON.parse(e.data);
    setProgress(d.position ? `Queued: ${d.position} job${d.position > 1 ? "s" : ""} ahead` : "Queued: next", 0);
  });
  source.addEventListener("started", () => setProgress("Starting…", 0));
  source.addEventListener("progress", (e) => {
    const d = JSON.parse(e.data);
    const done = ((d.image - 1) * d.steps + d.step) / (d.count * d.steps);
    const which = d.count > 1 ? ` of image ${d.image} of ${d.count}` : "";
    setProgress(`Step ${d.step} of ${d.steps}${which}`, done);
    if (d.preview) { $("preview").src = d.preview; $("preview").hidden = false; }
  });
  source.addEventListener("result", (e) => { finish(); showResult(JSON.parse(e.data)); loadHistory(); });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) { finish(); showError("lost the connection to the device"); }
  };
}

function finish() {
  if (current) current.source.close();
  current = null;
  $("progress").hidden = true;
  $("generate").disabled = false;
  document.body.classList.remove("busy");
}

async function cancel() {
  if (!current) return;
  setProgress("Cancelling…", 0);
  await api("DELETE", `/api/jobs/${current.id}`);
}

function showResult(r) {
  if (r.status !== "ok") { showError(r.error || r.state); return; }
  $("result").hidden = false;
  document.body.classList.add("has-result");
  // e.g. a prompt the model cannot read (most of its words unknown): the job ran, but say so
  const warnings = r.warnings || [];
  $("result-warnings").textContent = warnings.join("\n");
  $("result-warnings").hidden = !warnings.length;
  const images = r.images || [];
  $("result-image").src = withToken(images[0]);
  $("result-download").href = withToken(images[0] + "?download=1");
  $("result-more").replaceChildren(...images.map((url, i) => {
    const img = document.createElement("img");
    img.src = withToken(url); img.alt = `Image ${i + 1} (seed ${r.seeds[i]})`; img.tabIndex = 0;
    img.addEventListener("click", () => { $("result-image").src = img.src; });
    return img;
  }));
  $("result-more").hidden = images.length < 2;
  api("GET", `/api/jobs/${r.id}`).then(({data}) => {
    const j = data.job.job;
    const rows = [["Prompt", j.prompt], ["Negative prompt", j.negative_prompt || "—"], ["Seed", r.seeds.join(", ")],
      ["Steps", j.steps], ["Guidance", j.guidance], ["Scheduler", j.scheduler || "model default"],
      ["Time", `${r.timings.total.toFixed(1)} s`]];
    $("result-params").replaceChildren(...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k; dd.textContent = String(v);
      return [dt, dd];
    }));
  });
  $("result-image").focus();
}

// --- the history -----------------------------------------------------------------------------------
async function loadHistory() {
  const {status, data} = await api("GET", "/api/jobs?limit=24");
  if (status !== 200) return;
  const done = data.jobs.filter((j) => j.state === "done" && j.images && j.images.length);
  $("history").replaceChildren(...done.map((j) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = withToken(j.images[0]); img.alt = j.prompt; img.loading = "lazy";
    const caption = document.createElement("span");
    caption.textContent = j.prompt;
    const again = document.createElement("button");
    again.type = "button"; again.textContent = "Reuse"; again.setAttribute("aria-label", `Reuse the settings of “${j.prompt}”`);
    again.addEventListener("click", () => reuse(j.job));
    const down = document.createElement("a");
    down.className = "button"; down.textContent = "Download"; down.href = withToken(j.images[0] + "?download=1");
    li.append(img, caption, again, down);
    return li;
  }));
  const all = $("download-all");
  all.hidden = !done.length;
  all.href = withToken("/api/images.zip?" + done.map((j) => "id=" + encodeURIComponent(j.id)).join("&"));
}

// --- kiosk mode: large targets, no advanced fields, back to the start after a while ----------------
function resetToStart() {
  if (current) return;
  $("prompt").value = "";
  $("result").hidden = true;
  document.body.classList.remove("has-result");
  showError("");
  window.scrollTo(0, 0);
}

function touched() {
  clearTimeout(idleTimer);
  if (kiosk && config) idleTimer = setTimeout(resetToStart, config.kiosk_idle_seconds * 1000);
}

// --- start -----------------------------------------------------------------------------------------
async function start() {
  if (kiosk) document.body.classList.add("kiosk");
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("again").addEventListener("click", () => {
    $("result").hidden = true;
    document.body.classList.remove("has-result");
    if (kiosk) $("prompt").value = "";
    $("prompt").focus();
  });
  $("random-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 32); });
  document.querySelectorAll(".presets button").forEach((b) => b.addEventListener("click", () => {
    $("steps").value = Math.min(Number(b.dataset.steps), config.limits.max_steps);
    $("guidance").value = b.dataset.guidance;
  }));
  $("token-save").addEventListener("click", () => {
    token = $("token").value.trim();
    localStorage.setItem("edge-token", token);
    location.reload();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey || kiosk)) { e.preventDefault(); $("form").requestSubmit(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") cancel(); });
  ["pointerdown", "keydown", "touchstart"].forEach((t) => document.addEventListener(t, touched, {passive: true}));
  const {status, data} = await api("GET", "/api/config");
  if (status !== 200) { showError(data.error); return; }
  config = data;
  fillForm(config);
  touched();
  loadHistory();
  $("prompt").focus();
}

start();
