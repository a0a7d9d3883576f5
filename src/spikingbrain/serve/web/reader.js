// The reader page: upload documents, follow their reading, ask questions with streamed answers.
// Talks only to its own origin (/v1/...); sends the API key the user entered, if any.
"use strict";

const $ = (id) => document.getElementById(id);
const docs = new Map(); // id -> {info, messages: [{role, text, meta}]}
let current = null;
const ANSWER_TOKENS = 128; // greedy answers of small models can loop: cut them here
let key = sessionStorage.getItem("spikingbrain-key") || "";

function headers(extra = {}) {
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function failure(response) {
  let message = response.status + " " + response.statusText;
  try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("key").focus();
    message += " (enter the server's API key above)";
  }
  return new Error(message);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!response.ok) throw await failure(response);
  return response;
}

// Server-sent events of a fetch response (EventSource cannot send the API key).
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

const count = (n) => Number(n).toLocaleString("en-US");
const seconds = (s) => (s === null || s === undefined ? "–" : s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s");

async function loadModels() {
  const models = (await (await api("/v1/models")).json()).data;
  $("model").replaceChildren(...models.map((m) => new Option(m.id, m.id)));
}

function renderList() {
  const items = [...docs.values()].map(({ info }) => {
    const li = document.createElement("li");
    li.dataset.id = info.id;
    li.className = info.id === current ? "current" : "";
    const name = document.createElement("span");
    name.textContent = info.name;
    const state = document.createElement("span");
    state.className = "state";
    state.textContent = info.state === "ready" ? count(info.tokens) + " tok" : info.state;
    li.append(name, state);
    li.onclick = () => select(info.id);
    return li;
  });
  $("documents").replaceChildren(...items);
}

function renderReading(info) {
  const reading = info && info.state === "reading";
  $("reading").hidden = !reading;
  if (!info) return;
  const share = info.tokens ? info.tokens_read / info.tokens : 0;
  $("bar-fill").style.width = (100 * share).toFixed(1) + "%";
  const left = info.seconds_left === null ? "" : ", " + seconds(info.seconds_left) + " left";
  $("reading-text").textContent = reading
    ? `reading ${info.name}: ${count(info.tokens_read)} of ${count(info.tokens)} tokens, ${count(Math.round(info.tokens_per_second))} tokens/s${left}`
    : "";
  const ready = info.state === "ready";
  $("question").disabled = $("ask").disabled = !ready;
}

function renderMessages() {
  const entry = docs.get(current);
  const box = $("messages");
  if (!entry) { box.innerHTML = '<p class="empty">Open a document, then ask about it.</p>'; return; }
  const parts = [];
  const info = entry.info;
  const status = document.createElement("p");
  status.className = "hint";
  status.id = "document-status";
  status.textContent = info.state === "ready"
    ? `${info.name}: ${count(info.tokens)} tokens read in ${seconds(info.seconds)} (${count(Math.round(info.tokens_per_second))} tokens/s); its state is kept for every question.`
    : info.state === "failed" ? `${info.name}: reading failed: ${info.error && info.error.message}` : `${info.name}: ${info.state}`;
  parts.push(status);
  for (const m of entry.messages) {
    const div = document.createElement("div");
    div.className = "message " + m.role;
    div.textContent = m.text;
    if (m.meta) {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = m.meta;
      div.append(meta);
    }
    parts.push(div);
  }
  box.replaceChildren(...parts);
  box.scrollTop = box.scrollHeight;
}

function renderPanel() {
  const entry = docs.get(current);
  const info = entry && entry.info;
  const answer = info && info.last_answer;
  $("ttft").textContent = answer ? seconds(answer.ttft_seconds) : "–";
  $("reread").textContent = answer ? count(answer.document_tokens_reread) : "–";
  $("speed").textContent = answer && answer.decode_tokens_per_second ? answer.decode_tokens_per_second.toFixed(1) + " tokens/s" : "–";
  $("state-size").textContent = info ? bytes(info.state_bytes) : "–";
  $("kv-size").textContent = info ? bytes(info.transformer_kv_bytes) : "–";
  const bars = $("memory-bars");
  bars.replaceChildren();
  $("memory-note").textContent = "";
  if (info && info.state_bytes) {
    const largest = Math.max(info.state_bytes, info.transformer_kv_bytes);
    for (const [label, value, kind] of [["state", info.state_bytes, "state"], ["KV cache", info.transformer_kv_bytes, "kv"]]) {
      const row = document.createElement("div");
      row.className = "mem";
      row.textContent = label;
      const bar = document.createElement("div");
      bar.className = kind;
      bar.style.width = (100 * value / largest).toFixed(1) + "%";
      row.append(bar);
      bars.append(row);
    }
    const ratio = info.transformer_kv_bytes / info.state_bytes;
    const relation = Math.abs(ratio - 1) < 0.05 ? "The state is as large as" : ratio > 1 ? `The state is ${ratio.toFixed(1)}x smaller than` : `The state is ${(1 / ratio).toFixed(1)}x larger than`;
    $("memory-note").textContent = relation +
      ` the KV cache a Transformer of this shape keeps for ${count(info.tokens)} tokens` + (info.state_constant_size ? "; it stays this size however long the document is." : ".");
  }
  const firing = $("firing");
  if (answer && answer.firing) {
    firing.replaceChildren(...answer.firing.map((layer) => {
      const row = document.createElement("div");
      row.className = "layer";
      const name = document.createElement("span");
      name.textContent = "L" + layer.layer;
      const track = document.createElement("div");
      track.className = "track";
      const fill = document.createElement("div");
      fill.style.width = (100 * layer.fired).toFixed(1) + "%";
      track.append(fill);
      const value = document.createElement("span");
      value.textContent = (100 * layer.fired).toFixed(1) + "%";
      row.append(name, track, value);
      return row;
    }));
  } else {
    firing.innerHTML = '<p class="hint">' + (answer ? "Spiking is off for this model." : "Ask a question to see it.") + "</p>";
  }
}

function render() {
  renderList();
  const entry = docs.get(current);
  renderReading(entry && entry.info);
  if (!entry) $("question").disabled = $("ask").disabled = true;
  renderMessages();
  renderPanel();
}

function select(id) {
  current = id;
  render();
}

async function follow(id) {
  const response = await api(`/v1/documents/${id}/progress`);
  for await (const info of events(response)) {
    const entry = docs.get(id);
    if (!entry) return;
    entry.info = info;
    if (id === current) { renderReading(info); renderList(); }
    if (info.state !== "reading") break;
  }
  render();
}

async function upload(file) {
  showError("");
  try {
    const model = encodeURIComponent($("model").value || "");
    const response = await api(`/v1/documents?name=${encodeURIComponent(file.name)}&model=${model}`, {
      method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
    });
    const info = await response.json();
    docs.set(info.id, { info, messages: [] });
    select(info.id);
    await follow(info.id);
  } catch (err) {
    showError(err.message);
  }
}

async function ask(question) {
  const entry = docs.get(current);
  if (!entry) return;
  showError("");
  entry.messages.push({ role: "user", text: question });
  const reply = { role: "assistant", text: "", meta: "" };
  entry.messages.push(reply);
  renderMessages();
  $("ask").disabled = true;
  try {
    const response = await api(`/v1/documents/${entry.info.id}/ask`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question, model: $("model").value, temperature: 0, max_tokens: ANSWER_TOKENS }),
    });
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.type === "start") {
        reply.meta = event.document_tokens_reread === 0
          ? `served from kept state, 0 tokens re-read (${count(event.cached_tokens)} document tokens kept, ${count(event.question_tokens)} question tokens read)`
          : `${count(event.document_tokens_reread)} document tokens re-read`;
      } else if (event.type === "text") {
        reply.text += event.text;
      } else if (event.type === "done") {
        reply.text = event.text;
        reply.meta += ` · first token after ${seconds(event.ttft_seconds)}`;
        entry.info.last_answer = event;
        entry.info.questions += 1;
        renderPanel();
      }
      renderMessages();
    }
  } catch (err) {
    showError(err.message);
  } finally {
    $("ask").disabled = entry.info.state !== "ready";
  }
}

$("file").onchange = (e) => { for (const f of e.target.files) upload(f); e.target.value = ""; };
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); for (const f of e.dataTransfer.files) upload(f); };
$("ask-form").onsubmit = (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (question) { $("question").value = ""; ask(question); }
};
$("question").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask-form").requestSubmit(); } };
$("cancel").onclick = async () => {
  const id = current;
  try {
    await api(`/v1/documents/${id}`, { method: "DELETE" });
    docs.delete(id);
    current = docs.size ? [...docs.keys()].pop() : null;
    render();
  } catch (err) { showError(err.message); }
};
$("key-form").onsubmit = async (e) => {
  e.preventDefault();
  key = $("key").value;
  sessionStorage.setItem("spikingbrain-key", key);
  showError("");
  await start();
};

async function start() {
  try {
    await loadModels();
    $("key-form").hidden = true;
    const listed = (await (await api("/v1/documents")).json()).data;
    for (const info of listed) if (!docs.has(info.id)) docs.set(info.id, { info, messages: [] });
    if (!current && listed.length) current = listed[listed.length - 1].id;
    render();
    for (const info of listed) if (info.state === "reading") follow(info.id);
  } catch (err) {
    showError(err.message);
  }
}

start();
