// What the page draws from API answers: cards, the unpriced table, budgets, the two tables and
// the dialogs. Render functions only draw; app.js decides what to fetch.

import { compact, h, integer, localTime, money, ms } from "./api.js";

export const $ = (sel) => document.querySelector(sel);

// One request's outcome, in words: an error or a budget block is not an unpriced model.
export function outcome(r) {
  const blocked = /^blocked by budget '?([^']*)'?/.exec(r.error || "");
  if (blocked) return { text: `blocked by budget ${blocked[1]}`, kind: "blocked" };
  if (r.error || (r.status ?? 0) >= 400) {
    const timeout = /timeout|timed out/i.test(r.error || "");
    return { text: r.status ? `error ${r.status}` : timeout ? "error: timeout" : "error", kind: "error", title: r.error || "" };
  }
  // A stream cut before its final usage: what was counted is a lower bound (priced as such).
  if (r.usage_source === "partial") return { text: "partial usage", kind: "partial", title: "stream cut before its final usage: a lower bound" };
  if (r.usage_source !== "reported") return { text: "no usage reported", kind: "unmetered" };
  if (r.cost_usd == null) return { text: "unpriced model", kind: "unpriced" };
  return { text: r.status ? `ok ${r.status}` : "ok", kind: "ok" };
}

export function costCell(r) {
  if (r.cost_usd != null) return (r.usage_source === "partial" ? "≥ " : "") + money(r.cost_usd);
  const o = outcome(r);
  return o.kind === "unpriced" || o.kind === "partial" ? "unpriced" : "–";
}

// A cell that names its column, so a phone can reflow a row into labelled lines (style.css).
export function cell(label, attrs, value) {
  return h("td", { ...attrs, "data-label": label }, value);
}

// Keyboard: a clickable row takes focus and opens with Enter or Space, as a button would.
export function clickableRow(attrs, open, ...cells) {
  return h("tr", {
    class: "clickable", tabindex: 0, ...attrs, onclick: open,
    onkeydown: (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); open(); } },
  }, ...cells);
}

// ---- cards -----------------------------------------------------------------------------------

export function delta(el, now, before, label, beforeRequests) {
  el.replaceChildren();
  if (!before && !now) return el.append(h("span", { class: "flat" }, `no change vs ${label}`));
  if (!before) return el.append(h("span", { class: "up" }, `new vs ${label}`));
  const pct = (100 * (now - before)) / before;
  const cls = pct > 0.05 ? "up" : pct < -0.05 ? "down" : "flat";
  const arrow = cls === "up" ? "▲" : cls === "down" ? "▼" : "=";
  el.append(h("span", { class: cls }, `${arrow} ${Math.abs(pct).toFixed(1)}% vs ${label}`));
  // A change against a nearly empty period says little: say how little there was.
  if (beforeRequests !== undefined && beforeRequests < 20) {
    el.append(h("span", { class: "caveat" }, ` (only ${integer(beforeRequests)} request${beforeRequests === 1 ? "" : "s"} then)`));
  }
}

