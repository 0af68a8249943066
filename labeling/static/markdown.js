// Safe Markdown for untrusted text (prompts, conversation turns, completions), part of the ranker widget's
// `js_on_load` (labeling/gradio_ui.py joins markdown.js, worddiff.js and ranker.js).
//
// Safe by construction: the text is parsed here and the page gets only elements made with createElement
// from a fixed list (p, strong, em, del, code, pre, ul, ol, li, blockquote, hr, table parts, span) and text
// set with textContent; no HTML parser ever sees the text and no attribute takes a value from it. Raw HTML,
// entities and autolinks stay literal text; a link shows its text and its address as text; an image shows
// its alt text and its address as text: nothing loads, navigates or runs.
//
// The subset (CommonMark/GFM where it matters for model output): paragraphs (a single newline is kept as a
// line break), ATX and setext headings, fenced code blocks, bullet and ordered lists (nested by
// indentation), block quotes, thematic breaks, GFM tables; inline code, **strong**, *emphasis*,
// ~~strikethrough~~ and backslash escapes.
"use strict";

// Bidi overrides and zero-width characters could make text look different from what it is
// ("Trojan Source"); they are shown as visible markers. The stored data is never changed.
const CONTROL_CHARS = /[\u200B-\u200F\u202A-\u202E\u2060-\u2069\uFEFF]/g;
const MD_MAX_DEPTH = 12;           // nested quotes, lists and emphasis deeper than this stay literal text
const MD_LINK_SCAN = 2000;         // how far a "[" looks for its "](address)"
const MD_LINK_BUDGET = 200000;     // characters all link scans of one text may read: a hostile text of many
                                   // "[" stays fast (its later brackets are then shown as text)
