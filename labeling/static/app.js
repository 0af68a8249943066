// The annotators' ranking page: a small client of the JSON API in labeling/app.py.
//
// Model output is untrusted: every prompt and completion is put into the page with textContent
// (never innerHTML), and the server sends a Content-Security-Policy that forbids inline scripts.
// The client keeps no authority: the server re-checks every ranking and knows who is signed in.
"use strict";

const MAX_KEYS = 9; // completions 1-9 / A-I have keyboard shortcuts; more can be clicked or dragged

const $ = (id) => document.getElementById(id);

const state = {
  task: null,        // {id, prompt, completions: [{id, label, text}]} in this annotator's display order
  groups: [],        // ranking being built: groups[i] = completion ids sharing rank i + 1 (ties)
  undo: [],          // snapshots of `groups` before each change
  tieNext: false,    // "=" was pressed: the next pick ties with the last rank
  editing: false,    // the task came from the history, not the queue
  requestId: null,   // one id per answer attempt, so a re-sent submit is stored once
  openedAt: 0,       // when the task was shown: the time spent is stored with the ranking
  busy: false,
  cards: new Map(),  // completion id -> card element (built once per task to keep scroll positions)
  canViewStats: false,
};

// ---------- helpers ----------

function newRequestId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// Bidi overrides and zero-width characters could make text look different from what it is
// ("Trojan Source"); show them as visible markers. The stored data is never changed.
const CONTROL_CHARS = /[\u200B-\u200F\u202A-\u202E\u2060-\u2069\uFEFF]/g;

function setText(el, text) {
  el.replaceChildren();
  let last = 0;
  for (const match of text.matchAll(CONTROL_CHARS)) {
    if (match.index > last) el.append(document.createTextNode(text.slice(last, match.index)));
    const marker = document.createElement("span");
    marker.className = "ctrl";
    marker.title = "invisible control character";
    marker.textContent = "U+" + match[0].codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    el.append(marker);
    last = match.index + match[0].length;
  }
  if (last < text.length) el.append(document.createTextNode(text.slice(last)));
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const options = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    // One silent retry (a dropped keep-alive connection): safe, since every write carries a request id
    // and the server stores a re-sent request once.
    try {
      response = await fetch(path, options);
    } catch (err2) {
      throw new ApiError(0, "cannot reach the server; your answer was not saved yet, try again");
    }
  }
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (response.status === 401 && path !== "api/login") {
    showLogin("Your session ended; please sign in again.");
    throw new ApiError(401, "not signed in");
  }
  if (!response.ok) throw new ApiError(response.status, (data && data.error) || `HTTP ${response.status}`);
  return data;
}

let toastTimer = null;
function toast(message, isError) {
  const box = $("toast");
  box.textContent = message;
  box.classList.toggle("error", !!isError);
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, isError ? 5000 : 1800);
}

function showError(message) { $("rank-error").textContent = message || ""; }

function setProgress(progress) {
  if (!progress) return;
  let line = `${progress.ranked} ranked`;
  if (progress.skipped) line += `, ${progress.skipped} skipped`;
  line += ` · ${progress.total_tasks} tasks in all`;
  $("progress").textContent = line;
}

function showView(name) {
  for (const view of ["login-view", "rank-view", "done-view"]) $(view).hidden = view !== name;
  $("topbar").hidden = name === "login-view";
}

// ---------- login ----------

function showLogin(message) {
  state.task = null;
  for (const panel of ["history-panel", "guidelines-panel", "stats-panel"]) $(panel).hidden = true;
  showView("login-view");
  $("login-error").textContent = message || "";
  $("login-username").focus();
}

function startSession(session) {
  setText($("who"), session.annotator);
  setProgress(session.progress);
  const guidelines = $("guidelines");
  // The guidelines are the project owner's Markdown, rendered by the server with raw HTML
  // disabled; trusted content, unlike model output (and the CSP still blocks any script).
  guidelines.innerHTML = session.guidelines_html || "<p>No guidelines were given for this project.</p>";
  state.canViewStats = !!session.can_view_stats;
  $("toggle-stats").hidden = !state.canViewStats;
  loadNext();
}

async function onLogin(event) {
  event.preventDefault();
  const username = $("login-username").value.trim();
  const password = $("login-password").value;
  try {
    const session = await api("POST", "api/login", { username, password });
    $("login-password").value = "";
    startSession(session);
  } catch (err) {
    $("login-error").textContent = err.message;
  }
}