export function renderCards(cur, before, sessions, prevSessions, label) {
  const t = cur.totals, p = before.totals;
  const card = (id) => $(`#card-${id}`);
  card("cost").querySelector(".value").textContent = money(t.cost_usd);
  const unpricedTokens = (cur.unpriced_models || []).reduce((a, m) => a + m.input_tokens + m.output_tokens, 0);
  card("cost").querySelector(".sub").textContent = t.unpriced_requests
    ? `+ ${integer(t.unpriced_requests)} unpriced requests (${compact(unpricedTokens)} tokens) not in this total` : "every request priced";
  if (t.estimated_requests) {
    // Estimates (estimate_usage) are never spend: shown beside the total, not in it.
    card("cost").querySelector(".sub").textContent +=
      ` · ${money(t.estimated_cost_usd)} estimated for ${integer(t.estimated_requests)} without usage, not in this total`;
  }
  // Where the total's costs came from, when not all from reported usage x the tables.
  if (t.partial_requests) {
    card("cost").querySelector(".sub").textContent +=
      ` · ${integer(t.partial_requests)} from cut streams (lower bounds)`;
  }
  if (t.provider_cost_requests) {
    card("cost").querySelector(".sub").textContent +=
      ` · ${integer(t.provider_cost_requests)} at the provider's own figure`;
  }
  card("cost").classList.toggle("has-unpriced", Boolean(t.unpriced_requests));
  delta(card("cost").querySelector(".delta"), Number(t.cost_usd), Number(p.cost_usd), label, p.requests);
  const tokens = t.input_tokens + t.output_tokens;
  card("tokens").querySelector(".value").textContent = compact(tokens);
  card("tokens").querySelector(".sub").textContent =
    `in ${compact(t.input_tokens)} (cached ${compact(t.cache_read_tokens)}) · out ${compact(t.output_tokens)} · reasoning ${compact(t.reasoning_tokens)}`;
  delta(card("tokens").querySelector(".delta"), tokens, p.input_tokens + p.output_tokens, label, p.requests);
  card("requests").querySelector(".value").textContent = integer(t.requests);
  const notes = [];
  if (t.errors) notes.push(`${integer(t.errors)} errors or blocked`);
  if (t.unpriced_requests) notes.push(`${integer(t.unpriced_requests)} unpriced`);
  const unmetered = t.unmetered_requests - (t.errors || 0);
  if (unmetered > 0) notes.push(`${integer(unmetered)} with no or partial usage`);
  card("requests").querySelector(".sub").textContent = notes.join(" · ");
  delta(card("requests").querySelector(".delta"), t.requests, p.requests, label, p.requests);
  card("sessions").querySelector(".value").textContent = integer(sessions.total);
  const avg = sessions.total ? Number(sessions.cost_usd) / sessions.total : 0;
  card("sessions").querySelector(".sub").textContent = sessions.total ? `avg ${money(avg)} per session` : "";
  $("#sessions-avg").textContent = sessions.total ? `average ${money(avg)} per session` : "";
  delta(card("sessions").querySelector(".delta"), sessions.total, prevSessions, label, p.requests);
  card("savings").querySelector(".value").textContent = money(cur.cache_savings_usd);
  card("savings").querySelector(".sub").textContent =
    t.input_tokens ? `${((100 * t.cache_read_tokens) / t.input_tokens).toFixed(1)}% of input read from cache` : "";
}

export function renderUnpriced(models) {
  $("#unpriced-panel").hidden = !models.length;
  $("#unpriced-count").textContent = models.length
    ? `${integer(models.reduce((a, m) => a + m.unpriced_requests, 0))} requests, ${models.length} models` : "";
  $("#unpriced tbody").replaceChildren(...models.map((m) => h("tr", { dataset: { model: m.model || "" } },
    h("td", {}, m.model || "(none)"), h("td", {}, m.provider || "–"),
    h("td", { class: "num" }, integer(m.unpriced_requests)),
    h("td", { class: "num" }, compact(m.input_tokens)), h("td", { class: "num" }, compact(m.output_tokens)))));
}

// ---- budgets ---------------------------------------------------------------------------------

export function scopeText(scope) {
  if (!scope || typeof scope !== "object") return scope || "all requests";
  const parts = [];
  for (const [k, v] of Object.entries(scope)) {
    if (k === "tags" && v && typeof v === "object") {
      for (const [tk, tv] of Object.entries(v)) parts.push(`tag ${tk} = ${tv}`);
    } else if (v !== null && v !== undefined && v !== "") {
      parts.push(`${k} ${v}`);
    }
  }
  return parts.length ? parts.join(" · ") : "all requests";
}

// The colour says where the budget is heading, not only where it is: a budget at 50% projected
// to three times its limit is drawn as a warning, with the projection on the bar.
export function budgetLevel(b) {
  if (b.state === "blocking" || b.state === "exceeded") return b.state;
  const over = b.projected_spend_usd != null && Number(b.projected_spend_usd) > Number(b.limit_usd);
  if (over) return "projected-over";
  return b.state || "ok";
}

const LEVEL_TEXT = {
  ok: "on track", warning: "warning: past a threshold", "projected-over": "projected to overrun",
  exceeded: "over the limit", blocking: "over the limit: blocking requests",
};

