// The ranker widget of the Gradio labeling UI: the body of the gr.HTML component's `js_on_load`
// (labeling/gradio_ui.py), run with `element` (the widget's root), `trigger(event, data)` (sends an event
// to the Python handlers), `props` (props.value: the JSON view the server sent) and `watch`.
//
// Model output is untrusted: every prompt, turn and completion goes into the page as Markdown rendered by
// markdown.js (elements made one by one, text set with textContent, never parsed as HTML), and the HTML
// template holds no data. The widget keeps no authority: the server knows who is signed in and re-checks
// every ranking against the task's real completion ids.
"use strict";

const MAX_KEYS = 9; // completions 1-9 / A-I have keyboard shortcuts; more can be clicked or dragged
const q = (cls) => element.querySelector("." + cls);

const state = {
  task: null,        // {id, prompt, completions: [{id, label, text}]} in this annotator's display order
  groups: [],        // ranking being built: groups[i] = completion ids sharing rank i + 1 (ties)
  undo: [],          // snapshots of `groups` before each change
  tieNext: false,    // "=" was pressed: the next pick ties with the last rank
  editing: false,    // the task came from the history, not the queue
  requestId: null,   // one id per answer attempt, so a re-sent submit is stored once
  openedAt: 0,       // when the task was shown: the time spent is stored with the ranking
  busy: false,       // a submit or skip is on its way; the server's answer clears it
  cards: new Map(),  // completion id -> {card, badge, body} (built once per task to keep scroll positions)
  diff: false,       // "Highlight differences" is on (kept from task to task)
  ask: null,         // {id, row}: a completion dropped on a rank row, waiting for "tie or insert"
  guide: false,      // the guidelines panel is open: the task waits until the annotator has read them
  opened: "[]",      // the groups the task opened with (JSON): a ranking that differs is kept as a draft
  sent: null,        // the task whose submit or skip is on its way: its draft goes once the server answers
  flags: [],         // the flags the server accepts (its toggles, in this order)
  flagged: new Set(),// the flags set on the open task
  skipping: false,   // the comment box was opened by S: Enter there skips (else it submits)
};

function newRequestId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

let toastTimer = null;
function toast(message) {
  const box = q("rk-toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, 2500);
}

function showError(message) { q("rk-error").textContent = message || ""; }

// Undo of the last submit or skip, for a short while: the task opens again with the stored answer, to be
// changed (an edit, in the event log) or, after a skip, ranked after all.
const UNDO_MS = 10000;
let undoTimer = null;
let undoTask = null;
function offerUndo(taskId) {
  undoTask = taskId;
  q("rk-undo-answer").hidden = false;
  clearTimeout(undoTimer);
  undoTimer = setTimeout(withdrawUndo, UNDO_MS);
}

function withdrawUndo() {
  clearTimeout(undoTimer);
  undoTask = null;
  q("rk-undo-answer").hidden = true;
}

function undoAnswer() {
  if (!undoTask || state.busy) return;
  const taskId = undoTask;
  withdrawUndo();
  send("reopen", { task_id: taskId });
}

let view = "loading";
function showView(name) {
  view = name;
  const waiting = state.guide; // the guidelines come first
  q("rk-loading").hidden = waiting || name !== "loading";
  q("rk-done").hidden = waiting || name !== "done";
  q("rk-layout").hidden = waiting || name !== "task";
  q("rk-bar").hidden = waiting || name !== "task";
  if (name !== "task") q("rk-banner").hidden = true;
}

// ---------- the guidelines: shown before the first task, and again when they change ----------

// The panel (#guide-panel, rendered by Gradio from the owner's guidelines) is shown until its "start" button
// is pressed; the browser remembers which version (a hash of the text) was read.
const GUIDE_KEY = "rlhf-label-guidelines-read";

function textHash(text) { // FNV-1a, 32 bits: tells versions apart, nothing more
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) { h ^= text.charCodeAt(i); h = Math.imul(h, 0x01000193) >>> 0; }
  return h.toString(16);
}

