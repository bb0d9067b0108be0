// The Souverain chat app. It talks only to the server's HTTP API: /app/api for accounts and conversations,
// /v1/chat/completions (streamed) for answers. Model output is untrusted: markdown is sanitised by DOMPurify
// before it touches the DOM, and the page's Content-Security-Policy forbids inline script anyway.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  me: null, csrf: "", conversations: [], conv: null, messages: new Map(), thread: [],
  streaming: null, // {controller, id, text, stopped}
};
const SAVE_EVERY_MS = 1000;
// Behind a reverse proxy (`serve --root-path /prefix`) every link and call carries the prefix the server names.
const ROOT = (document.querySelector('meta[name="root-path"]') || {}).content || "";
const pagePath = () => location.pathname.startsWith(ROOT) ? location.pathname.slice(ROOT.length) : location.pathname;

// -- HTTP ------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.message || (body.error && body.error.message))) || `HTTP ${status}`);
    this.status = status; this.body = body || {};
  }
}

async function api(path, { method = "GET", body, keepalive = false } = {}) {
  const headers = { "Content-Type": "application/json" };
  if (state.csrf) headers["x-csrf-token"] = state.csrf;
  const r = await fetch(ROOT + path, { method, headers, keepalive, credentials: "same-origin",
                                body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { message: text }; }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

// -- rendering ---------------------------------------------------------------------------------------
let purifyReady = false;
const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                                          "'": "&#39;" })[c]);
function setupPurify() {
  if (purifyReady) return;
  // Raw HTML in an answer is shown as the text it is, never interpreted (DOMPurify is the second fence).
  marked.use({ renderer: { html: (token) => escapeHtml(token.text || token.raw || "") } });
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
  purifyReady = true;
}

function renderMarkdown(el, text) {
  setupPurify();
  const html = marked.parse(text, { gfm: true, breaks: false, async: false });
  el.innerHTML = DOMPurify.sanitize(html, { USE_PROFILES: { html: true }, FORBID_TAGS: ["style", "form"] });
  for (const code of el.querySelectorAll("pre code")) {
    if (window.hljs) hljs.highlightElement(code);
    const button = document.createElement("button");
    button.type = "button"; button.className = "copy-code"; button.textContent = "Copy";
    button.addEventListener("click", () => copyText(code.textContent, button));
    code.parentElement.appendChild(button);
  }
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.createElement("textarea");
    area.value = text; document.body.appendChild(area); area.select();
    document.execCommand("copy"); area.remove();
  }
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = label; }, 1200);
}

function siblings(msg) {
  return [...state.messages.values()].filter((m) => m.parent_id === msg.parent_id && m.role === msg.role);
}

function messageElement(msg) {
  const el = document.createElement("article");
  el.className = `msg ${msg.role}`;
  el.dataset.id = msg.id;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = msg.role === "user" ? "You" : (msg.model || "Assistant");
  el.appendChild(who);
  const body = document.createElement("div");
  body.className = "body";
  el.appendChild(body);
  fillMessage(el, msg);
  return el;
}