export function renderBudgets(list) {
  $("#budgets-panel").hidden = !list.length;
  $("#budgets").replaceChildren(...list.map((b) => {
    const pct = Number(b.percent || 0);
    const level = budgetLevel(b);
    const limit = Number(b.limit_usd);
    const projectedPct = b.projected_spend_usd != null && limit ? (100 * Number(b.projected_spend_usd)) / limit : null;
    const action = {
      block: "blocks requests at the limit",
      reserve: "reserves each request's worst case (hard limit)",
    }[b.action] || "alerts only";
    // Reserve budgets: what requests in flight hold (all replicas), drawn after the spend.
    const reserved = b.reserved_usd != null ? Number(b.reserved_usd) : null;
    const reservedPct = reserved && limit ? (100 * reserved) / limit : 0;
    return h("div", { class: `budget ${level}`, dataset: { name: b.name, level } },
      h("div", { class: "budget-head" },
        h("b", {}, b.name),
        h("span", { class: `badge ${level}` }, LEVEL_TEXT[level] || level),
        h("span", { class: "budget-figures" }, `${money(b.spend_usd)} of ${money(b.limit_usd)} (${pct.toFixed(0)}%)`),
        reserved != null ? h("span", { class: "budget-reserved" }, `+ ${money(b.reserved_usd)} reserved in flight`) : null),
      h("div", { class: "muted budget-scope" }, `${scopeText(b.scope)} · ${b.period} · ${action}`),
      h("div", { class: "track", role: "img", "aria-label": `${pct.toFixed(0)}% spent` },
        h("div", { class: "fill", style: `width:${Math.min(pct, 100)}%` }),
        reservedPct > 0 ? h("div", { class: "reserved", style: `left:${Math.min(pct, 100)}%;width:${Math.min(reservedPct, Math.max(0, 100 - pct))}%` }) : null,
        projectedPct != null ? h("div", { class: "projection", style: `left:${Math.min(projectedPct, 100)}%` }) : null),
      h("div", { class: "muted" },
        b.projected_spend_usd != null ? `projected ${money(b.projected_spend_usd)} by ${localTime(b.period_end)}` : "",
        b.projected_exceed_at ? ` · limit reached ${localTime(b.projected_exceed_at)}` : ""));
  }));
}

// ---- tables ----------------------------------------------------------------------------------

export function markSorted(table, attr, key, order) {
  for (const th of document.querySelectorAll(`${table} th[${attr}]`)) {
    const on = th.getAttribute(attr) === key;
    th.dataset.active = on ? order : "";
    th.setAttribute("aria-sort", on ? (order === "asc" ? "ascending" : "descending") : "none");
  }
}

export function sessionRows(sessions, open) {
  return sessions.map((s) => clickableRow({ dataset: { session: s.session }, "aria-label": `Session ${s.session}` },
    () => open(s.session),
    cell("Session", { class: "mono wide", title: s.session }, s.session),
    cell("User", {}, (s.users || []).join(", ") || "–"),
    cell("First seen", {}, localTime(s.first_ts)), cell("Last seen", {}, localTime(s.last_ts)),
    cell("Models", { class: "wide", title: (s.models || []).join(", ") }, (s.models || []).join(", ")),
    cell("Requests", { class: "num" }, integer(s.requests)),
    cell("Tokens", { class: "num" }, compact(s.input_tokens + s.output_tokens)),
    cell("Cost", { class: "num cost" }, money(s.cost_usd),
      s.unpriced_requests ? h("span", { class: "unpriced-note" }, ` +${integer(s.unpriced_requests)} unpriced`) : null)));
}

export function requestRows(rows, open) {
  return rows.map((r) => {
    const o = outcome(r);
    return clickableRow({ dataset: { id: r.id, outcome: o.kind } }, () => open(r),
      cell("Time", {}, localTime(r.ts)), cell("Model", { title: r.model || "" }, r.model || r.requested_model || "–"),
      cell("User", {}, r.user || "–"), cell("Provider", {}, r.provider || "–"),
      cell("Outcome", { class: `outcome ${o.kind}`, title: o.title || o.text }, o.text),
      cell("Tokens", { class: "num" }, compact(r.input_tokens + r.output_tokens)),
      cell("Latency", { class: "num" }, ms(r.duration_ms)),
      cell("Cost", { class: "num cost" }, costCell(r)));
  });
}

// ---- dialogs ---------------------------------------------------------------------------------

function field(label, value) {
  return [h("dt", {}, label), h("dd", {}, value === null || value === undefined || value === "" ? "–" : value)];
}

