async () => {
  // Fades and slides first run to their end (a list closing after a pick, a toast appearing): text mid-fade is not
  // what a reader sees. Endless animations (spinners) are not waited for; nothing waits longer than 2 s.
  const finite = document.getAnimations().filter((a) => Number.isFinite(a.effect?.getComputedTiming().endTime));
  await Promise.race([Promise.all(finite.map((a) => a.finished.catch(() => null))),
                      new Promise((done) => setTimeout(done, 2000))]);
  // WCAG 2 contrast of every visible text on the page (tests/test_app_browser.py): for each element with text of
  // its own, its colour (with the opacity of it and its ancestors) over the background it is drawn on (its own
  // and its ancestors' background colours composited, white below all). A gradient background is reported as
  // unknown. Returns [{text, tag, cls, ratio}].
  const parse = (text) => {
    const m = /^rgba?\(([^)]*)\)$/.exec(text.trim());
    if (!m) return null;
    const p = m[1].split(/[\s,\/]+/).filter(Boolean).map(parseFloat);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  };
  const over = (top, under) => { // top (with alpha) over an opaque colour
    const a = top[3];
    return [0, 1, 2].map((i) => top[i] * a + under[i] * (1 - a)).concat(1);
  };
  const luminance = (c) => {
    const [r, g, b] = c.slice(0, 3).map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const background = (node) => {
    const layers = [];
    for (let n = node; n && n.nodeType === 1; n = n.parentElement) {
      const style = getComputedStyle(n);
      if (style.backgroundImage && style.backgroundImage !== "none" && !style.backgroundImage.startsWith("url"))
        return { unknown: style.backgroundImage.slice(0, 80) };
      const c = parse(style.backgroundColor);
      if (c && c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
    }
    let colour = [255, 255, 255, 1];
    if (layers.length && layers[layers.length - 1][3] >= 1) colour = layers.pop();
    while (layers.length) colour = over(layers.pop(), colour);
    return { colour };
  };
  const results = [];
  for (const node of document.querySelectorAll("body *")) {
    if (["SCRIPT", "STYLE", "NOSCRIPT", "TEMPLATE", "svg", "OPTION"].includes(node.tagName)) continue;
    const own = [...node.childNodes].filter((t) => t.nodeType === 3 && t.textContent.trim()).map((t) => t.textContent.trim()).join(" ");
    if (!own) continue;
    const rect = node.getBoundingClientRect();
    if (rect.width < 1 || rect.height < 1) continue;
    const style = getComputedStyle(node);
    if (style.visibility !== "visible") continue;
    if (node.closest("button:disabled, input:disabled, [aria-disabled=true]")) continue; // inactive controls
    let opacity = 1, hidden = false;
    for (let n = node; n && n.nodeType === 1; n = n.parentElement) {
      const s = getComputedStyle(n);
      opacity *= parseFloat(s.opacity);
      if (s.display === "none") hidden = true;
    }
    if (hidden || opacity === 0) continue;
    const fg = parse(style.color);
    const bg = background(node);
    if (!fg || bg.unknown) { results.push({ text: own.slice(0, 40), cls: node.className && String(node.className).slice(0, 60), unknown: bg.unknown || style.color }); continue; }
    const text = over([fg[0], fg[1], fg[2], fg[3] * opacity], bg.colour);
    const [l1, l2] = [luminance(text), luminance(bg.colour)].sort((a, b) => b - a);
    results.push({ text: own.slice(0, 40), tag: node.tagName, cls: String(node.className || node.id).slice(0, 60),
                   ratio: Math.round(((l1 + 0.05) / (l2 + 0.05)) * 100) / 100 });
  }
  return results;
}