function fillMessage(el, msg) {
  const body = el.querySelector(".body");
  el.classList.toggle("error", msg.status === "error");
  if (msg.role === "user") body.textContent = msg.content;
  else renderMarkdown(body, msg.content || (msg.status === "streaming" && !(msg.tool_calls || []).length ? "…" : ""));
  renderToolCalls(el, msg);
  el.querySelector(".flag")?.remove();
  const live = state.streaming && state.streaming.id === msg.id;
  const flagText = { stopped: "stopped", error: "error", streaming: live ? "" : "interrupted" }[msg.status];
  if (flagText) {
    const flag = document.createElement("span");
    flag.className = "flag"; flag.textContent = flagText;
    el.querySelector(".who").appendChild(flag);
  }
  el.querySelector(".actions")?.remove();
  if (live) return;
  const actions = document.createElement("div");
  actions.className = "actions";
  const add = (label, fn, title) => {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = label; b.title = title || label;
    b.addEventListener("click", fn);
    actions.appendChild(b);
    return b;
  };
  const sibs = siblings(msg);
  if (sibs.length > 1) {
    const i = sibs.findIndex((m) => m.id === msg.id);
    add("‹", () => switchBranch(sibs[(i - 1 + sibs.length) % sibs.length]), "Previous version").disabled = i === 0;
    const pos = document.createElement("span");
    pos.className = "muted"; pos.textContent = `${i + 1}/${sibs.length}`;
    actions.appendChild(pos);
    add("›", () => switchBranch(sibs[(i + 1) % sibs.length]), "Next version").disabled = i === sibs.length - 1;
  }
  const copy = add("Copy", () => copyText(msg.content, copy), "Copy message");
  if (msg.role === "user") add("Edit", () => startEdit(el, msg), "Edit and resend");
  const last = state.thread[state.thread.length - 1];
  if (msg.role === "assistant" && msg.id === last) add("Regenerate", regenerate, "Regenerate the answer");
  el.appendChild(actions);
}

// A tool call the model made: "called NAME with ARGS", collapsed; opened, the arguments pretty-printed.
// Model output is untrusted: text only, never HTML. (The app runs no tools.)
function renderToolCalls(el, msg) {
  el.querySelector(".calls")?.remove();
  const calls = (msg.tool_calls || []).filter(Boolean);
  if (!calls.length) return;
  const box = document.createElement("div");
  box.className = "calls";
  for (const call of calls) {
    const fn = call.function || {};
    const args = fn.arguments || "";
    let pretty = args;
    try { pretty = JSON.stringify(JSON.parse(args), null, 2); } catch (e) { /* still streaming, or not JSON */ }
    const details = document.createElement("details");
    details.className = "call";
    const summary = document.createElement("summary");
    const short = args.replace(/\s+/g, " ");
    summary.textContent = `called ${fn.name || "?"} with ${short.length > 60 ? short.slice(0, 60) + "…" : short}`;
    const pre = document.createElement("pre");
    pre.textContent = pretty;
    details.append(summary, pre);
    box.appendChild(details);
  }
  el.querySelector(".body").after(box);
}

// Streamed tool-call deltas, assembled as the SDKs do: by index, names and arguments concatenated.
function addToolCallDeltas(calls, deltas) {
  for (const d of deltas || []) {
    const call = calls[d.index] || (calls[d.index] = { id: "", type: "function", function: { name: "", arguments: "" } });
    if (d.id) call.id = d.id;
    call.function.name += (d.function && d.function.name) || "";
    call.function.arguments += (d.function && d.function.arguments) || "";
  }
}

function scrollToEnd() {
  // Off-screen messages are laid out lazily (content-visibility), so scrollHeight is an estimate: ask the
  // last message itself to come into view.
  const box = $("messages");
  const toEnd = () => { box.scrollTop = box.scrollHeight; };
  toEnd();
  // New messages are first laid out at a placeholder size; once they are painted at their real size, again.
  requestAnimationFrame(() => requestAnimationFrame(toEnd));
}

function renderThread() {
  const box = $("messages");
  box.replaceChildren();
  if (!state.thread.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "Start a conversation: your messages stay on this server.";
    box.appendChild(empty);
  }
  for (const id of state.thread) box.appendChild(messageElement(state.messages.get(id)));
  scrollToEnd();
  $("conv-title").textContent = (state.conv && state.conv.title) || "New chat";
  $("export-md").hidden = $("export-json").hidden = !state.conv;
  document.title = state.conv && state.conv.title ? `${state.conv.title} · Souverain` : "Souverain";
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of state.conversations) {
    const li = document.createElement("li");
    li.classList.toggle("active", !!state.conv && state.conv.id === c.id);
    const open = document.createElement("button");
    open.type = "button"; open.className = "open"; open.textContent = c.title || "Untitled";
    open.title = c.title || "Untitled";
    open.addEventListener("click", () => { openConversation(c.id); $("app-view").classList.remove("show-sidebar"); });
    const rename = document.createElement("button");
    rename.type = "button"; rename.className = "tool"; rename.textContent = "✎";
    rename.setAttribute("aria-label", `Rename ${c.title || "conversation"}`);
    rename.addEventListener("click", () => renameConversation(c));
    const del = document.createElement("button");
    del.type = "button"; del.className = "tool"; del.textContent = "×";
    del.setAttribute("aria-label", `Delete ${c.title || "conversation"}`);
    del.addEventListener("click", () => deleteConversation(c));
    li.append(open, rename, del);
    list.appendChild(li);
  }
}