export function requestDetail(r) {
  const tags = Object.entries(r.tags || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  const o = outcome(r);
  return [
    h("h2", { id: "detail-title" }, "Request"),
    h("dl", { class: "detail" },
      field("Id", r.id), field("Time", localTime(r.ts)), field("Source", r.source),
      field("Upstream / provider", `${r.upstream || "–"} / ${r.provider || "–"}`), field("Endpoint", `${r.method || ""} ${r.endpoint || ""}`),
      field("Model", r.requested_model && r.requested_model !== r.model ? `${r.requested_model} → ${r.model}` : r.model),
      field("Priced as", r.priced_model), field("Outcome", o.text), field("Status", r.status),
      field("Streamed", r.streamed ? "yes" : "no"),
      field("Input tokens", integer(r.input_tokens)), field("Cache read", integer(r.cache_read_tokens)),
      field("Cache write", integer(r.cache_write_tokens)), field("Output tokens", integer(r.output_tokens)),
      field("Reasoning tokens", integer(r.reasoning_tokens)), field("Usage", r.usage_source),
      field("Cost", r.cost_usd == null ? costCell(r) : `${money(r.cost_usd)} (${r.cost_usd} USD)`),
      field("Provider-reported cost", r.provider_cost_usd == null ? null : money(r.provider_cost_usd)),
      field("Latency", ms(r.duration_ms)), field("Time to first byte", ms(r.ttfb_ms)), field("Upstream time", ms(r.upstream_ms)),
      field("User", r.user), field("Session", r.session), field("Tags", tags), field("Key", r.key_fingerprint),
      field("Error", r.error)),
    h("p", { class: "muted" }, "Prompt and completion text are not stored."),
  ];
}

const num = (text) => h("th", { scope: "col", class: "num" }, text);
const col = (text) => h("th", { scope: "col" }, text);

export function sessionDetail(s, page, onPage, openRequest) {
  const t = s.totals;
  const first = s.offset + 1, last = s.offset + s.requests.length;
  return [
    h("h2", { id: "detail-title" }, "Session ", h("span", { class: "mono" }, s.session)),
    h("p", { class: "session-summary" }, `${localTime(s.first_ts)} → ${localTime(s.last_ts)}`, h("br"),
      `${integer(t.requests)} requests · ${compact(t.input_tokens)} in (${compact(t.cache_read_tokens)} cache read, `,
      `${compact(t.cache_write_tokens)} cache write) · ${compact(t.output_tokens)} out · `, h("b", {}, money(t.cost_usd)),
      t.unpriced_requests ? ` + ${integer(t.unpriced_requests)} unpriced` : "",
      t.errors ? ` · ${integer(t.errors)} errors or blocked` : "",
      h("br"), `User: ${(s.users || []).join(", ") || "–"}`),
    h("h3", {}, "By model"),
    h("div", { class: "table-wrap" }, h("table", { class: "data reflow", id: "session-models" },
      h("thead", {}, h("tr", {}, col("Model"), num("Requests"), num("Input"), num("Cache read"), num("Output"), num("Cost"))),
      h("tbody", {}, s.models.map((m) => h("tr", {},
        cell("Model", { class: "wide" }, m.model || "(none)"), cell("Requests", { class: "num" }, integer(m.requests)),
        cell("Input", { class: "num" }, compact(m.input_tokens)), cell("Cache read", { class: "num" }, compact(m.cache_read_tokens)),
        cell("Output", { class: "num" }, compact(m.output_tokens)),
        cell("Cost", { class: "num cost" }, m.unpriced_requests && !Number(m.cost_usd) ? "unpriced" : money(m.cost_usd))))))),
    h("div", { class: "pager", id: "session-pager" },
      h("button", { type: "button", disabled: s.offset === 0, onclick: () => onPage(-1) }, "‹ Newer"),
      h("span", {}, `${integer(first)}–${integer(last)} of ${integer(t.requests)}`),
      h("button", { type: "button", disabled: s.next_offset == null, onclick: () => onPage(1) }, "Older ›")),
    h("div", { class: "table-wrap" }, h("table", { class: "data reflow", id: "session-requests" },
      h("thead", {}, h("tr", {}, col("Time"), col("Model"), col("Outcome"), num("Input"), num("Cache read"),
        num("Cache write"), num("Output"), num("Cost"), col("Tags"))),
      h("tbody", {}, s.requests.map((r) => {
        const o = outcome(r);
        return clickableRow({ dataset: { id: r.id } }, () => openRequest(r),
          cell("Time", {}, localTime(r.ts)), cell("Model", {}, r.model || "–"),
          cell("Outcome", { class: `outcome ${o.kind}`, title: o.title || o.text }, o.text),
          cell("Input", { class: "num" }, compact(r.input_tokens)), cell("Cache read", { class: "num" }, compact(r.cache_read_tokens)),
          cell("Cache write", { class: "num" }, compact(r.cache_write_tokens)), cell("Output", { class: "num" }, compact(r.output_tokens)),
          cell("Cost", { class: "num cost" }, costCell(r)),
          cell("Tags", { class: "wide" }, Object.entries(r.tags || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "–"));
      })))),
  ];
}