function storedGuide() {
  try { return window.localStorage.getItem(GUIDE_KEY); } catch (err) { return null; }
}

function checkGuidelines(tries = 0) {
  const panel = document.getElementById("guide-panel");
  const text = document.getElementById("guide-text");
  if (!panel || !text) { // no guidelines, or Gradio has not drawn the panel yet
    if (tries < 50) setTimeout(() => checkGuidelines(tries + 1), 100);
    return;
  }
  const version = textHash(text.textContent);
  const read = storedGuide();
  if (read === version) return;
  state.guide = true;
  document.body.classList.add("rk-guide-open"); // (on the body: Gradio redraws the panel's own classes)
  const changed = document.getElementById("guide-changed");
  if (changed) changed.hidden = !read;
  showView(view);
  // Listened to on the document: Gradio may draw its button anew.
  document.addEventListener("click", function onRead(event) {
    if (!event.target.closest || !event.target.closest("#guide-ok")) return;
    document.removeEventListener("click", onRead);
    try { window.localStorage.setItem(GUIDE_KEY, version); } catch (err) { /* not remembered: shown again */ }
    state.guide = false;
    document.body.classList.remove("rk-guide-open");
    showView(view);
    if (view === "task") openedScroll(false);
  });
  panel.scrollIntoView({ block: "start" });
  const ok = document.getElementById("guide-ok");
  if (ok) ok.focus();
}

// ---------- the server's view ----------

function receive(raw) {
  if (!raw) return;
  let answer;
  try { answer = JSON.parse(raw); } catch (err) { return; }
  state.busy = false;
  clearTimeout(watchdog);
  const answered = state.sent;
  state.sent = null;
  if (answer.keep) {
    // The server refused an answer (or could not store it): keep the annotator's work and say why.
    if (state.task) { showError(answer.error); render(); } else { toast(answer.error); }
    return;
  }
  if (answered) drafts.remove(answered); // stored (or refused for good): the draft has served
  if (answer.notice) toast(answer.notice);
  if (answered && answer.notice) offerUndo(answered); else withdrawUndo();
  if (answer.error) showError(answer.error);
  if (!answer.task) {
    state.task = null;
    showView("done");
    return;
  }
  if (Array.isArray(answer.flags)) setFlagNames(answer.flags);
  openTask(answer.task, answer.own, !!answer.editing, answer.draft, answer.notes);
  if (answer.error) showError(answer.error);
}

// ---------- the annotator's comment and flags (sent with the submit or the skip) ----------

// The toggles, one button per flag the server accepts (names set as text); built again only when they change.
function setFlagNames(names) {
  const wanted = names.filter((n) => typeof n === "string");
  if (JSON.stringify(wanted) === JSON.stringify(state.flags)) return;
  state.flags = wanted;
  const box = q("rk-flags");
  box.querySelectorAll(".rk-flag").forEach((node) => node.remove());
  for (const name of wanted) {
    const button = el("button", "rk-flag", name);
    button.type = "button";
    button.dataset.flag = name;
    button.setAttribute("aria-pressed", "false");
    button.addEventListener("click", () => {
      if (state.flagged.has(name)) state.flagged.delete(name); else state.flagged.add(name);
      showFlags();
    });
    box.append(button);
  }
  box.hidden = !wanted.length;
}

function showFlags() {
  q("rk-flags").querySelectorAll(".rk-flag").forEach((button) => {
    button.setAttribute("aria-pressed", String(state.flagged.has(button.dataset.flag)));
  });
}

// A task opens with the annotator's own comment and flags on it (their ranking's or skip's), else none.
function showNotes(notes) {
  const given = notes && typeof notes === "object" ? notes : {};
  q("rk-comment").value = typeof given.comment === "string" ? given.comment : "";
  state.flagged = new Set(Array.isArray(given.flags) ? given.flags.filter((f) => state.flags.includes(f)) : []);
  showFlags();
}