async function onLogout() {
  try { await api("POST", "api/logout", {}); } catch (err) { /* signed out either way */ }
  showLogin("Signed out.");
}

// ---------- loading tasks ----------

async function loadNext() {
  try {
    const data = await api("GET", "api/next");
    setProgress(data.progress);
    if (!data.task) {
      state.task = null;
      showView("done-view");
      return;
    }
    openTask(data.task, null, false);
  } catch (err) {
    if (err.status !== 401) toast(err.message, true);
  }
}

async function loadForEdit(taskId) {
  try {
    const data = await api("GET", "api/task?id=" + encodeURIComponent(taskId));
    openTask(data.task, data.own, true);
    window.scrollTo(0, 0);
  } catch (err) {
    if (err.status !== 401) toast(err.message, true);
  }
}

function openTask(task, own, editing) {
  state.task = task;
  state.editing = editing;
  state.undo = [];
  state.tieNext = false;
  state.requestId = newRequestId();
  state.openedAt = performance.now();
  state.groups = [];
  if (own && own.ranks) {
    // Rebuild the groups from the stored ranks (dense, 1 best).
    const byRank = new Map();
    for (const c of task.completions) {
      const rank = own.ranks[c.id];
      if (!byRank.has(rank)) byRank.set(rank, []);
      byRank.get(rank).push(c.id);
    }
    state.groups = [...byRank.keys()].sort((a, b) => a - b).map((r) => byRank.get(r));
  }
  $("edit-banner").hidden = !editing;
  $("task-id").textContent = task.id;
  setText($("prompt"), task.prompt);
  $("skip-reason").value = "";
  buildCards();
  showError("");
  showView("rank-view");
  render();
}

// ---------- ranking state ----------

function rankOf(id) {
  const index = state.groups.findIndex((g) => g.includes(id));
  return index < 0 ? null : index + 1;
}

function snapshot() {
  state.undo.push(state.groups.map((g) => g.slice()));
}

function removeId(groups, id) {
  // Returns the index of the group that held `id` and whether that group is now gone.
  for (let i = 0; i < groups.length; i++) {
    const at = groups[i].indexOf(id);
    if (at >= 0) {
      groups[i].splice(at, 1);
      if (groups[i].length === 0) { groups.splice(i, 1); return [i, true]; }
      return [i, false];
    }
  }
  return [-1, false];
}

function pick(index, tie) {
  if (!state.task || index >= state.task.completions.length) return;
  const id = state.task.completions[index].id;
  snapshot();
  if (rankOf(id) !== null) {
    removeId(state.groups, id); // picking a ranked completion again un-ranks it
  } else if (tie && state.groups.length > 0) {
    state.groups[state.groups.length - 1].push(id);
  } else {
    state.groups.push([id]);
  }
  state.tieNext = false;
  showError("");
  render();
}

// Drag-and-drop target: {join: i} ties with group i, {insert: i} makes a new rank before group i,
// {unrank: true} removes the completion from the ranking.
function move(id, target) {
  snapshot();
  const groups = state.groups.map((g) => g.slice());
  const [from, vanished] = removeId(groups, id);
  if (target.unrank) {
    state.groups = groups;
  } else if (target.join !== undefined) {
    let to = target.join;
    if (vanished && from === to) { state.undo.pop(); return; } // dropped onto its own single-member rank
    if (vanished && from < to) to -= 1;
    groups[to].push(id);
    state.groups = groups;
  } else {
    let to = target.insert;
    if (vanished && from < to) to -= 1;
    groups.splice(to, 0, [id]);
    state.groups = groups;
  }
  showError("");
  render();
}

function undo() {
  if (!state.undo.length) return;
  state.groups = state.undo.pop();
  state.tieNext = false;
  render();
}

function clearRanking() {
  if (!state.groups.length) return;
  snapshot();
  state.groups = [];
  state.tieNext = false;
  render();
}

// ---------- rendering ----------