let mdLinkBudget = 0;
const MD_PUNCT = /[!"#$%&'()*+,\-./:;<=>?@[\\\]^_`{|}~]/;
const MD_LIST_ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])([ \t]+|$)/;
const MD_FENCE = /^( {0,3})(`{3,}|~{3,})(.*)$/;
const MD_HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const MD_RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const MD_QUOTE = /^ {0,3}> ?/;
const MD_TABLE_DELIMITER = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

/** Append `text` to `parent` as text nodes, with invisible control characters as visible U+XXXX markers. */
function appendText(parent, text) {
  let last = 0;
  for (const match of text.matchAll(CONTROL_CHARS)) {
    if (match.index > last) parent.append(document.createTextNode(text.slice(last, match.index)));
    const marker = document.createElement("span");
    marker.className = "rk-ctrl";
    marker.title = "invisible control character";
    marker.textContent = "U+" + match[0].codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    parent.append(marker);
    last = match.index + match[0].length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

/** Replace `node`'s content with `text` as literal text. */
function setText(node, text) {
  node.replaceChildren();
  appendText(node, text);
}

/** Replace `node`'s content with `text` rendered as Markdown. */
function renderMarkdown(node, text) {
  node.replaceChildren();
  mdLinkBudget = MD_LINK_BUDGET;
  // Leading tabs count as 4 columns (list nesting, code indentation).
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n")
    .map((line) => line.replace(/^[ \t]+/, (lead) => lead.replace(/\t/g, "    ")));
  mdBlocks(node, lines, 0);
}

function mdNode(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

const mdIndent = (line) => line.length - line.trimStart().length;
const mdBlank = (line) => line.trim() === "";

function mdFenceOpen(line) {
  const m = MD_FENCE.exec(line);
  if (!m || (m[2][0] === "`" && m[3].includes("`"))) return null;
  return { indent: m[1].length, fence: m[2] };
}

/** Whether `line` starts a block that ends a paragraph. */
function mdStartsBlock(line) {
  if (mdFenceOpen(line) || MD_HEADING.test(line) || MD_RULE.test(line) || MD_QUOTE.test(line)) return true;
  const item = MD_LIST_ITEM.exec(line);
  // An empty item, or an ordered one not starting at 1, does not interrupt a paragraph (CommonMark).
  return !!item && item[3] !== "" && (!/\d/.test(item[2]) || /^1[.)]$/.test(item[2]));
}

function mdTableCells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function mdTableStart(lines, i) {
  if (i + 1 >= lines.length || !lines[i].includes("|") || !MD_TABLE_DELIMITER.test(lines[i + 1])) return false;
  return mdTableCells(lines[i]).length === mdTableCells(lines[i + 1]).length;
}

function mdBlocks(parent, lines, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (mdBlank(line)) { i++; continue; }
    if (depth >= MD_MAX_DEPTH) { // too deep to nest further: the rest as literal text
      const p = mdNode("p");
      appendText(p, lines.slice(i).join("\n").trim());
      parent.append(p);
      return;
    }
    let m;
    const fence = mdFenceOpen(line);
    if (fence) {
      const close = new RegExp("^ {0,3}" + fence.fence[0] + "{" + fence.fence.length + ",}[ \\t]*$");
      const body = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) {
        body.push(lines[i].slice(Math.min(fence.indent, mdIndent(lines[i]))));
      }
      i++; // the closing fence (or the end of the text)
      const pre = mdNode("pre");
      const code = mdNode("code");
      appendText(code, body.join("\n"));
      pre.append(code);
      parent.append(pre);
    } else if ((m = MD_HEADING.exec(line))) {
      const heading = mdNode("p", "rk-md-h rk-md-h" + m[1].length);
      mdInline(heading, m[2] || "", depth);
      parent.append(heading);
      i++;
    } else if (MD_RULE.test(line)) {
      parent.append(mdNode("hr"));
      i++;
    } else if (MD_QUOTE.test(line)) {
      const inner = [];
      for (; i < lines.length && MD_QUOTE.test(lines[i]); i++) inner.push(lines[i].replace(MD_QUOTE, ""));
      const quote = mdNode("blockquote");
      mdBlocks(quote, inner, depth + 1);
      parent.append(quote);
    } else if (MD_LIST_ITEM.test(line)) {
      i = mdList(parent, lines, i, depth);
    } else if (mdTableStart(lines, i)) {
      i = mdTable(parent, lines, i, depth);
    } else {
      const text = [line.trimStart()];
      let level = 0;
      for (i++; i < lines.length && !mdBlank(lines[i]); i++) {
        if (/^ {0,3}=+[ \t]*$/.test(lines[i])) { level = 1; i++; break; }        // setext heading
        if (/^ {0,3}-+[ \t]*$/.test(lines[i])) { level = 2; i++; break; }
        if (mdStartsBlock(lines[i]) || mdTableStart(lines, i)) break;
        text.push(lines[i].trimStart());
      }
      const p = mdNode("p", level ? "rk-md-h rk-md-h" + level : "");
      mdInline(p, text.join("\n").trimEnd(), depth);
      parent.append(p);
    }
  }
}

function mdList(parent, lines, i, depth) {
  const first = MD_LIST_ITEM.exec(lines[i]);
  const ordered = /\d/.test(first[2]);
  const delimiter = first[2].slice(-1); // "-", "*", "+", "." or ")": another one starts another list
  const list = mdNode(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) list.start = parseInt(first[2], 10);
  let loose = false;
  const items = [];
  while (i < lines.length) {
    const m = MD_LIST_ITEM.exec(lines[i]);
    if (!m || /\d/.test(m[2]) !== ordered || m[2].slice(-1) !== delimiter || MD_RULE.test(lines[i])) break;
    const gap = m[3].length > 4 ? 1 : Math.max(m[3].length, 1); // 5+ spaces: indented content (CommonMark)
    const contentIndent = m[1].length + m[2].length + gap;
    const content = [lines[i].slice(Math.min(lines[i].length, contentIndent))];
    for (i++; i < lines.length; i++) {
      const line = lines[i];
      if (mdBlank(line)) {
        let next = i;
        while (next < lines.length && mdBlank(lines[next])) next++;
        if (next < lines.length && mdIndent(lines[next]) >= contentIndent) { // the item goes on
          content.push(...lines.slice(i, next).map(() => ""));
          loose = true;
          i = next - 1;
          continue;
        }
        break;
      }
      if (mdIndent(line) >= contentIndent) content.push(line.slice(contentIndent));
      else if (!mdBlank(content[content.length - 1]) && !mdStartsBlock(line) && !MD_LIST_ITEM.test(line)) {
        content.push(line.trimStart()); // a lazy continuation of the item's paragraph
      } else break;
    }
    items.push(content);
    let next = i;
    while (next < lines.length && mdBlank(lines[next])) next++;
    const again = next < lines.length && MD_LIST_ITEM.exec(lines[next]);
    if (next > i && again && again[2].slice(-1) === delimiter) loose = true;
    if (!again || again[2].slice(-1) !== delimiter) break;
    i = next;
  }
  for (const content of items) {
    const item = mdNode("li");
    mdBlocks(item, content, depth + 1);
    if (!loose) { // a tight list: its paragraphs are not spaced apart
      for (const p of [...item.children]) if (p.tagName === "P" && !p.className) p.replaceWith(...p.childNodes);
    }
    list.append(item);
  }
  parent.append(list);
  return i;
}

function mdTable(parent, lines, i, depth) {
  const header = mdTableCells(lines[i]);
  const align = mdTableCells(lines[i + 1]).map((cell) =>
    cell.endsWith(":") ? (cell.startsWith(":") ? "center" : "right") : cell.startsWith(":") ? "left" : "");
  const table = mdNode("table");
  const row = (cells, tag) => {
    const tr = mdNode("tr");
    header.forEach((_, k) => {
      const cell = mdNode(tag);
      if (align[k]) cell.style.textAlign = align[k];
      mdInline(cell, cells[k] || "", depth);
      tr.append(cell);
    });
    return tr;
  };
  const head = mdNode("thead");
  head.append(row(header, "th"));
  const body = mdNode("tbody");
  for (i += 2; i < lines.length && !mdBlank(lines[i]) && !mdStartsBlock(lines[i]); i++) {
    body.append(row(mdTableCells(lines[i]), "td"));
  }
  table.append(head, body);
  const scroller = mdNode("div", "rk-md-table"); // a wide table scrolls inside its box (phones)
  scroller.append(table);
  parent.append(scroller);
  return i;
}

// ---------- inline ----------

/** `[text](address)` at s[i] === "[": {text, address, end} or null. */
function mdLink(s, i) {
  let level = 0;
  let j = i;
  const limit = Math.min(s.length, i + MD_LINK_SCAN, i + mdLinkBudget);
  mdLinkBudget -= limit - i;
  for (; j < limit; j++) {
    if (s[j] === "\\") { j++; continue; }
    if (s[j] === "[") level++;
    else if (s[j] === "]" && --level === 0) break;
  }
  if (j >= limit || s[j + 1] !== "(") return null;
  let k = j + 2;
  level = 1;
  for (; k < limit; k++) {
    if (s[k] === "\\") { k++; continue; }
    if (s[k] === "\n") return null;
    if (s[k] === "(") level++;
    else if (s[k] === ")" && --level === 0) break;
  }
  if (k >= limit) return null;
  return { text: s.slice(i + 1, j), address: s.slice(j + 2, k).trim(), end: k + 1 };
}

/** The index of the closing `delim` after `from` (emphasis rules simplified from CommonMark), or -1. */
function mdCloser(s, delim, from, misses) {
  if (from >= (misses.get(delim) ?? Infinity)) return -1; // none past an earlier miss: keeps this linear
  const ch = delim[0];
  for (let at = s.indexOf(delim, from); at >= 0; at = s.indexOf(delim, at + 1)) {
    const before = s[at - 1];
    const after = s[at + delim.length];
    if (at === from || /\s/.test(before) || after === ch || before === ch) continue;
    if (ch === "_" && after && /[\p{L}\p{N}]/u.test(after)) continue; // no intraword underscores
    return at;
  }
  misses.set(delim, Math.min(misses.get(delim) ?? Infinity, from));
  return -1;
}

function mdInline(parent, s, depth) {
  let pending = "";
  const flush = () => { if (pending) { appendText(parent, pending); pending = ""; } };
  if (depth >= MD_MAX_DEPTH) { appendText(parent, s); return; }
  const misses = new Map();
  let i = 0;
  while (i < s.length) {
    const c = s[i];
    if (c === "\\" && i + 1 < s.length && MD_PUNCT.test(s[i + 1])) { pending += s[i + 1]; i += 2; continue; }
    if (c === "`") {
      let run = 1;
      while (s[i + run] === "`") run++;
      const fence = "`".repeat(run);
      let close = i + run >= (misses.get(fence) ?? Infinity) ? -1 : s.indexOf(fence, i + run);
      while (close >= 0 && s[close + run] === "`") { // a longer run is no match: skip all of it
        let end = close;
        while (s[end] === "`") end++;
        close = s.indexOf(fence, end);
      }
      if (close < 0) { misses.set(fence, i + run); pending += fence; i += run; continue; }
      let code = s.slice(i + run, close).replace(/\n/g, " ");
      if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1);
      flush();
      const node = mdNode("code");
      appendText(node, code);
      parent.append(node);
      i = close + run;
      continue;
    }
    const image = c === "!" && s[i + 1] === "[";
    if (c === "[" || image) {
      const link = mdLink(s, image ? i + 1 : i);
      if (link) { // shown, never followed or loaded: its text, then its address as text
        flush();
        const text = mdNode("span", image ? "rk-md-image" : "rk-md-link");
        if (image) appendText(text, "[image: " + link.text + "]");
        else mdInline(text, link.text, depth + 1);
        const address = mdNode("span", "rk-md-address");
        appendText(address, " (" + link.address + ")");
        parent.append(text, address);
        i = link.end;
        continue;
      }
    }
    if (c === "*" || c === "_" || c === "~") {
      let run = 1;
      while (s[i + run] === c) run++;
      const opens = run <= 3 && (c !== "~" || run === 2) && i + run < s.length && !/\s/.test(s[i + run])
        && !(c === "_" && i > 0 && /[\p{L}\p{N}]/u.test(s[i - 1]));
      const delim = c.repeat(run);
      const close = opens ? mdCloser(s, delim, i + run, misses) : -1;
      if (close < 0) { pending += delim; i += run; continue; }
      flush();
      const tag = c === "~" ? "del" : run === 1 ? "em" : "strong";
      const outer = mdNode(tag);
      let inner = outer;
      if (run === 3) { inner = mdNode("em"); outer.append(inner); }
      mdInline(inner, s.slice(i + run, close), depth + 1);
      parent.append(outer);
      i = close + run;
      continue;
    }
    pending += c;
    i++;
  }
  flush();
}