function notesToSend() {
  return { comment: q("rk-comment").value, flags: state.flags.filter((f) => state.flagged.has(f)) };
}

const COMMENT_HINT = q("rk-comment").placeholder;
function startSkipping() { // S: the comment box takes the reason, Enter skips
  state.skipping = true;
  q("rk-comment").placeholder = "Why skip? Enter skips, Esc goes back";
  q("rk-comment").focus();
}

function stopSkipping() {
  state.skipping = false;
  q("rk-comment").placeholder = COMMENT_HINT;
}

// A new task opens with its prompt in view: on a phone the last one was answered far down the page.
function openedScroll(force) {
  const top = q("rk-layout").getBoundingClientRect().top;
  if (force || top < 0 || top > window.innerHeight / 2) element.scrollIntoView({ block: "start" });
}

// Ranks {completion id: rank} (1 best; a partial ranking may leave completions out) as groups, best first.
function groupsOf(task, ranks) {
  const byRank = new Map();
  for (const c of task.completions) {
    const rank = ranks[c.id];
    if (!Number.isInteger(rank)) continue;
    if (!byRank.has(rank)) byRank.set(rank, []);
    byRank.get(rank).push(c.id);
  }
  return [...byRank.keys()].sort((a, b) => a - b).map((r) => byRank.get(r));
}

function openTask(task, own, editing, serverDraft, notes) {
  state.task = task;
  state.editing = editing;
  state.undo = [];
  state.tieNext = false;
  state.ask = null;
  state.requestId = newRequestId();
  state.openedAt = performance.now();
  state.groups = [];
  if (own && own.ranks) state.groups = groupsOf(task, own.ranks); // the stored ranks (dense, 1 best)
  state.opened = JSON.stringify(state.groups);
  drafts.restore(task.id, serverDraft && typeof serverDraft === "object" ? groupsOf(task, serverDraft) : null);
  q("rk-banner").hidden = !editing;
  q("rk-task-id").textContent = task.id;
  showPrompt(task.prompt);
  showNotes(notes);
  buildCards();
  showError("");
  showView("task");
  render();
  if (editing) {
    // Opened from the history list: give the keyboard back to the ranker (and close the list).
    if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
  }
  if (!state.guide) openedScroll(editing);
}

// ---------- drafts: a half-done ranking survives a reload, a sign-out and an ended session ----------