function renderPlan() {
  const me = state.me;
  $("plan-name").textContent = me.plan;
  $("user-email").textContent = me.email;
  const quota = me.limits.tokens_per_month;
  const used = me.month_tokens;
  $("usage-text").textContent = quota == null
    ? `${used.toLocaleString()} tokens this month (no monthly limit)`
    : `${used.toLocaleString()} of ${quota.toLocaleString()} tokens this month`;
  $("usage-bar").style.width = quota ? `${Math.min(100, (100 * used) / quota)}%` : "0";
  const orgs = $("org-switch");  // several organisations: act in one at a time
  orgs.replaceChildren(...(me.organisations || []).map((name) => {
    const o = document.createElement("option");
    o.value = name; o.textContent = name; o.selected = name === me.organisation;
    return o;
  }));
  orgs.hidden = (me.organisations || []).length < 2;
  const select = $("model");
  const current = (state.conv && state.conv.model) || select.value || me.models[0];
  select.replaceChildren(...me.models.map((m) => new Option(m, m, false, m === current)));
}

function notice(text) {
  const n = $("notice");
  n.textContent = text || "";
  n.hidden = !text;
}

// -- conversations -----------------------------------------------------------------------------------
async function loadConversations() {
  const q = $("search").value.trim();
  state.conversations = (await api(`/app/api/conversations${q ? `?q=${encodeURIComponent(q)}` : ""}`)).data;
  renderConversations();
}

function showConversation(data) {
  state.conv = data;
  state.messages = new Map(data.messages.map((m) => [m.id, m]));
  state.thread = data.thread;
  $("system-prompt").value = data.system_prompt || "";
  $("temperature").value = data.temperature ?? 0.7;
  if (data.model && state.me.models.includes(data.model)) $("model").value = data.model;
  renderThread();
  renderConversations();
}

async function openConversation(id, push = true) {
  if (state.streaming) return;
  try {
    showConversation(await api(`/app/api/conversations/${id}`));
    if (push) history.pushState({}, "", `${ROOT}/c/${id}`);
    notice("");
  } catch (e) {
    if (e.status === 404) newChat(); else notice(e.message);
  }
}

function newChat() {
  if (state.streaming) return;
  state.conv = null; state.messages = new Map(); state.thread = [];
  $("system-prompt").value = ""; $("temperature").value = 0.7;
  history.pushState({}, "", `${ROOT}/`);
  renderThread(); renderConversations(); notice("");
  $("input").focus();
}

async function renameConversation(c) {
  const title = prompt("New title", c.title);
  if (title === null || !title.trim()) return;
  await api(`/app/api/conversations/${c.id}`, { method: "PATCH", body: { title: title.trim() } });
  if (state.conv && state.conv.id === c.id) { state.conv.title = title.trim(); renderThread(); }
  await loadConversations();
}

async function deleteConversation(c) {
  if (!confirm(`Delete "${c.title || "Untitled"}"? This cannot be undone.`)) return;
  await api(`/app/api/conversations/${c.id}`, { method: "DELETE" });
  if (state.conv && state.conv.id === c.id) newChat();
  await loadConversations();
}

function deepestLeaf(id) {
  // Follow the newest child down: a branch shows where it was left.
  let cur = id;
  for (;;) {
    const kids = [...state.messages.values()].filter((m) => m.parent_id === cur);
    if (!kids.length) return cur;
    cur = kids[kids.length - 1].id;
  }
}