function buildCards() {
  const box = $("completions");
  box.replaceChildren();
  state.cards.clear();
  state.task.completions.forEach((c, index) => {
    const card = el("article", "completion");
    card.dataset.id = c.id;
    card.draggable = true;
    const header = el("header");
    header.append(el("span", "label", c.label));
    if (index < MAX_KEYS) header.append(el("span", "keys", `key ${index + 1} / ${c.label}`));
    const badge = el("span", "rank-badge");
    header.append(badge);
    const body = el("div", "body text");
    setText(body, c.text);
    card.append(header, body);
    card.addEventListener("click", (event) => {
      if (window.getSelection && String(window.getSelection()).length) return; // selecting text, not ranking
      pick(index, event.shiftKey || state.tieNext);
    });
    card.addEventListener("dragstart", (event) => {
      event.dataTransfer.setData("text/x-completion", c.id);
      event.dataTransfer.effectAllowed = "move";
      card.classList.add("dragging");
    });
    card.addEventListener("dragend", () => card.classList.remove("dragging"));
    state.cards.set(c.id, { card, badge });
    box.append(card);
  });
}

function labelOf(id) {
  const c = state.task.completions.find((x) => x.id === id);
  return c ? c.label : "?";
}

function chip(id) {
  const node = el("span", "chip", labelOf(id));
  node.draggable = true;
  node.dataset.id = id;
  node.title = "drag to move";
  node.addEventListener("dragstart", (event) => {
    event.dataTransfer.setData("text/x-completion", id);
    event.dataTransfer.effectAllowed = "move";
  });
  return node;
}

function dropZone(node, target) {
  node.addEventListener("dragover", (event) => {
    if (!event.dataTransfer.types.includes("text/x-completion")) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "move";
    node.classList.add("drop-over");
  });
  node.addEventListener("dragleave", () => node.classList.remove("drop-over"));
  node.addEventListener("drop", (event) => {
    event.preventDefault();
    node.classList.remove("drop-over");
    const id = event.dataTransfer.getData("text/x-completion");
    if (id && state.task && state.cards.has(id)) move(id, target);
  });
}

function rankClass(rank) { return rank <= 4 ? `rank-${rank}` : ""; }

function render() {
  if (!state.task) return;
  for (const [id, { card, badge }] of state.cards) {
    const rank = rankOf(id);
    card.classList.toggle("ranked", rank !== null);
    badge.className = "rank-badge " + (rank ? rankClass(rank) : "");
    const tied = rank !== null && state.groups[rank - 1].length > 1;
    badge.textContent = rank === null ? "" : `rank ${rank}${tied ? " (tie)" : ""}`;
  }
  const box = $("ranking");
  box.replaceChildren();
  state.groups.forEach((group, i) => {
    const gap = el("div", "gap");
    dropZone(gap, { insert: i });
    const row = el("div", "rank-row");
    row.dataset.rank = String(i + 1);
    const num = el("span", "num " + rankClass(i + 1), String(i + 1));
    row.append(num);
    group.forEach((id, j) => {
      if (j > 0) row.append(el("span", "tie-mark", "="));
      row.append(chip(id));
    });
    dropZone(row, { join: i });
    box.append(gap, row);
  });
  const endGap = el("div", "gap");
  dropZone(endGap, { insert: state.groups.length });
  box.append(endGap);
  const unranked = state.task.completions.filter((c) => rankOf(c.id) === null);
  const rest = el("div", "rank-row unranked");
  rest.append(el("span", "num", unranked.length ? "Unranked:" : "All ranked. Drop here to un-rank."));
  unranked.forEach((c) => rest.append(chip(c.id)));
  dropZone(rest, { unrank: true });
  box.append(rest);
  $("tie-indicator").hidden = !state.tieNext;
  $("undo").disabled = !state.undo.length;
  $("submit").disabled = state.busy || unranked.length > 0;
}

// ---------- submitting ----------

async function submit() {
  if (!state.task || state.busy) return;
  const unranked = state.task.completions.filter((c) => rankOf(c.id) === null);
  if (unranked.length) {
    showError(`Rank every completion first (${unranked.map((c) => c.label).join(", ")} left).`);
    return;
  }
  if (state.groups.length < 2) {
    showError("All completions tie: that says nothing. Rank them, or skip the task.");
    return;
  }
  const ranks = {};
  state.groups.forEach((group, i) => group.forEach((id) => { ranks[id] = i + 1; }));
  state.busy = true;
  render();
  try {
    const result = await api("POST", "api/rankings",
      { task_id: state.task.id, ranks, request_id: state.requestId,
        seconds: Math.round((performance.now() - state.openedAt) / 100) / 10 });
    setProgress(result.progress);
    toast(state.editing ? "Ranking updated." : "Ranking saved.");
    state.busy = false;
    refreshHistory();
    await loadNext();
  } catch (err) {
    state.busy = false;
    render();
    if (err.status !== 401) showError(err.message);
  }
}