// Sent to the server (POST api/draft, shortly after each change), which hands it back with the task after a
// reload or a new sign-in, on any device, until the task is submitted or skipped. This browser's storage keeps
// a copy per annotator and task, written at every change, for the changes the server could not take (the
// session had ended, the network was down); it is removed once the server has answered the submit or skip.
// Only completion ids of the open task are taken back.
const drafts = (() => {
  const PREFIX = "rlhf-label-draft\u0000";
  const MAX_AGE_MS = 14 * 24 * 3600 * 1000;
  let annotator = null;
  let storage = null;
  try { storage = window.localStorage; } catch (err) { /* no storage: no copy in this browser */ }
  const key = (taskId) => PREFIX + annotator + "\u0000" + taskId;
  let server = null;      // {taskId, groups}: the server's draft of the open task, until it is applied
  let uploaded = null;    // {taskId, json}: what the server holds of the open task's draft ("[]": nothing)
  let uploadTimer = null;

  function valid(groups, task) {
    const ids = new Set(task.completions.map((c) => c.id));
    const seen = new Set();
    return Array.isArray(groups) && groups.every((g) => Array.isArray(g) && g.length > 0 && g.every(
      (id) => typeof id === "string" && ids.has(id) && !seen.has(id) && seen.add(id)));
  }

  function local(taskId) {
    if (!storage || annotator === null) return null;
    try { return JSON.parse(storage.getItem(key(taskId))); } catch (err) { return null; }
  }

  function keepLocal(taskId, groups, synced) {
    if (!storage || annotator === null) return;
    try {
      if (groups === null) storage.removeItem(key(taskId));
      else storage.setItem(key(taskId), JSON.stringify({ groups, at: Date.now(), synced }));
    } catch (err) { /* storage full or refused: no copy here */ }
  }

  // The draft to take back: this browser's copy if the server never got it (its last change came after the
  // session had ended, or while offline), else the server's.
  function restore(taskId, serverGroups) {
    if (serverGroups !== undefined) {
      server = serverGroups && serverGroups.length ? { taskId, groups: serverGroups } : null;
      uploaded = { taskId, json: JSON.stringify(server ? server.groups : []) };
    }
    if (!state.task || state.task.id !== taskId || state.undo.length) return;
    const mine = local(taskId);
    let groups = mine && !mine.synced ? mine.groups : null;
    if (!groups && server && server.taskId === taskId) groups = server.groups;
    if (!groups || !valid(groups, state.task) || JSON.stringify(groups) === state.opened) return;
    server = null;
    state.undo = [JSON.parse(state.opened)]; // Undo goes back to how the task opened
    state.groups = groups;
    render();
    toast("Your unsent ranking of this task is back.");
  }

  function upload(taskId, groups) { // to the server, once the annotator pauses
    clearTimeout(uploadTimer);
    uploadTimer = setTimeout(() => {
      if (!state.task || state.task.id !== taskId || state.sent === taskId) return; // answered meanwhile
      const json = JSON.stringify(groups);
      const ranks = {}; // (back to how the task opened: {} removes the draft)
      if (json !== state.opened) groups.forEach((g, i) => g.forEach((id) => { ranks[id] = i + 1; }));
      fetch("api/draft", { method: "POST", credentials: "same-origin",
                           headers: { "Content-Type": "application/json" },
                           body: JSON.stringify({ task_id: taskId, ranks }) })
        .then((response) => {
          if (!response.ok) return;
          uploaded = { taskId, json: json === state.opened ? "[]" : json };
          const mine = local(taskId);
          if (mine && JSON.stringify(mine.groups) === json) keepLocal(taskId, groups, true);
        })
        .catch(() => { /* this browser keeps it */ });
    }, 700);
  }

  // At every change: this browser's copy now, the server's shortly after.
  function save() {
    if (!state.task) return;
    const taskId = state.task.id;
    const json = JSON.stringify(state.groups);
    const held = uploaded && uploaded.taskId === taskId ? uploaded.json : "[]";
    if (json !== held && !(json === state.opened && held === "[]")) upload(taskId, state.groups.map((g) => g.slice()));
    const mine = local(taskId);
    if (json === state.opened) keepLocal(taskId, null);
    else if (!mine || JSON.stringify(mine.groups) !== json) keepLocal(taskId, state.groups, false);
  }

  function remove(taskId) { keepLocal(taskId, null); }

  function prune() { // copies of tasks never answered here: gone after two weeks
    const now = Date.now();
    for (let i = storage.length - 1; i >= 0; i--) {
      const name = storage.key(i);
      if (!name || !name.startsWith(PREFIX)) continue;
      let at = 0;
      try { at = JSON.parse(storage.getItem(name)).at || 0; } catch (err) { /* unreadable: old */ }
      if (now - at > MAX_AGE_MS) storage.removeItem(name);
    }
  }

  // Whose copies: the signed-in annotator, from the server (the page may be shared by several people in turn).
  if (storage) {
    fetch("api/session", { credentials: "same-origin" })
      .then((response) => (response.ok ? response.json() : null))
      .then((info) => {
        if (!info || typeof info.annotator !== "string") return;
        annotator = info.annotator;
        try { prune(); } catch (err) { /* storage refused */ }
        if (state.task && state.undo.length) save(); // ranked before this answer came
        else if (state.task) restore(state.task.id);
      })
      .catch(() => { /* offline: no copy in this browser this time */ });
  }
  return { restore, save, remove };
})();