function threadTo(leaf) {
  const path = [];
  for (let m = state.messages.get(leaf); m; m = m.parent_id ? state.messages.get(m.parent_id) : null) path.push(m.id);
  return path.reverse();
}

async function switchBranch(msg) {
  if (state.streaming) return;
  const leaf = deepestLeaf(msg.id);
  state.thread = threadTo(leaf);
  renderThread();
  await api(`/app/api/conversations/${state.conv.id}`, { method: "PATCH", body: { leaf_id: leaf } });
}

// -- sending and streaming -------------------------------------------------------------------------------
async function ensureConversation() {
  if (state.conv) return state.conv;
  const temperature = parseFloat($("temperature").value);
  const conv = await api("/app/api/conversations", { method: "POST", body: {
    model: $("model").value, system_prompt: $("system-prompt").value,
    temperature: Number.isFinite(temperature) ? temperature : null } });
  state.conv = { ...conv, messages: [] };
  history.pushState({}, "", `${ROOT}/c/${conv.id}`);
  return state.conv;
}

async function addMessage(body) {
  const msg = await api(`/app/api/conversations/${state.conv.id}/messages`, { method: "POST", body });
  state.messages.set(msg.id, msg);
  state.thread = threadTo(msg.id);
  return msg;
}

async function send(text) {
  if (state.streaming || document.body.dataset.busy || !text.trim()) return;
  document.body.dataset.busy = "1";  // from the keypress to the saved answer (tests wait on it)
  notice("");
  try {
    await ensureConversation();
    const parent = state.thread.length ? state.thread[state.thread.length - 1] : null;
    const user = await addMessage({ role: "user", content: text, parent_id: parent }); // saved before generating
    $("input").value = ""; autosize();
    renderThread();
    await generate(user);
  } catch (e) {
    notice(e.message);
  } finally {
    delete document.body.dataset.busy;
  }
}

function chatMessages(userId) {
  const out = [];
  const system = $("system-prompt").value.trim();
  if (system) out.push({ role: "system", content: system });
  for (const id of threadTo(userId)) {
    const m = state.messages.get(id);
    if (m.role === "assistant" && m.status === "error") continue;
    out.push({ role: m.role, content: m.content });
  }
  return out;
}

async function generate(user) {
  document.body.dataset.busy = "1";
  const model = $("model").value;
  const answer = await addMessage({ role: "assistant", content: "", parent_id: user.id, status: "streaming",
                                    model });
  const s = state.streaming = { controller: new AbortController(), id: answer.id, text: "", calls: [],
                                stopped: false, lastSave: Date.now() };
  setStreaming(true);
  renderThread();
  const el = $("messages").querySelector(`[data-id="${answer.id}"]`);
  let status = "complete";
  let frame = 0;
  const paint = () => {
    frame = 0;
    answer.content = s.text;
    answer.tool_calls = s.calls;
    fillMessage(el, answer);
    const box = $("messages");
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 300) scrollToEnd();
  };
  try {
    const r = await startCompletion(model, chatMessages(user.id), s.controller.signal);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.object === "error") throw new ApiError(500, chunk);
          for (const c of chunk.choices || []) {
            s.text += (c.delta && c.delta.content) || "";
            addToolCallDeltas(s.calls, c.delta && c.delta.tool_calls);
          }
        }
      }
      if (!frame) frame = requestAnimationFrame(paint);
      if (Date.now() - s.lastSave > SAVE_EVERY_MS) {  // saved as it grows: a crash loses at most a second
        s.lastSave = Date.now();
        api(`/app/api/conversations/${state.conv.id}/messages/${answer.id}`,
            { method: "PATCH", body: { content: s.text } }).catch(() => {});
      }
    }
  } catch (e) {
    if (s.stopped || e.name === "AbortError") status = "stopped";
    else {
      status = "error";
      notice(limitMessage(e));
      if (!s.text) s.text = limitMessage(e);
    }
  }
  if (frame) cancelAnimationFrame(frame);
  answer.content = s.text; answer.status = status; answer.tool_calls = s.calls;
  const calls = s.calls.filter(Boolean);
  await api(`/app/api/conversations/${state.conv.id}/messages/${answer.id}`,
            { method: "PATCH", body: { content: s.text, status, ...(calls.length ? { tool_calls: calls } : {}) } })
    .catch((e) => notice(e.message));
  state.streaming = null;
  renderThread();
  setStreaming(false);
  await afterExchange(user);
  delete document.body.dataset.busy;
}