async function skip(event) {
  if (event) event.preventDefault();
  if (!state.task || state.busy) return;
  state.busy = true;
  try {
    const result = await api("POST", "api/skip",
      { task_id: state.task.id, reason: $("skip-reason").value, request_id: "skip-" + state.requestId });
    setProgress(result.progress);
    $("skip-reason").value = "";
    $("skip-reason").blur();
    toast("Task skipped.");
    state.busy = false;
    refreshHistory();
    await loadNext();
  } catch (err) {
    state.busy = false;
    if (err.status !== 401) showError(err.message);
  }
}

// ---------- panels ----------

function togglePanel(panelId, buttonId, onOpen) {
  const panel = $(panelId);
  panel.hidden = !panel.hidden;
  $(buttonId).setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden && onOpen) onOpen();
  if (!panel.hidden) panel.scrollIntoView({ block: "nearest" });
}

async function loadHistory() {
  const list = $("history-list");
  try {
    const data = await api("GET", "api/history");
    list.replaceChildren();
    if (!data.items.length) list.append(el("li", "muted", "Nothing yet."));
    for (const item of data.items) {
      const li = el("li");
      const button = el("button");
      button.type = "button";
      button.dataset.taskId = item.task_id;
      button.append(el("span", "status " + item.status, item.status));
      const preview = el("span", "preview text");
      setText(preview, item.prompt.replace(/\s+/g, " ").slice(0, 200));
      button.append(preview);
      if (item.at) button.append(el("span", "muted", new Date(item.at * 1000).toLocaleString()));
      button.addEventListener("click", () => loadForEdit(item.task_id));
      li.append(button);
      list.append(li);
    }
  } catch (err) {
    if (err.status !== 401) toast(err.message, true);
  }
}

function refreshHistory() {
  if (!$("history-panel").hidden) loadHistory();
}

async function loadStats() {
  try {
    const data = await api("GET", "api/stats");
    $("stats").textContent = data.text;
  } catch (err) {
    if (err.status !== 401) $("stats").textContent = err.message;
  }
}

// ---------- keyboard ----------

function completionIndexForKey(event) {
  const code = event.code || "";
  let match = /^(?:Digit|Numpad)([1-9])$/.exec(code);
  if (match) return Number(match[1]) - 1;
  match = /^Key([A-I])$/.exec(code);
  if (match) return match[1].charCodeAt(0) - 65;
  return -1;
}

function onKeyDown(event) {
  if ($("rank-view").hidden || !state.task) return;
  const target = event.target;
  if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.isContentEditable)) {
    if (event.key === "Escape") target.blur();
    return; // typing a skip reason; Enter there submits the skip form
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const index = completionIndexForKey(event);
  if (index >= 0 && index < state.task.completions.length) {
    event.preventDefault();
    pick(index, event.shiftKey || state.tieNext);
    return;
  }
  switch (event.key) {
    case "=": case "+":
      event.preventDefault();
      state.tieNext = !state.tieNext;
      render();
      break;
    case "u": case "U": case "Backspace":
      event.preventDefault();
      undo();
      break;
    case "Escape":
      clearRanking();
      break;
    case "Enter":
      if (target && target.tagName === "BUTTON") return; // let a focused button do its own thing
      event.preventDefault();
      submit();
      break;
    case "s": case "S":
      event.preventDefault();
      $("skip-reason").focus();
      break;
    case "?":
      togglePanel("guidelines-panel", "toggle-guidelines");
      break;
    default:
  }
}

// ---------- start ----------

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", onLogin);
  $("logout").addEventListener("click", onLogout);
  $("submit").addEventListener("click", submit);
  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", clearRanking);
  $("skip-form").addEventListener("submit", skip);
  $("back-to-queue").addEventListener("click", loadNext);
  $("show-queue").addEventListener("click", loadNext);
  $("toggle-history").addEventListener("click", () => togglePanel("history-panel", "toggle-history", loadHistory));
  $("toggle-guidelines").addEventListener("click", () => togglePanel("guidelines-panel", "toggle-guidelines"));
  $("toggle-stats").addEventListener("click", () => togglePanel("stats-panel", "toggle-stats", loadStats));
  document.addEventListener("keydown", onKeyDown);
  try {
    const response = await fetch("api/session", { credentials: "same-origin" });
    if (response.ok) startSession(await response.json());
    else showLogin("");
  } catch (err) {
    showLogin("Cannot reach the server.");
  }
});