// ---------- ranking state ----------

function rankOf(id) {
  const index = state.groups.findIndex((g) => g.includes(id));
  return index < 0 ? null : index + 1;
}

function snapshot() {
  state.undo.push(state.groups.map((g) => g.slice()));
  state.ask = null;
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
  state.ask = null;
  if (!state.undo.length) { render(); return; }
  state.groups = state.undo.pop();
  state.tieNext = false;
  render();
}

function clearRanking() {
  state.ask = null;
  if (!state.groups.length) { render(); return; }
  snapshot();
  state.groups = [];
  state.tieNext = false;
  render();
}

// ---------- rendering ----------

function buildCards() {
  const box = q("rk-completions");
  box.replaceChildren();
  state.cards.clear();
  state.task.completions.forEach((c, index) => {
    const card = el("article", "rk-card");
    card.dataset.id = c.id;
    card.draggable = true;
    card.tabIndex = 0; // reachable by Tab; Enter or Space picks it (Shift: tie)
    const header = el("header");
    header.append(el("span", "rk-label", c.label));
    if (index < MAX_KEYS) header.append(el("span", "rk-key", `key ${index + 1} / ${c.label}`));
    const badge = el("span", "rk-badge");
    header.append(badge);
    const body = el("div", "rk-body rk-text");
    renderMarkdown(body, c.text);
    card.append(header, body);
    card.addEventListener("click", (event) => {
      if (window.getSelection && String(window.getSelection()).length) return; // selecting text, not ranking
      pick(index, event.shiftKey || state.tieNext);
      if (event.detail > 0) card.blur(); // clicked, not reached by Tab: Enter submits again
    });
    card.addEventListener("dragstart", (event) => {
      startDrag(event, c.id);
      card.classList.add("rk-dragging");
    });
    card.addEventListener("dragend", () => { card.classList.remove("rk-dragging"); endDrag(); });
    state.cards.set(c.id, { card, badge, body });
    box.append(card);
  });
  showDifferences();
}

// ---------- the prompt: a string, or a conversation ----------

const ROLE_NAMES = { system: "System", user: "User", assistant: "Assistant" };
const LONG_HISTORY = { turns: 4, chars: 1500 }; // this many earlier turns, or characters of them: shown folded

function turnNode(message) {
  const role = Object.hasOwn(ROLE_NAMES, message.role) ? message.role : "unknown";
  const turn = el("section", "rk-turn rk-turn-" + role);
  const body = el("div", "rk-turn-body rk-text");
  renderMarkdown(body, String(message.content));
  turn.append(el("div", "rk-role rk-role-" + role, ROLE_NAMES[role] || "?"), body);
  return turn;
}

// A conversation ends in the user turn the completions answer: that turn is always shown, right above them;
// the earlier ones (system message included) sit in a collapsible panel that scrolls within a bounded height.
function showPrompt(prompt) {
  const conversation = Array.isArray(prompt) && prompt.length > 0;
  const turns = conversation ? prompt : [{ role: "user", content: String(prompt) }];
  const earlier = turns.slice(0, -1);
  q("rk-prompt-title").textContent = earlier.length ? "Conversation" : "Prompt";
  q("rk-prompt-role").hidden = !conversation;
  renderMarkdown(q("rk-prompt"), String(turns[turns.length - 1].content));
  const panel = q("rk-earlier");
  const list = q("rk-turns");
  list.replaceChildren(...earlier.map(turnNode));
  panel.hidden = earlier.length === 0;
  q("rk-earlier-count").textContent = `${earlier.length} earlier turn${earlier.length === 1 ? "" : "s"}`;
  const chars = earlier.reduce((sum, turn) => sum + String(turn.content).length, 0);
  panel.open = earlier.length < LONG_HISTORY.turns && chars < LONG_HISTORY.chars;
}

