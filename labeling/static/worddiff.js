// "Highlight differences" in the ranker widget (part of its `js_on_load`, after markdown.js): marks the
// words where completions differ, on their rendered text. Two completions: the words of each that the other
// lacks. More: each one's words that the first shown lacks, the first being the reference. Words (runs of
// letters and digits) and punctuation marks (one each) are matched exactly by a longest common subsequence
// (the textbook dynamic programme, after trimming the common start and end).
"use strict";

const DIFF_MAX_CELLS = 4000000; // beyond ~2000 x 2000 differing words the table costs too much memory

/** Which words of `a` and of `b` (lists of strings) are in their longest common subsequence, as two 0/1
 * arrays; null when the differing middle parts are too long to compare. */
function diffMatched(a, b) {
  const inA = new Uint8Array(a.length);
  const inB = new Uint8Array(b.length);
  let start = 0;
  while (start < a.length && start < b.length && a[start] === b[start]) { inA[start] = inB[start] = 1; start++; }
  let endA = a.length;
  let endB = b.length;
  while (endA > start && endB > start && a[endA - 1] === b[endB - 1]) { endA--; endB--; inA[endA] = inB[endB] = 1; }
  const n = endA - start;
  const m = endB - start;
  if (n * m > DIFF_MAX_CELLS) return null;
  // lcs[i * w + j]: the length of the common subsequence of a[start+i..endA) and b[start+j..endB), so the
  // walk below reads it forwards. Its values are at most min(n, m) <= 2000: 16 bits suffice.
  const w = m + 1;
  const lcs = new Uint16Array((n + 1) * w);
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i * w + j] = a[start + i] === b[start + j] ? lcs[(i + 1) * w + j + 1] + 1
        : Math.max(lcs[(i + 1) * w + j], lcs[i * w + j + 1]);
    }
  }
  for (let i = 0, j = 0; i < n && j < m;) {
    if (a[start + i] === b[start + j]) { inA[start + i] = inB[start + j] = 1; i++; j++; }
    else if (lcs[(i + 1) * w + j] >= lcs[i * w + j + 1]) i++;
    else j++;
  }
  return [inA, inB];
}

/** The words of a rendered body: {node, start, end, text} per word or punctuation mark of its text nodes. */
function diffWords(body) {
  const words = [];
  const walker = document.createTreeWalker(body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    for (const match of node.data.matchAll(/[\p{L}\p{N}\p{M}_]+|[^\s\p{L}\p{N}\p{M}_]/gu)) {
      words.push({ node, start: match.index, end: match.index + match[0].length, text: match[0] });
    }
  }
  return words;
}

/** Wrap the words whose `keep` is 0 in <mark class="rk-diff">, one mark per run of them in one text node. */
function diffMark(words, keep) {
  const runs = [];
  words.forEach((word, k) => {
    if (keep[k]) return;
    const last = runs[runs.length - 1];
    if (last && last.node === word.node && last.index === k - 1) { last.end = word.end; last.index = k; }
    else runs.push({ node: word.node, start: word.start, end: word.end, index: k });
  });
  for (const run of runs.reverse()) { // from the end, so the earlier offsets in a node stay valid
    run.node.splitText(run.end);
    const text = run.node.splitText(run.start);
    const mark = document.createElement("mark");
    mark.className = "rk-diff";
    text.replaceWith(mark);
    mark.append(text);
  }
  return runs.length;
}

/** Mark the differences between rendered completion bodies (display order). Returns how many comparisons
 * were too long to make. */
function highlightDifferences(bodies) {
  const words = bodies.map(diffWords);
  const texts = words.map((list) => list.map((word) => word.text));
  let tooLong = 0;
  let referenceKeep = null;
  for (let k = 1; k < bodies.length; k++) {
    const matched = diffMatched(texts[0], texts[k]);
    if (!matched) { tooLong++; continue; }
    if (bodies.length === 2) referenceKeep = matched[0];
    diffMark(words[k], matched[1]);
  }
  if (referenceKeep) diffMark(words[0], referenceKeep);
  return tooLong;
}
