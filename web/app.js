// Herald dashboard: a small single-page app over Herald's public API and
// streams. The API key lives in sessionStorage only.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const view = $("#view");
const key = () => sessionStorage.getItem("herald.key");
let cleanup = [];

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function mask(phone) {
  const p = String(phone || "");
  return p.length <= 6 ? "*".repeat(p.length) : p.slice(0, 4) + "*".repeat(p.length - 6) + p.slice(-2);
}
function fmt(n) { return Number(n || 0).toLocaleString(); }

async function api(method, path, body, type = "application/json", extraHeaders = {}) {
  const headers = { Authorization: `Bearer ${key()}`, ...extraHeaders };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = type;
    init.body = type === "application/json" ? JSON.stringify(body) : body;
  }
  const res = await fetch(path, init);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const e = data.error || (data.errors && data.errors[0]) || {};
    const err = new Error(`${e.message || res.statusText}${e.field ? ` (field: ${e.field})` : ""}`);
    err.status = res.status;
    throw err;
  }
  return data;
}

function wsUrl(path) {
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`;
}

/** A WebSocket that reconnects with backoff and resumes with ?since=. */
function liveSocket(path, onMessage, onState) {
  let since = null, backoff = 250, socket = null, stopped = false;
  function open() {
    const sep = path.includes("?") ? "&" : "?";
    socket = new WebSocket(wsUrl(`${path}${sep}token=${encodeURIComponent(key())}${since !== null ? `&since=${since}` : ""}`));
    socket.onopen = () => { backoff = 250; onState && onState(true); };
    socket.onmessage = ev => {
      const m = JSON.parse(ev.data);
      if (typeof m.seq === "number") since = since === null ? m.seq : Math.max(since, m.seq);
      onMessage(m, socket);
    };
    socket.onclose = ev => {
      onState && onState(false);
      if (stopped || ev.code === 1008 || ev.code === 4004) return;
      setTimeout(open, backoff);
      backoff = Math.min(backoff * 2, 10000);
    };
  }
  open();
  const handle = { send: m => socket && socket.readyState === 1 && socket.send(JSON.stringify(m)), close: () => { stopped = true; socket && socket.close(); } };
  cleanup.push(handle.close);
  return handle;
}

function every(ms, fn) {
  const id = setInterval(fn, ms);
  cleanup.push(() => clearInterval(id));
}

function progressBar(pct) {
  return `<div class="bar" role="progressbar" aria-valuenow="${pct}" aria-valuemin="0" aria-valuemax="100"><span style="width:${Math.min(100, pct)}%"></span></div>`;
}

// ---------------------------------------------------------------- sign in
function login() {
  $("#nav").hidden = true;
  view.innerHTML = `
    <div class="card" style="max-width:420px;margin:3rem auto">
      <h1>Sign in</h1>
      <form id="login">
        <label for="apikey">API key</label>
        <input id="apikey" autocomplete="off" placeholder="hk_…" required>
        <p class="muted">Kept in this browser tab only. Create one with <code>herald keys create --workspace NAME</code>.</p>
        <button type="submit">Sign in</button>
        <p id="login-error" class="error" role="alert"></p>
      </form>
    </div>`;
  $("#login").onsubmit = async ev => {
    ev.preventDefault();
    sessionStorage.setItem("herald.key", $("#apikey").value.trim());
    try {
      await api("GET", "/v1/workspace");
      location.hash = "#/campaigns";
    } catch (e) {
      sessionStorage.removeItem("herald.key");
      $("#login-error").textContent = e.status === 401 ? "That key is not valid." : e.message;
    }
  };
}

// ---------------------------------------------------------------- list
async function campaigns() {
  const data = await api("GET", "/v1/campaigns?per_page=100");
  const rows = data.campaigns.map(c => `
    <tr data-id="${c.id}">
      <td><a href="#/campaigns/${c.id}">${esc(c.name)}</a><div class="muted">${esc(c.channel)} · ${fmt(c.contact_count)} contacts</div></td>
      <td><span class="status ${esc(c.status)}" data-f="status">${esc(c.status)}</span></td>
      <td data-f="bar">${progressBar(c.progress.progress_percentage)}</td>
      <td class="num" data-f="sent">${fmt(c.progress.sent)}</td>
      <td class="num" data-f="failed">${fmt(c.progress.failed)}</td>
      <td class="num hide-sm" data-f="delivered">${fmt(c.progress.delivered)}</td>
    </tr>`).join("");
  view.innerHTML = `
    <h1>Campaigns <span id="live" class="live">live</span></h1>
    ${data.campaigns.length ? `<table>
      <thead><tr><th>Campaign</th><th>Status</th><th>Progress</th><th class="num">Sent</th><th class="num">Failed</th><th class="num hide-sm">Delivered</th></tr></thead>
      <tbody>${rows}</tbody></table>` : `<div class="card">No campaigns yet. <a href="#/new">Create one</a>.</div>`}`;
  const monitor = liveSocket("/ws/campaigns/monitor", m => {
    if (m.type === "connection_ack") monitor.send({ type: "subscribe", campaign_ids: data.campaigns.map(c => c.id) });
    if (m.type !== "progress_update" && m.type !== "initial_progress") return;
    const row = view.querySelector(`tr[data-id="${m.data.campaign_id}"]`);
    if (!row) return;
    const p = m.data.progress;
    row.querySelector('[data-f="status"]').textContent = m.data.status;
    row.querySelector('[data-f="status"]').className = `status ${m.data.status}`;
    row.querySelector('[data-f="bar"]').innerHTML = progressBar(p.progress_percentage);
    row.querySelector('[data-f="sent"]').textContent = fmt(p.completed);
    row.querySelector('[data-f="failed"]').textContent = fmt(p.failed);
  }, on => { const l = $("#live"); if (l) l.className = on ? "live on" : "live"; });
  every(5000, async () => {
    const fresh = await api("GET", "/v1/campaigns?per_page=100").catch(() => null);
    for (const c of fresh ? fresh.campaigns : []) {
      const cell = view.querySelector(`tr[data-id="${c.id}"] [data-f="delivered"]`);
      if (cell) cell.textContent = fmt(c.progress.delivered);
    }
  });
}

// ---------------------------------------------------------------- one campaign
async function campaign(id) {
  let c = await api("GET", `/v1/campaigns/${id}`);
  let page = 1, status = "", reveal = false;
  view.innerHTML = `
    <h1>${esc(c.name)} <span id="status" class="status ${esc(c.status)}">${esc(c.status)}</span> <span id="live" class="live">live</span></h1>
    <div class="muted">${esc(c.channel)} · template: <code>${esc(c.template || "—")}</code></div>
    <div class="actions">
      <button data-act="start">Start</button><button data-act="pause" class="secondary">Pause</button>
      <button data-act="resume" class="secondary">Resume</button><button data-act="cancel" class="secondary">Cancel</button>
      <button data-act="resend" class="secondary">Resend to failures</button>
    </div>
    <p id="action-error" class="error" role="alert"></p>
    <div id="bar">${progressBar(c.progress.progress_percentage)}</div>
    <div class="stats" id="stats"></div>
    <h2>Throughput (sends per minute)</h2><svg class="chart" id="chart" viewBox="0 0 600 140" preserveAspectRatio="none"></svg>
    <h2>Batches</h2><div id="batches" class="muted">No run yet.</div>
    <h2>Recipients</h2>
    <div class="row">
      <div><label for="filter">Status</label><select id="filter">
        <option value="">All</option>${["pending","in_progress","completed","failed","no_answer","busy","voicemail","skipped"].map(s => `<option>${s}</option>`).join("")}
      </select></div>
      <div><label for="search">Search this page</label><input id="search" placeholder="name or number"></div>
      <div><label><input type="checkbox" id="reveal" style="width:auto"> Show numbers</label></div>
    </div>
    <div id="recipients"></div>
    <div class="actions"><button id="prev" class="secondary">Previous</button><span id="pageinfo" class="muted"></span><button id="next" class="secondary">Next</button></div>
    <h2>Runs</h2><div id="runs"></div>`;

  let shownStatus = c.status;
  function showCounts(s, p) {
    // A new status (started, completed, paused…) changes the runs and the
    // recipients' rows: reload them now rather than at the next poll.
    if (s !== shownStatus) {
      shownStatus = s;
      loadRuns().catch(() => {});
      loadRecipients().catch(() => {});
    }
    $("#status").textContent = s;
    $("#status").className = `status ${s}`;
    $("#bar").innerHTML = progressBar(p.progress_percentage);
    const delivered = $('[data-stat="Delivered"]') ? $('[data-stat="Delivered"]').textContent : "0";
    $("#stats").innerHTML = [["Total", p.total_contacts], ["Sent", p.completed], ["Failed", p.failed], ["In flight", p.processing],
      ["Pending", p.pending], ["Delivered", delivered], ["Success", `${p.success_rate}%`]]
      .map(([k, v]) => `<div class="stat"><b data-stat="${k}">${typeof v === "number" ? fmt(v) : esc(v)}</b><span>${k}</span></div>`).join("");
  }
  showCounts(c.status, { total_contacts: c.progress.total || c.contact_count, completed: c.progress.sent, failed: c.progress.failed,
    processing: c.progress.processing, pending: c.progress.pending, success_rate: 0, progress_percentage: c.progress.progress_percentage });

  const stream = liveSocket(`/ws/campaigns/${id}/progress`, m => {
    if (m.type === "initial_progress" || m.type === "progress_update") showCounts(m.data.status, m.data.progress);
    if (m.type === "metrics_history") drawChart(m.data);
  }, on => { const l = $("#live"); if (l) l.className = on ? "live on" : "live"; });
  every(10000, () => stream.send({ type: "request_history", hours: 6 }));
  setTimeout(() => stream.send({ type: "request_history", hours: 6 }), 500);

  function drawChart(points) {
    const svg = $("#chart");
    if (!svg) return;
    const max = Math.max(1, ...points.map(p => p.completed + p.failed));
    const w = 600 / Math.max(points.length, 1);
    svg.innerHTML = points.map((p, i) => {
      const h = (p.completed / max) * 130, f = (p.failed / max) * 130;
      return `<rect x="${i * w}" y="${140 - h - f}" width="${Math.max(1, w - 1)}" height="${h}" fill="#2456d6"><title>${esc(p.timestamp)}: ${p.completed} sent, ${p.failed} failed</title></rect>` +
             `<rect x="${i * w}" y="${140 - f}" width="${Math.max(1, w - 1)}" height="${f}" fill="#c0392b"></rect>`;
    }).join("");
  }

  async function loadRuns() {
    const runs = (await api("GET", `/v1/campaigns/${id}/runs`)).runs;
    const deliveredCell = $('[data-stat="Delivered"]');
    if (deliveredCell && runs.length) deliveredCell.textContent = fmt(runs[0].counters.delivered);
    $("#runs").innerHTML = runs.length ? `<table><thead><tr><th>Run</th><th>Status</th><th>Recipients</th><th class="num">Sent</th><th class="num">Failed</th><th class="num">Skipped</th><th class="hide-sm">Started</th></tr></thead><tbody>${
      runs.map(r => `<tr><td><code>${esc(r.uuid.slice(0, 8))}</code></td><td class="status ${esc(r.status)}">${esc(r.status)}</td><td>${esc(r.recipients)}</td>
        <td class="num">${fmt(r.counters.sent)}</td><td class="num">${fmt(r.counters.failed)}</td><td class="num">${fmt(r.counters.skipped)}</td><td class="hide-sm">${esc(r.started_at || "")}</td></tr>`).join("")}</tbody></table>` : `<p class="muted">No runs yet.</p>`;
    if (!runs.length) return;
    const detail = await api("GET", `/v1/campaign/${c.uuid}/runs/${runs[0].uuid}`, undefined, undefined, { "X-API-Key": key() });
    const batches = detail.data.batches;
    $("#batches").innerHTML = `<table><thead><tr><th>#</th><th>Status</th><th class="num">Recipients</th><th class="num">Sent</th><th class="num">Failed</th><th class="hide-sm">Started</th><th class="hide-sm">Completed</th><th>Error</th></tr></thead><tbody>${
      batches.map(b => `<tr><td>${b.batch_sequence}</td><td class="status ${esc(b.status)}">${esc(b.status)}</td><td class="num">${fmt(b.recipient_count)}</td>
        <td class="num">${fmt(b.sent_count)}</td><td class="num">${fmt(b.failed_count)}</td><td class="hide-sm">${esc(b.started_at || "")}</td><td class="hide-sm">${esc(b.completed_at || "")}</td>
        <td>${b.error_detail ? esc(b.error_detail.message || JSON.stringify(b.error_detail)) : ""}</td></tr>`).join("")}</tbody></table>`;
  }

  async function loadRecipients() {
    const q = `/api/v1/campaigns/${id}/executions?per_page=25&page=${page}${status ? `&status=${status}` : ""}`;
    const data = await api("GET", q);
    const term = ($("#search").value || "").toLowerCase();
    const rows = data.executions.filter(e => !term || `${e.contact_name} ${e.contact_phone}`.toLowerCase().includes(term));
    $("#recipients").innerHTML = `<table><thead><tr><th>Contact</th><th>Number</th><th>Status</th><th class="hide-sm">Message</th><th class="hide-sm">Detail</th></tr></thead><tbody>${
      rows.map(e => `<tr><td>${esc(e.contact_name || "")}</td><td><code>${esc(reveal ? e.contact_phone : mask(e.contact_phone))}</code></td>
        <td class="status ${esc(e.status)}">${esc(e.status)}</td><td class="hide-sm">${esc(e.execution_data.message_status || "")}</td>
        <td class="hide-sm">${esc(e.execution_data.error_details || e.execution_data.retry_reason || "")}</td></tr>`).join("")}</tbody></table>`;
    const p = data.pagination;
    $("#pageinfo").textContent = `page ${p.page} of ${Math.max(1, p.total_pages)} (${fmt(p.total_items)})`;
    $("#prev").disabled = !p.has_prev;
    $("#next").disabled = !p.has_next;
  }

  $("#filter").onchange = () => { status = $("#filter").value; page = 1; loadRecipients(); };
  $("#search").oninput = () => loadRecipients();
  $("#reveal").onchange = () => { reveal = $("#reveal").checked; loadRecipients(); };
  $("#prev").onclick = () => { page = Math.max(1, page - 1); loadRecipients(); };
  $("#next").onclick = () => { page += 1; loadRecipients(); };
  view.querySelectorAll("[data-act]").forEach(button => {
    button.onclick = async () => {
      const act = button.dataset.act;
      const question = { start: "Start sending now?", pause: "Pause sending?", resume: "Resume sending?",
        cancel: "Cancel the campaign? Unsent recipients are skipped.", resend: "Send again to every recipient whose last attempt failed?" }[act];
      if (!confirm(question)) return;
      $("#action-error").textContent = "";
      try {
        if (act === "resend") await api("POST", `/v1/campaigns/${id}/runs`, { recipients: "failed" });
        else await api("POST", `/v1/campaigns/${id}/${act}`);
        loadRuns();
      } catch (e) { $("#action-error").textContent = e.message; }
    };
  });
  loadRecipients().catch(() => {});
  loadRuns().catch(() => {});
  every(2000, () => { loadRuns().catch(() => {}); });
  every(5000, () => { loadRecipients().catch(() => {}); });
}

// ---------------------------------------------------------------- create
function parseCsvLine(line) {
  const out = []; let cur = "", quoted = false;
  for (let i = 0; i < line.length; i++) {
    const ch = line[i];
    if (quoted) {
      if (ch === '"' && line[i + 1] === '"') { cur += '"'; i++; }
      else if (ch === '"') quoted = false;
      else cur += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ",") { out.push(cur); cur = ""; }
    else cur += ch;
  }
  out.push(cur);
  return out.map(s => s.trim());
}

function newCampaign() {
  let firstContact = null;
  view.innerHTML = `
    <h1>New campaign</h1>
    <form id="create" class="card">
      <div class="row">
        <div><label for="name">Name</label><input id="name" required maxlength="200"></div>
        <div><label for="channel">Channel</label><select id="channel"><option>sms</option><option>voice</option><option>external</option></select></div>
        <div><label for="sender">Sender</label><input id="sender" placeholder="ACME or +15550001234"></div>
      </div>
      <label for="template">Message template</label>
      <textarea id="template" rows="3" placeholder="Hi {{name}}, your appointment is on {{day}}."></textarea>
      <label>Preview for the first contact</label><div id="preview" class="preview muted">Upload contacts to see a preview.</div>
      <label for="csv">Contacts (CSV with a phone column)</label><input id="csv" type="file" accept=".csv,text/csv">
      <label for="start_at">Schedule (optional)</label><input id="start_at" type="datetime-local">
      <div class="actions"><button type="submit">Create</button></div>
      <p id="create-error" class="error" role="alert"></p>
    </form>
    <div id="report"></div>`;
  function render() {
    const t = $("#template").value;
    if (!firstContact) return;
    const text = t.replace(/\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}\}/g, (_, v) => firstContact[v] !== undefined && firstContact[v] !== "" ? firstContact[v] : `⟨missing ${v}⟩`);
    $("#preview").textContent = text;
    $("#preview").className = "preview";
  }
  $("#template").oninput = render;
  $("#csv").onchange = async () => {
    const file = $("#csv").files[0];
    if (!file) return;
    const head = (await file.slice(0, 64 * 1024).text()).replace(/^\uFEFF/, "").split(/\r?\n/);
    const headers = parseCsvLine(head[0] || "").map(h => h.toLowerCase() === "phone" || h.toLowerCase() === "name" ? h.toLowerCase() : h);
    const values = parseCsvLine(head[1] || "");
    firstContact = Object.fromEntries(headers.map((h, i) => [h, values[i] || ""]));
    render();
  };
  $("#create").onsubmit = async ev => {
    ev.preventDefault();
    $("#create-error").textContent = "";
    const body = { name: $("#name").value, channel: $("#channel").value };
    if ($("#template").value) body.template = $("#template").value;
    if ($("#sender").value) body.sender = $("#sender").value;
    try {
      const c = await api("POST", "/v1/campaigns", body);
      let report = "";
      const file = $("#csv").files[0];
      if (file) {
        const r = await api("POST", `/v1/campaigns/${c.id}/contacts:import`, file, "text/csv");
        report = `<div class="card" id="import-report"><b>Imported ${fmt(r.imported)}</b>, ${fmt(r.duplicates)} duplicates, <span class="${r.invalid ? "error" : ""}">${fmt(r.invalid)} invalid</span>
          ${r.errors.length ? `<table><thead><tr><th>Line</th><th>Column</th><th>Reason</th></tr></thead><tbody>${
            r.errors.map(e => `<tr><td>${e.line ?? ""}</td><td>${esc(e.column)}</td><td>${esc(e.reason)}</td></tr>`).join("")}</tbody></table>` : ""}</div>`;
      }
      if ($("#start_at").value) {
        await api("POST", `/v1/campaigns/${c.id}/schedule`, { start_at: new Date($("#start_at").value).toISOString() });
      }
      $("#report").innerHTML = `${report}<p><a id="open-campaign" href="#/campaigns/${c.id}">Open “${esc(c.name)}” →</a></p>`;
    } catch (e) { $("#create-error").textContent = e.message; }
  };
}

// ---------------------------------------------------------------- router
async function route() {
  cleanup.forEach(f => f());
  cleanup = [];
  if (!key()) return login();
  $("#nav").hidden = false;
  const hash = location.hash || "#/campaigns";
  try {
    let m;
    if ((m = hash.match(/^#\/campaigns\/(\d+)$/))) await campaign(m[1]);
    else if (hash === "#/new") newCampaign();
    else await campaigns();
  } catch (e) {
    if (e.status === 401) { sessionStorage.removeItem("herald.key"); return login(); }
    view.innerHTML = `<p class="error" role="alert">${esc(e.message)}</p>`;
  }
}
$("#signout").onclick = () => { sessionStorage.removeItem("herald.key"); location.hash = "#/login"; route(); };
window.addEventListener("hashchange", route);
route();