// ---------- highlight differences ----------

function showDifferences() {
  const toggle = q("rk-diff-toggle");
  const note = q("rk-diff-note");
  const count = state.task ? state.task.completions.length : 0;
  toggle.setAttribute("aria-pressed", String(state.diff));
  toggle.hidden = count < 2;
  note.hidden = !state.diff || count < 2;
  if (!state.diff || count < 2) return;
  const bodies = state.task.completions.map((c) => state.cards.get(c.id).body);
  const tooLong = highlightDifferences(bodies);
  const first = state.task.completions[0].label;
  note.textContent = (count > 2 ? `marked: words that ${first} lacks` : "marked: words the other lacks")
    + (tooLong ? ` (${tooLong} too long to compare word by word)` : "");
}

function toggleDifferences() {
  state.diff = !state.diff;
  if (!state.task) return;
  if (!state.diff) { // back to the plain rendering
    for (const c of state.task.completions) renderMarkdown(state.cards.get(c.id).body, c.text);
  }
  showDifferences();
}

function labelOf(id) {
  const c = state.task.completions.find((x) => x.id === id);
  return c ? c.label : "?";
}

function chip(id) {
  const node = el("span", "rk-chip", labelOf(id));
  node.draggable = true;
  node.dataset.id = id;
  node.title = "drag to move";
  node.addEventListener("dragstart", (event) => startDrag(event, id));
  node.addEventListener("dragend", endDrag);
  return node;
}

// While something is dragged, the places between ranks grow to drop targets of 32 px (at rest they are thin,
// so that the ranking stays short). The class is set after dragstart: changing the page during dragstart
// itself can cancel the drag.
function startDrag(event, id) {
  event.dataTransfer.setData("text/x-completion", id);
  event.dataTransfer.effectAllowed = "move";
  state.ask = null;
  setTimeout(() => element.classList.add("rk-dragging-now"), 0);
}

function endDrag() { element.classList.remove("rk-dragging-now"); }

// A completion dropped on a rank row: tie with that rank, or a new rank just above or below it.
function askTieOrInsert(id, row) {
  const group = state.groups[row];
  if (!group || (group.length === 1 && group[0] === id)) return; // onto its own single-member rank
  state.ask = { id, row };
  render();
}

function askNode() {
  const { id, row } = state.ask;
  const box = el("div", "rk-ask");
  box.setAttribute("role", "group");
  box.setAttribute("aria-label", `Where to put ${labelOf(id)}`);
  box.append(el("span", "rk-ask-text", `Put ${labelOf(id)}:`));
  const option = (cls, text, target) => {
    const button = el("button", cls, text);
    button.type = "button";
    button.addEventListener("click", () => { state.ask = null; move(id, target); });
    box.append(button);
  };
  if (!state.groups[row].includes(id)) option("rk-ask-tie", `tie with rank ${row + 1}`, { join: row });
  option("rk-ask-above", "new rank above", { insert: row });
  option("rk-ask-below", "new rank below", { insert: row + 1 });
  const cancel = el("button", "rk-ask-cancel rk-link", "cancel");
  cancel.type = "button";
  cancel.addEventListener("click", () => { state.ask = null; render(); });
  box.append(cancel);
  return box;
}

function dropZone(node, target) {
  node.addEventListener("dragover", (event) => {
    if (!event.dataTransfer.types.includes("text/x-completion")) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "move";
    node.classList.add("rk-over");
  });
  node.addEventListener("dragleave", () => node.classList.remove("rk-over"));
  node.addEventListener("drop", (event) => {
    event.preventDefault();
    node.classList.remove("rk-over");
    endDrag();
    const id = event.dataTransfer.getData("text/x-completion");
    if (!id || !state.task || !state.cards.has(id)) return;
    if (target.join !== undefined) askTieOrInsert(id, target.join);
    else move(id, target);
  });
}

