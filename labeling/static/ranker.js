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

function showView(name) {
  q("rk-loading").hidden = name !== "loading";
  q("rk-done").hidden = name !== "done";
  q("rk-layout").hidden = name !== "task";
  if (name !== "task") q("rk-banner").hidden = true;
}

// ---------- the server's view ----------

function receive(raw) {
  if (!raw) return;
  let view;
  try { view = JSON.parse(raw); } catch (err) { return; }
  state.busy = false;
  clearTimeout(watchdog);
  if (view.keep) {
    // The server refused an answer (or could not store it): keep the annotator's work and say why.
    if (state.task) { showError(view.error); render(); } else { toast(view.error); }
    return;
  }
  if (view.notice) toast(view.notice);
  if (view.error) showError(view.error);
  if (!view.task) {
    state.task = null;
    showView("done");
    return;
  }
  openTask(view.task, view.own, !!view.editing);
  if (view.error) showError(view.error);
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
  q("rk-banner").hidden = !editing;
  q("rk-task-id").textContent = task.id;
  showPrompt(task.prompt);
  q("rk-skip-reason").value = "";
  buildCards();
  showError("");
  showView("task");
  render();
  if (editing) {
    // Opened from the history list: give the keyboard back to the ranker (and close the list).
    if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
    element.scrollIntoView({ block: "start" });
  }
}

// ---------- ranking state ----------

function rankOf(id) {
  const index = state.groups.findIndex((g) => g.includes(id));
  return index < 0 ? null : index + 1;
}

function snapshot() { state.undo.push(state.groups.map((g) => g.slice())); }

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
  const box = q("rk-completions");
  box.replaceChildren();
  state.cards.clear();
  state.task.completions.forEach((c, index) => {
    const card = el("article", "rk-card");
    card.dataset.id = c.id;
    card.draggable = true;
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
    });
    card.addEventListener("dragstart", (event) => {
      event.dataTransfer.setData("text/x-completion", c.id);
      event.dataTransfer.effectAllowed = "move";
      card.classList.add("rk-dragging");
    });
    card.addEventListener("dragend", () => card.classList.remove("rk-dragging"));
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
    node.classList.add("rk-over");
  });
  node.addEventListener("dragleave", () => node.classList.remove("rk-over"));
  node.addEventListener("drop", (event) => {
    event.preventDefault();
    node.classList.remove("rk-over");
    const id = event.dataTransfer.getData("text/x-completion");
    if (id && state.task && state.cards.has(id)) move(id, target);
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
  q("rk-tie").hidden = !state.tieNext;
  q("rk-undo").disabled = !state.undo.length;
  q("rk-submit").disabled = state.busy || unranked.length > 0;
}

// ---------- submitting (the Python handlers answer with a new props.value) ----------

// Gradio drops an event whose session has ended (e.g. after a server restart) without telling the widget,
// so a send that gets no answer checks the session: signed out -> the sign-in page; otherwise, after a
// longer wait, let the annotator send again (the same request id: the server stores it once).
let watchdog = null;
function send(event, data) {
  state.busy = true;
  render();
  trigger(event, data);
  clearTimeout(watchdog);
  watchdog = setTimeout(async () => {
    try {
      const response = await fetch("api/session", { credentials: "same-origin" });
      if (response.status === 401) {
        showError("Your session ended: sign in again (this answer was not saved).");
        setTimeout(() => window.location.assign("login"), 2000);
        return;
      }
    } catch (err) { /* the server is unreachable: say so below */ }
    watchdog = setTimeout(() => {
      state.busy = false;
      showError("No answer from the server yet; your answer may not be saved. Try again.");
      render();
    }, 15000);
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
  send("submit", { task_id: state.task.id, ranks, request_id: state.requestId,
                   seconds: Math.round((performance.now() - state.openedAt) / 100) / 10 });
}

function skip() {
  if (!state.task || state.busy) return;
  send("skip", { task_id: state.task.id, reason: q("rk-skip-reason").value,
                 request_id: "skip-" + state.requestId });
  q("rk-skip-reason").blur();
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
  if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA" || target.tagName === "SELECT"
                 || target.isContentEditable)) {
    if (event.key === "Escape") target.blur();
    if (event.key === "Enter" && target === q("rk-skip-reason")) { event.preventDefault(); skip(); }
    return; // typing in a field (the skip reason, the history search)
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
      if (target && (target.tagName === "BUTTON" || target.tagName === "SUMMARY")) return; // its own action
      event.preventDefault();
      submit();
      break;
    case "s": case "S":
      event.preventDefault();
      q("rk-skip-reason").focus();
      break;
    case "?":
      toggleGuidelines();
      break;
    default:
  }
}

// ---------- start ----------

q("rk-submit").addEventListener("click", submit);
q("rk-undo").addEventListener("click", undo);
q("rk-clear").addEventListener("click", clearRanking);
q("rk-skip").addEventListener("submit", (event) => { event.preventDefault(); skip(); });
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