async function startCompletion(model, messages, signal) {
  // A long conversation may outgrow the model's context: the oldest turns are left out (halving until the
  // server accepts), as a long chat must keep working. The system prompt and the last message always stay.
  const temperature = parseFloat($("temperature").value);
  for (;;) {
    const r = await fetch(ROOT + "/v1/chat/completions", {
      method: "POST", signal, credentials: "same-origin",
      headers: { "Content-Type": "application/json", "x-csrf-token": state.csrf },
      body: JSON.stringify({ model, messages, stream: true,
                             temperature: Number.isFinite(temperature) ? temperature : undefined }),
    });
    if (r.ok) return r;
    let body = {};
    try { body = await r.json(); } catch { /* not JSON */ }
    const system = messages[0] && messages[0].role === "system" ? [messages[0]] : [];
    const turns = messages.slice(system.length);
    if (body.code !== "context_length_exceeded" || turns.length <= 1) throw new ApiError(r.status, body);
    messages = [...system, ...turns.slice(Math.ceil(turns.length / 2))];
  }
}

function limitMessage(e) {
  const code = e.body && (e.body.code || (e.body.error && e.body.error.code));
  if (code === "quota_exceeded") {
    return `You have used this month's tokens on the ${state.me.plan} plan. The quota renews on the 1st; ask an ` +
           "administrator to move your organisation to a larger plan.";
  }
  if (e.status === 429) return "Too many requests right now: wait a few seconds and try again.";
  return `The answer failed: ${e.message}`;
}

async function afterExchange(user) {
  if (state.conv && !state.conv.title) {  // the first exchange names the conversation
    const title = user.content.replace(/\s+/g, " ").trim().slice(0, 60);
    await api(`/app/api/conversations/${state.conv.id}`, { method: "PATCH", body: { title } }).catch(() => {});
    state.conv.title = title;
    $("conv-title").textContent = title;
  }
  await Promise.all([loadConversations(), refreshMe()]);
}

function regenerate() {
  if (state.streaming) return;
  const last = state.messages.get(state.thread[state.thread.length - 1]);
  if (!last || last.role !== "assistant") return;
  notice("");
  generate(state.messages.get(last.parent_id));
}

function startEdit(el, msg) {
  if (state.streaming) return;
  const body = el.querySelector(".body");
  const area = document.createElement("textarea");
  area.className = "edit"; area.value = msg.content;
  area.setAttribute("aria-label", "Edit message");
  const save = document.createElement("button");
  save.type = "button"; save.className = "primary"; save.textContent = "Save & send";
  const cancel = document.createElement("button");
  cancel.type = "button"; cancel.textContent = "Cancel";
  body.replaceChildren(area);
  el.querySelector(".actions").replaceChildren(save, cancel);
  area.focus();
  cancel.addEventListener("click", () => fillMessage(el, msg));
  save.addEventListener("click", async () => {
    if (!area.value.trim() || document.body.dataset.busy) return;
    document.body.dataset.busy = "1";
    try {
      const edited = await addMessage({ role: "user", content: area.value, parent_id: msg.parent_id });
      renderThread();
      await generate(edited);  // the old branch stays: ‹ › switches between them
    } catch (e) {
      notice(e.message);
    } finally {
      delete document.body.dataset.busy;
    }
  });
}