function rankClass(rank) { return rank <= 4 ? ` rk-r${rank}` : ""; }

function render() {
  if (!state.task) return;
  for (const [id, { card, badge }] of state.cards) {
    const rank = rankOf(id);
    card.classList.toggle("rk-ranked", rank !== null);
    badge.className = "rk-badge" + (rank ? rankClass(rank) : "");
    const tied = rank !== null && state.groups[rank - 1].length > 1;
    badge.textContent = rank === null ? "" : `rank ${rank}${tied ? " (tie)" : ""}`;
  }
  const box = q("rk-ranking");
  box.replaceChildren();
  state.groups.forEach((group, i) => {
    const gap = el("div", "rk-gap");
    dropZone(gap, { insert: i });
    const row = el("div", "rk-row");
    row.dataset.rank = String(i + 1);
    row.append(el("span", "rk-num" + rankClass(i + 1), String(i + 1)));
    group.forEach((id, j) => {
      if (j > 0) row.append(el("span", "rk-tie-mark", "="));
      row.append(chip(id));
    });
    dropZone(row, { join: i });
    box.append(gap, row);
    if (state.ask && state.ask.row === i) box.append(askNode());
  });
  const endGap = el("div", "rk-gap");
  dropZone(endGap, { insert: state.groups.length });
  box.append(endGap);
  const unranked = state.task.completions.filter((c) => rankOf(c.id) === null);
  const rest = el("div", "rk-row rk-unranked");
  rest.append(el("span", "rk-num", unranked.length ? "Unranked:" : "All ranked. Drop here to un-rank."));
  unranked.forEach((c) => rest.append(chip(c.id)));
  dropZone(rest, { unrank: true });
  box.append(rest);
  drafts.save();
  q("rk-tie").hidden = !state.tieNext;
  for (const name of ["rk-tie-button", "rk-bar-tie"]) q(name).setAttribute("aria-pressed", String(state.tieNext));
  q("rk-undo").disabled = !state.undo.length;
  q("rk-submit").disabled = state.busy || unranked.length > 0;
  q("rk-bar-submit").disabled = q("rk-submit").disabled;
  q("rk-bar-skip").disabled = state.busy;
  // The phone's action bar sums the ranking up: "B > A = C", and what is left to rank.
  const summary = state.groups.map((g) => g.map(labelOf).join(" = ")).join(" > ");
  q("rk-bar-summary").textContent = (summary || "Tap the best")
    + (unranked.length && summary ? ` (${unranked.length} more)` : "");
  if (state.ask) {
    const first = box.querySelector(".rk-ask button");
    if (first && !box.contains(document.activeElement)) first.focus({ preventScroll: true });
  }
}

function toggleTie() {
  state.tieNext = !state.tieNext;
  render();
}

// ---------- submitting (the Python handlers answer with a new props.value) ----------

// Gradio drops an event whose session has ended (e.g. after a server restart) without telling the widget,
// and one the server refused (over the annotator's request budget: Gradio shows the server's message), so a
// send that gets no answer in 4 s checks the session: signed out -> the sign-in page; otherwise let the
// annotator send again (the same request id: the server stores it once, also if the first answer comes late).
let watchdog = null;
function send(event, data) {
  state.busy = true;
  render();
  trigger(event, data);
  clearTimeout(watchdog);
  watchdog = setTimeout(async () => {
    try {
      const response = await fetch("api/session", { credentials: "same-origin" });
      if (response.status === 401) { // signed out elsewhere, or the session expired: a link to sign in
        state.busy = false;
        showError("");
        q("rk-session").hidden = false;
        q("rk-session-link").focus();
        render();
        return;
      }
    } catch (err) { /* the server is unreachable: say so below */ }
    state.busy = false;
    showError("No answer from the server yet; your answer may not be saved. Try again.");
    render();
  }, 4000);
}

