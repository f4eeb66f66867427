// Hand-written SVG charts: a stacked bar chart (burn rate), share bars (distribution) and a
// segmented token bar. Each takes plain numbers and draws into an element, replacing its content.

import { compact, h } from "./api.js";

const NS = "http://www.w3.org/2000/svg";
export const PALETTE = [
  "#4c6ef5", "#f59f00", "#12b886", "#e64980", "#7950f2",
  "#15aabf", "#fa5252", "#82c91e", "#fd7e14", "#868e96",
];

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function niceCeil(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function legend(items) {
  return h("div", { class: "legend" },
    items.map((it) => h("span", { class: "legend-item" },
      h("i", { class: "swatch", style: `background:${it.color}` }), it.label)));
}

// The numbers a chart draws, as a table a screen reader (or a person copying figures) can use.
export function chartTable(caption, head, rows) {
  return h("details", { class: "as-table" }, h("summary", {}, "Show as table"),
    h("div", { class: "table-wrap" }, h("table", { class: "data" },
      h("caption", { class: "sr-only" }, caption),
      h("thead", {}, h("tr", {}, head.map((c, i) => h("th", { scope: "col", class: i ? "num" : "" }, c)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c, i) => (i ? h("td", { class: "num" }, c) : h("th", { scope: "row" }, c)))))))));
}

// labels: bucket labels (x); series: [{name, values: number[]}] stacked bottom-up in order.
// Drawn at the element's own pixel width (not scaled from a fixed viewBox), so axis text
// stays 11 px on a phone instead of shrinking with the chart.
export function stackedBars(el, { labels, series, format, axisFormat = format, xLabel = (l) => l }) {
  el.replaceChildren();
  const W = Math.max(240, Math.round(el.clientWidth || 720));
  const H = W < 500 ? 200 : 240, L = 56, R = 8, T = 10, B = 26;
  const totals = labels.map((_, i) => series.reduce((a, sr) => a + sr.values[i], 0));
  const max = Math.max(0, ...totals);
  if (max === 0) {
    el.append(h("p", { class: "empty" }, "No spend in this range."));
    return;
  }
  const top = 4 * niceCeil(max / 4); // four gridlines at round values
  const plotW = W - L - R, plotH = H - T - B;
  const step = plotW / labels.length;
  const bw = Math.max(1, step * 0.78);
  const svg = s("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": "Cost over time (the same figures are in the table below)" });
  for (let g = 0; g <= 4; g++) {
    const y = T + plotH - (plotH * g) / 4;
    svg.append(s("line", { x1: L, x2: W - R, y1: y, y2: y, class: "grid" }));
    svg.append(s("text", { x: L - 6, y: y + 4, "text-anchor": "end", class: "axis" }, axisFormat((top * g) / 4)));
  }
  const every = Math.ceil(labels.length / Math.max(2, Math.floor(plotW / 64)));
  labels.forEach((label, i) => {
    const x = L + i * step + (step - bw) / 2;
    let y = T + plotH;
    series.forEach((sr, k) => {
      const v = sr.values[i];
      if (!v) return;
      const hgt = (plotH * v) / top;
      y -= hgt;
      svg.append(s("rect", { x, y, width: bw, height: Math.max(hgt, 0.5), fill: sr.color || PALETTE[k % PALETTE.length],
        "data-series": sr.name, "data-bucket": label, "data-value": v },
      s("title", {}, `${xLabel(label)} · ${sr.name}: ${format(v)}`)));
    });
    if (i % every === 0) {
      svg.append(s("text", { x: L + i * step + step / 2, y: H - 8, "text-anchor": "middle", class: "axis" }, xLabel(label)));
    }
  });
  el.append(svg, legend(series.map((sr, k) => ({ label: sr.name, color: sr.color || PALETTE[k % PALETTE.length] }))));
  const rows = labels.map((label, i) => [xLabel(label), ...series.map((sr) => format(sr.values[i])), format(totals[i])])
    .filter((_, i) => totals[i]);
  el.append(chartTable("Cost per period and series", ["Period", ...series.map((sr) => sr.name), "Total"], rows));
}

// items: [{label, value, title?, note?}] sorted by value; a bar per item with its share of
// `total`. An item with a `note` (an unpriced model) has no bar: its cost is unknown, not zero.
export function shareBars(el, items, total, format) {
  el.replaceChildren();
  if (!items.length) {
    el.append(h("p", { class: "empty" }, "No spend in this range."));
    return;
  }
  el.append(h("div", { class: "shares" }, items.map((it, k) => {
    const pct = total && !it.note ? (100 * it.value) / total : 0;
    return h("div", { class: it.note ? "share unpriced" : "share", dataset: { label: it.label } },
      h("span", { class: "share-label", title: it.title || it.label }, it.label),
      h("span", { class: "share-track" }, it.note ? null
        : h("span", { class: "share-fill", style: `width:${pct.toFixed(2)}%;background:${PALETTE[k % PALETTE.length]}` })),
      h("span", { class: "share-value" }, it.note || format(it.value)),
      h("span", { class: "share-pct" }, it.note ? "–" : `${pct.toFixed(1)}%`));
  })));
  el.append(chartTable("Cost share", ["Name", "Cost", "Share"], items.map((it) => [
    it.title || it.label, it.note || format(it.value), it.note || !total ? "–" : `${((100 * it.value) / total).toFixed(1)}%`])));
}

// The five token kinds as one bar: plain input, cache reads, cache writes, output, reasoning.
export function tokenBar(el, t) {
  el.replaceChildren();
  const plain = Math.max(0, t.input_tokens - t.cache_read_tokens - t.cache_write_tokens);
  const reasoning = Math.min(t.reasoning_tokens, t.output_tokens);
  const parts = [
    { key: "input", label: "Input (uncached)", value: plain, color: PALETTE[0] },
    { key: "cache_read", label: "Cache read", value: t.cache_read_tokens, color: PALETTE[2] },
    { key: "cache_write", label: "Cache write", value: t.cache_write_tokens, color: PALETTE[1] },
    { key: "output", label: "Output", value: t.output_tokens - reasoning, color: PALETTE[4] },
    { key: "reasoning", label: "Reasoning", value: reasoning, color: PALETTE[3] },
  ];
  const total = parts.reduce((a, p) => a + p.value, 0);
  if (!total) {
    el.append(h("p", { class: "empty" }, "No tokens in this range."));
    return;
  }
  const svg = s("svg", { viewBox: "0 0 1000 28", preserveAspectRatio: "none", class: "tokenbar", role: "img",
    "aria-label": "Tokens by type (the same figures are in the table below)" });
  let x = 0;
  for (const p of parts) {
    if (!p.value) continue;
    const w = (1000 * p.value) / total;
    svg.append(s("rect", { x, y: 0, width: w, height: 28, fill: p.color, "data-kind": p.key },
      s("title", {}, `${p.label}: ${p.value.toLocaleString("en-US")}`)));
    x += w;
  }
  el.append(svg, h("div", { class: "legend" }, parts.map((p) => h("span", { class: "legend-item", dataset: { kind: p.key } },
    h("i", { class: "swatch", style: `background:${p.color}` }),
    `${p.label} `, h("b", {}, compact(p.value)), ` (${((100 * p.value) / total).toFixed(1)}%)`))),
  chartTable("Tokens by type", ["Type", "Tokens", "Share"],
    parts.map((p) => [p.label, p.value.toLocaleString("en-US"), `${((100 * p.value) / total).toFixed(1)}%`])));
}