function setStreaming(on) {
  $("send").hidden = on; $("stop").hidden = !on;
  if (!on) $("input").focus();
}

function stop() {
  if (!state.streaming) return;
  state.streaming.stopped = true;
  state.streaming.controller.abort();
}

// -- account -------------------------------------------------------------------------------------------
async function refreshMe() {
  state.me = await api("/app/api/me");
  state.csrf = state.me.csrf;
  renderPlan();
}

async function boot() {
  try {
    await refreshMe();
  } catch (e) {
    if (e.status === 401) { showLogin(); return; }
    throw e;
  }
  $("login-view").hidden = true;
  $("app-view").hidden = false;
  await loadConversations();
  const m = pagePath().match(/^\/c\/([\w-]+)$/);
  if (m) await openConversation(m[1], false); else renderThread();
  $("input").focus();
}

function showLogin() {
  $("app-view").hidden = true;
  $("login-view").hidden = false;
  $("login-email").focus();
}

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${input.scrollHeight}px`;
}

function wire() {
  $("org-switch").addEventListener("change", async (ev) => {
    const r = await api("/app/api/switch", { method: "POST", body: { organisation: ev.target.value } });
    state.csrf = r.csrf; state.conv = null;
    history.pushState(null, "", `${ROOT}/`);
    await boot();
  });
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("login-error").hidden = true;
    try {
      const r = await api("/app/api/login", { method: "POST",
        body: { email: $("login-email").value, password: $("login-password").value } });
      state.csrf = r.csrf;
      $("login-password").value = "";
      await boot();
    } catch (e) {
      $("login-error").textContent = e.message;
      $("login-error").hidden = false;
    }
  });
  $("logout").addEventListener("click", async () => {
    await api("/app/api/logout", { method: "POST" }).catch(() => {});
    state.csrf = ""; state.conv = null;
    showLogin();
  });
  $("composer").addEventListener("submit", (ev) => { ev.preventDefault(); send($("input").value); });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); send($("input").value); }
  });
  $("input").addEventListener("input", autosize);
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") stop(); });
  $("new-chat").addEventListener("click", newChat);
  let timer = 0;
  $("search").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(loadConversations, 200); });
  $("toggle-sidebar").addEventListener("click", () => $("app-view").classList.toggle("show-sidebar"));
  $("toggle-advanced").addEventListener("click", () => {
    const box = $("advanced");
    box.hidden = !box.hidden;
    $("toggle-advanced").setAttribute("aria-expanded", String(!box.hidden));
  });
  const saveSettings = () => {
    if (!state.conv) return;
    const temperature = parseFloat($("temperature").value);
    api(`/app/api/conversations/${state.conv.id}`, { method: "PATCH", body: {
      model: $("model").value, system_prompt: $("system-prompt").value,
      temperature: Number.isFinite(temperature) ? temperature : null } }).catch((e) => notice(e.message));
  };
  for (const id of ["model", "system-prompt", "temperature"]) $(id).addEventListener("change", saveSettings);
  // Export: the server writes the file (the visible thread as Markdown; every branch as JSON).
  for (const format of ["md", "json"]) {
    $(`export-${format}`).addEventListener("click", () => {
      if (state.conv) location.assign(`${ROOT}/app/api/conversations/${state.conv.id}/export?format=${format}`);
    });
  }
  window.addEventListener("popstate", () => {
    const m = pagePath().match(/^\/c\/([\w-]+)$/);
    if (m) openConversation(m[1], false); else newChat();
  });
  // Leaving mid-answer: save what arrived, marked as stopped (keepalive outlives the page).
  window.addEventListener("pagehide", () => {
    const s = state.streaming;
    if (!s || !state.conv) return;
    api(`/app/api/conversations/${state.conv.id}/messages/${s.id}`,
        { method: "PATCH", body: { content: s.text, status: "stopped" }, keepalive: true }).catch(() => {});
  });
}

document.addEventListener("DOMContentLoaded", () => { wire(); boot(); });