function submit() {
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
  state.sent = state.task.id;
  const { comment, flags } = notesToSend();
  send("submit", { task_id: state.task.id, ranks, request_id: state.requestId, comment, flags,
                   seconds: Math.round((performance.now() - state.openedAt) / 100) / 10 });
}

function skip() {
  if (!state.task || state.busy) return;
  state.sent = state.task.id;
  const { comment, flags } = notesToSend();
  send("skip", { task_id: state.task.id, reason: comment, flags, request_id: "skip-" + state.requestId });
  q("rk-comment").blur();
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

function toggleGuidelines() {
  const header = document.querySelector("#guidelines .label-wrap, #guidelines button");
  if (header) header.click();
}

function onKeyDown(event) {
  if (q("rk-layout").hidden || !state.task || !element.isConnected) return;
  const target = event.target;
  if (state.ask && event.key === "Escape") { // the tie-or-insert question: cancelled
    event.preventDefault();
    state.ask = null;
    render();
    return;
  }
  const onCard = target && target.classList && target.classList.contains("rk-card");
  if (onCard && (event.key === "Enter" || event.key === " ")) {
    // A card reached by Tab (a clicked card gives its focus up: Enter submits).
    event.preventDefault();
    const index = state.task.completions.findIndex((c) => c.id === target.dataset.id);
    if (index >= 0) pick(index, event.shiftKey || state.tieNext);
    return;
  }
  if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT"
                 || target.isContentEditable)) {
    if (event.key === "Escape") target.blur();
    if (event.key === "Enter" && !event.shiftKey && target === q("rk-comment")) { // Shift+Enter: a new line
      event.preventDefault();
      if (state.skipping) skip(); else submit();
    }
    return; // typing in a field (the comment, the history search)
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
      toggleTie();
      break;
    case "u": case "U": case "Backspace":
      event.preventDefault();
      undo();
      break;
    case "Escape":
      clearRanking();
      break;
    case "Enter":
      if (target && (target.tagName === "BUTTON" || target.tagName === "SUMMARY")) return; // its own action
      event.preventDefault();
      submit();
      break;
    case "s": case "S":
      event.preventDefault();
      startSkipping();
      break;
    case "?":
      toggleGuidelines();
      break;
    default:
  }
}

// ---------- start ----------

// Gradio's page keeps 32 px on each side, a sixth of a phone's width; the cards get most of it back. (Set here:
// the Blocks' css only reaches inside the page's content.)
function narrowMargins() {
  const page = element.closest(".app");
  if (page) { page.style.paddingLeft = page.style.paddingRight = "clamp(6px, 3vw, 32px)"; }
}
narrowMargins();

q("rk-submit").addEventListener("click", submit);
q("rk-bar-submit").addEventListener("click", submit);
q("rk-undo-answer").addEventListener("click", undoAnswer);
q("rk-bar-skip").addEventListener("click", skip);
for (const name of ["rk-tie-button", "rk-bar-tie"]) q(name).addEventListener("click", toggleTie);
q("rk-undo").addEventListener("click", undo);
q("rk-clear").addEventListener("click", clearRanking);
q("rk-skip").addEventListener("submit", (event) => { event.preventDefault(); skip(); });
q("rk-comment").addEventListener("blur", stopSkipping);
q("rk-back").addEventListener("click", () => { if (!state.busy) send("back", {}); });
q("rk-earlier").addEventListener("toggle", () => { // opened: the most recent turns in view, next to the last
  if (q("rk-earlier").open) q("rk-turns").scrollTop = q("rk-turns").scrollHeight;
});
q("rk-diff-toggle").addEventListener("click", (event) => {
  toggleDifferences();
  event.currentTarget.blur(); // Enter submits again, not toggles
});
document.addEventListener("keydown", onKeyDown);
watch("value", () => receive(props.value));
receive(props.value);
checkGuidelines();
