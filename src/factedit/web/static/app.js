// factedit's page: plain JavaScript, no libraries, talks only to this server.
"use strict";

const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error("the factedit server cannot be reached (" + err.message + ")");
  }
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) {
    throw new Error((data && data.error) || ("the server answered " + response.status));
  }
  return data;
}

function postJSON(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function show(el, on) { el.hidden = !on; }

function say(id, text, ok = false) {
  const el = $(id);
  el.textContent = text || "";
  el.classList.toggle("ok", ok);
  show(el, Boolean(text));
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

// Text with every occurrence of `word` wrapped in <mark> (DOM nodes, never HTML strings).
function marked(text, word) {
  const frag = document.createDocumentFragment();
  const w = (word || "").trim();
  if (!w) { frag.append(text); return frag; }
  const lower = text.toLowerCase(), lw = w.toLowerCase();
  let i = 0;
  for (;;) {
    const j = lower.indexOf(lw, i);
    if (j < 0) break;
    frag.append(text.slice(i, j), el("mark", text.slice(j, j + w.length)));
    i = j + w.length;
  }
  frag.append(text.slice(i));
  return frag;
}

const fmt = (p) => (p < 0.001 ? p.toExponential(2) : p.toFixed(4));

// Poll a job until it ends; `onTick` sees every state. Resolves with the result.
async function follow(jobId, bar, phase, onTick) {
  for (;;) {
    const job = await api("/api/jobs/" + jobId);
    if (job.total > 0) { bar.max = job.total; bar.value = job.done; } else { bar.removeAttribute("value"); }
    const secs = job.status === "queued" ? job.waited : job.elapsed;
    phase.textContent = (job.status === "queued" ? "waiting for the model (another request is running)" : job.phase)
      + " · " + secs.toFixed(1) + " s";
    if (onTick) onTick(job);
    if (job.status === "done") return job.result;
    if (job.status === "error") throw new Error(job.error);
    await new Promise((r) => setTimeout(r, 250));
  }
}

// ---- info ---------------------------------------------------------------------------------
async function loadInfo() {
  const info = await api("/api/info");
  $("model-name").textContent = info.model + " · " + info.layers + " layers";
  const select = $("method");
  select.replaceChildren();
  for (const m of info.methods) {
    const opt = el("option", m);
    opt.value = m;
    if (m === info.default_method) opt.selected = true;
    select.append(opt);
  }
  if (!$("test-prompts").value) $("test-prompts").value = info.example.test_prompts.join("\n");
}

// ---- edit ---------------------------------------------------------------------------------
async function submitEdit(event) {
  event.preventDefault();
  say("edit-message", "");
  const body = {
    prompt: $("prompt").value,
    subject: $("subject").value,
    target: $("target").value,
    method: $("method").value,
    test_prompts: $("test-prompts").value.split("\n").filter((s) => s.trim()),
    max_new_tokens: Number($("max-new-tokens").value) || 30,
  };
  const button = $("edit-submit");
  button.disabled = true;
  document.body.dataset.editState = "running";
  try {
    const { job } = await postJSON("/api/edit", body);
    show($("edit-progress"), true);
    const result = await follow(job, $("edit-bar"), $("edit-phase"));
    renderEdit(result);
    document.body.dataset.editState = "done";
  } catch (err) {
    say("edit-message", err.message);
    document.body.dataset.editState = "error";
  } finally {
    show($("edit-progress"), false);
    button.disabled = false;
    refreshEdits();
  }
}

function renderEdit(r) {
  $("edit-summary").textContent = `${r.method} wrote "${r.prompt} ${r.target}" in ${r.seconds.toFixed(1)} s`
    + ` (edit ${r.edit.id}, ${r.edit.params.join(", ")}).`;
  $("prob-text").textContent = `P("${r.target}" | "${r.prompt}")`;
  $("prob-before").textContent = fmt(r.target_prob_before);
  $("prob-after").textContent = fmt(r.target_prob_after);
  const body = $("generations").tBodies[0];
  body.replaceChildren();
  for (const g of r.generations) {
    const tr = el("tr");
    const orig = el("td", null, "original"), edited = el("td", null, "edited");
    orig.append(el("b", g.prompt), marked(g.original, r.target));
    edited.append(el("b", g.prompt), marked(g.edited, r.target));
    tr.append(orig, edited);
    body.append(tr);
  }
  show($("edit-result"), true);
}

// ---- edits in place ----------------------------------------------------------------------
async function refreshEdits() {
  let data;
  try { data = await api("/api/edits"); } catch (err) { say("edits-message", err.message); return; }
  renderEdits(data.edits);
}

let shownEdits = null;

function renderEdits(edits) {
  // Rebuild only when the list changed (it is refreshed every few seconds).
  const signature = edits.map((e) => e.id).join(",");
  if (signature === shownEdits) return;
  shownEdits = signature;
  const list = $("edits-list");
  list.replaceChildren();
  edits.forEach((e, i) => {
    const li = el("li");
    li.dataset.id = e.id;
    const reqs = e.requests.map((r) => `${r.prompt} → ${r.target}`).join("; ");
    const from = e.source === "upload" ? ` (uploaded ${e.filename})` : "";
    li.append(el("span", `${e.id} · ${e.method}${from}: ${reqs} `, "what"));
    const newer = edits.length - 1 - i;
    const b = el("button", newer ? `revert (and ${newer} newer)` : "revert", "small revert");
    b.type = "button";
    b.addEventListener("click", () => revert(e.id));
    li.append(b);
    list.append(li);
  });
  $("edit-count").textContent = String(edits.length);
  show($("no-edits"), edits.length === 0);
  $("revert-all").disabled = edits.length === 0;
  $("download").classList.toggle("disabled", edits.length === 0);
  document.body.dataset.edits = String(edits.length);
}

async function revert(id) {
  say("edits-message", "");
  try {
    const data = await postJSON(`/api/edits/${encodeURIComponent(id)}/revert`, {});
    renderEdits(data.edits);
    say("edits-message", `reverted ${data.reverted.join(", ")}`, true);
  } catch (err) { say("edits-message", err.message); refreshEdits(); }
}

async function revertAll() {
  say("edits-message", "");
  try {
    const data = await postJSON("/api/revert-all", {});
    renderEdits(data.edits);
    say("edits-message", data.reverted.length ? `reverted ${data.reverted.join(", ")}: the model is as loaded` : "nothing to revert", true);
  } catch (err) { say("edits-message", err.message); refreshEdits(); }
}

async function upload(event) {
  event.preventDefault();
  say("edits-message", "");
  const file = $("upload-file").files[0];
  if (!file) { say("edits-message", "choose a saved-edit file (.safetensors) first"); return; }
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const data = await api("/api/upload", { method: "POST", body: form });
    renderEdits(data.edits);
    say("edits-message", `applied ${file.name} as ${data.edit.id}`, true);
  } catch (err) { say("edits-message", err.message); }
}

// ---- locate -------------------------------------------------------------------------------
async function submitTrace(event) {
  event.preventDefault();
  say("trace-message", "");
  const button = $("trace-submit");
  button.disabled = true;
  try {
    const { job } = await postJSON("/api/trace", {
      prompt: $("trace-prompt").value,
      subject: $("trace-subject").value,
      answer: $("trace-answer").value,
      samples: Number($("trace-samples").value) || 10,
    });
    show($("trace-progress"), true);
    const r = await follow(job, $("trace-bar"), $("trace-phase"));
    $("trace-summary").textContent = `answer "${r.answer.trim()}": p = ${fmt(r.clean_prob)} clean, `
      + `${fmt(r.corrupt_prob)} with the subject corrupted` + (r.edits_in_place ? ` (${r.edits_in_place} edit(s) in place)` : "");
    const maps = $("heatmaps");
    maps.replaceChildren();
    for (const k of r.kinds) {
      const fig = el("figure");
      const img = el("img");
      img.src = k.image;
      img.alt = `causal trace heatmap (${k.kind})`;
      img.dataset.kind = k.kind;
      fig.append(img);
      maps.append(fig);
    }
    show($("trace-result"), true);
  } catch (err) {
    say("trace-message", err.message);
  } finally {
    show($("trace-progress"), false);
    button.disabled = false;
  }
}

// ---- look inside --------------------------------------------------------------------------
async function submitLens(event) {
  event.preventDefault();
  say("lens-message", "");
  try {
    const r = await postJSON("/api/lens", { prompt: $("lens-prompt").value, top_k: 5 });
    const table = $("lens-table");
    const head = el("tr");
    head.append(el("th", "layer"));
    for (let i = 1; i <= r.rows[0].tokens.length; i++) head.append(el("th", `#${i}`));
    table.tHead.replaceChildren(head);
    const body = table.tBodies[0];
    body.replaceChildren();
    for (const row of r.rows) {
      const tr = el("tr");
      tr.append(el("td", String(row.layer)));
      row.tokens.forEach((t, i) => {
        const td = el("td", JSON.stringify(t) + " ");
        td.append(el("span", row.probs[i].toFixed(2), "p"));
        tr.append(td);
      });
      body.append(tr);
    }
    show(table, true);
  } catch (err) { say("lens-message", err.message); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("edit-form").addEventListener("submit", submitEdit);
  $("upload-form").addEventListener("submit", upload);
  $("revert-all").addEventListener("click", revertAll);
  $("trace-form").addEventListener("submit", submitTrace);
  $("lens-form").addEventListener("submit", submitLens);
  loadInfo().then(() => { document.body.dataset.ready = "1"; })
    .catch((err) => say("edit-message", err.message));
  refreshEdits();
  // Another session may edit the same model: keep the list current while the page is shown.
  setInterval(() => { if (!document.hidden) refreshEdits(); }, 3000);
});
