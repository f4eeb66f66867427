// The analytics page: one state object, one `load` that fetches what the state asks for from the
// JSON API, and render functions that only draw. Every figure shown comes from /api/*.

import {
  AuthRequired, api, compact, forgetToken, h, integer, localTime, money, ms, percent, saveToken, token,
} from "./api.js";
import { PALETTE, shareBars, stackedBars, tokenBar } from "./charts.js";

const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
const TZ = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
const REFRESH_S = Math.max(1, Number(params.get("refresh") || 30));
const DAY = 86400000;

const state = {
  range: params.get("range") || "7d",
  from: params.get("from") || "",
  to: params.get("to") || "",
  source: params.get("source") || "",
  stack: "model",
  bucket: "",
  dist: "model",
  distTag: "",
  sessions: { sort: "last_seen", order: "desc", offset: 0, limit: 10, user: "" },
  requests: { cursors: [null], page: 0, limit: 20, filters: {}, sortKey: null, sortDir: -1, rows: [], next: null },
};
let loadSeq = 0;
let loadedOnce = false;

// ---- time ranges -----------------------------------------------------------------------------

function localDate(s) {
  const [y, m, d] = s.split("-").map(Number);
  return new Date(y, m - 1, d);
}

function bounds() {
  const now = new Date();
  let since;
  let until = now;
  const midnight = new Date(now.getFullYear(), now.getMonth(), now.getDate());
  switch (state.range) {
    case "today": since = midnight; break;
    case "30d": since = new Date(now - 30 * DAY); break;
    case "month": since = new Date(now.getFullYear(), now.getMonth(), 1); break;
    case "custom":
      since = localDate(state.from);
      until = new Date(localDate(state.to).getTime() + DAY);
      break;
    default: since = new Date(now - 7 * DAY);
  }
  const span = until - since;
  // The previous range has the same length and the same place in the calendar: today so far
  // against yesterday up to the same time, this month so far against last month's first days.
  let prevSince = new Date(since - span);
  let prevUntil = since;
  if (state.range === "today") {
    prevSince = new Date(since.getFullYear(), since.getMonth(), since.getDate() - 1);
    prevUntil = new Date(prevSince.getTime() + span);
  } else if (state.range === "month") {
    prevSince = new Date(since.getFullYear(), since.getMonth() - 1, 1);
    prevUntil = new Date(Math.min(prevSince.getTime() + span, since.getTime()));
  }
  const bucket = state.bucket || (span <= 2 * DAY ? "hour" : "day");
  return { since, until, prevSince, prevUntil, bucket };
}

const iso = (d) => d.toISOString();
const rangeNames = {
  today: "yesterday by this time", "7d": "previous 7 days", "30d": "previous 30 days",
  month: "last month by this day", custom: "previous period",
};

// ---- status, login ---------------------------------------------------------------------------

function setStatus(kind, message = "") {
  const el = $("#status");
  el.className = kind;
  el.replaceChildren();
  if (kind === "loading") el.append("Loading…");
  if (kind === "error") {
    el.append(h("strong", {}, "Could not load usage. "), message, " ",
      h("button", { type: "button", onclick: () => load() }, "Retry"));
  }
}

function showLogin(rejected) {
  const dlg = $("#login");
  $("#login-error").textContent = rejected ? "That token was not accepted." : "";
  setStatus("locked");
  $("#status").append("Locked: enter the admin token to see usage.");
  if (!dlg.open) dlg.showModal();
  $("#token").focus();
}

$("#login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  saveToken($("#token").value.trim(), $("#remember").checked);
  $("#login").close();
  load();
});

// ---- loading ---------------------------------------------------------------------------------

async function load({ quiet = false } = {}) {
  const seq = ++loadSeq;
  if (!quiet) setStatus("loading");
  document.body.dataset.state = "loading";
  try {
    const r = bounds();
    const base = { since: iso(r.since), until: iso(r.until), source: state.source };
    const prev = { since: iso(r.prevSince), until: iso(r.prevUntil), source: state.source };
    const [all, cur, before, sessCur, sessPrev] = await Promise.all([
      api("/api/summary", { group_by: "source" }),
      api("/api/summary", base),
      api("/api/summary", prev),
      api("/api/sessions", { ...base, limit: 1 }),
      api("/api/sessions", { ...prev, limit: 1 }),
    ]);
    if (seq !== loadSeq) return;
    fillSources(all);
    if (!all.totals.requests) {
      showOnboarding();
      return finish(seq);
    }
    $("#onboarding").hidden = true;
    $("#content").hidden = false;
    Object.assign(document.body.dataset, {
      since: base.since, until: base.until, prevSince: prev.since, prevUntil: prev.until, bucket: r.bucket, tz: TZ,
    });
    renderCards(cur.totals, before.totals, sessCur.total, sessPrev.total);
    renderTokens(cur.totals);
    await Promise.all([
      loadBurn(base, r.bucket), loadDistribution(base), loadBudgets(), loadSessions(base), loadRequests(base),
    ]);
    finish(seq);
  } catch (err) {
    if (seq !== loadSeq) return;
    document.body.dataset.state = "error";
    if (err instanceof AuthRequired) {
      const rejected = Boolean(token());
      forgetToken();
      showLogin(rejected);
    } else {
      setStatus("error", err.message);
    }
  }
}

function finish(seq) {
  if (seq !== loadSeq) return;
  loadedOnce = true;
  setStatus("ok");
  $("#updated").textContent = `updated ${new Date().toLocaleTimeString("en-GB")}`;
  document.body.dataset.state = "ready";
}

function fillSources(all) {
  const select = $("#source");
  const have = new Set([...select.options].map((o) => o.value));
  for (const g of all.groups) {
    const v = g.key.source;
    if (v && !have.has(v)) select.append(h("option", { value: v }, v));
  }
  select.value = state.source;
}

function showOnboarding() {
  $("#content").hidden = true;
  $("#onboarding").hidden = false;
  const origin = location.origin;
  $("#setup-snippet").textContent = [
    `export OPENAI_BASE_URL=${origin}/v1`,
    `export ANTHROPIC_BASE_URL=${origin}/anthropic`,
    `# Gemini (google-genai): http_options={"base_url": "${origin}/gemini"}`,
  ].join("\n");
}

// ---- cards -----------------------------------------------------------------------------------

function delta(el, now, before) {
  el.replaceChildren();
  const label = rangeNames[state.range];
  if (!before && !now) return el.append(h("span", { class: "flat" }, `no change vs ${label}`));
  if (!before) return el.append(h("span", { class: "up" }, `new vs ${label}`));
  const pct = (100 * (now - before)) / before;
  const cls = pct > 0.05 ? "up" : pct < -0.05 ? "down" : "flat";
  const arrow = cls === "up" ? "▲" : cls === "down" ? "▼" : "=";
  el.append(h("span", { class: cls }, `${arrow} ${Math.abs(pct).toFixed(1)}% vs ${label}`));
}

function renderCards(t, p, sessions, prevSessions) {
  const card = (id) => $(`#card-${id}`);
  card("cost").querySelector(".value").textContent = money(t.cost_usd);
  delta(card("cost").querySelector(".delta"), Number(t.cost_usd), Number(p.cost_usd));
  const tokens = t.input_tokens + t.output_tokens;
  card("tokens").querySelector(".value").textContent = compact(tokens);
  card("tokens").querySelector(".sub").textContent =
    `in ${compact(t.input_tokens)} · cached ${compact(t.cache_read_tokens)} · out ${compact(t.output_tokens)} · reasoning ${compact(t.reasoning_tokens)}`;
  delta(card("tokens").querySelector(".delta"), tokens, p.input_tokens + p.output_tokens);
  card("requests").querySelector(".value").textContent = integer(t.requests);
  const notes = [];
  if (t.unpriced_requests) notes.push(`${integer(t.unpriced_requests)} unpriced`);
  if (t.errors) notes.push(`${integer(t.errors)} errors`);
  card("requests").querySelector(".sub").textContent = notes.join(" · ");
  delta(card("requests").querySelector(".delta"), t.requests, p.requests);
  card("sessions").querySelector(".value").textContent = integer(sessions);
  delta(card("sessions").querySelector(".delta"), sessions, prevSessions);
}

function renderTokens(t) {
  tokenBar($("#tokenbar"), t);
  $("#cache-ratio").textContent = `cache hit ratio ${percent(t.cache_read_tokens, t.input_tokens)} of input tokens`;
}

// ---- charts ----------------------------------------------------------------------------------

async function loadBurn(base, bucket) {
  const ts = await api("/api/timeseries", { ...base, bucket, split: state.stack, tz: TZ, limit: 8 });
  const first = ts.series[0];
  const labels = first ? first.points.map((p) => p.t) : [];
  const series = ts.series.map((sr, k) => ({
    name: sr.key[state.stack] ?? "(none)",
    values: sr.points.map((p) => Number(p.cost_usd)),
    color: PALETTE[k % PALETTE.length],
  }));
  const days = labels.length > 1 && new Date(labels.at(-1)) - new Date(labels[0]) >= DAY;
  const pad = (n) => String(n).padStart(2, "0");
  const fmt = (t) => {
    const d = new Date(t);
    const day = `${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    if (bucket !== "hour") return day;
    return days ? `${day} ${pad(d.getHours())}h` : `${pad(d.getHours())}:00`;
  };
  const axis = (v) => (v === 0 || v >= 0.01 ? `$${v.toFixed(2)}` : money(v));
  stackedBars($("#burn"), { labels, series, format: money, axisFormat: axis, xLabel: fmt });
  if (ts.truncated) $("#burn").append(h("p", { class: "muted" }, "Top 8 shown."));
}

async function loadDistribution(base) {
  const tag = state.dist === "tag";
  $("#dist-tag").hidden = !tag;
  if (tag && !state.distTag) {
    $("#distribution").replaceChildren(h("p", { class: "empty" }, "Type a tag name."));
    return;
  }
  const dim = tag ? `tag:${state.distTag}` : state.dist;
  const s = await api("/api/summary", { ...base, group_by: dim });
  const groups = [...s.groups].sort((a, b) => Number(b.cost_usd) - Number(a.cost_usd));
  const items = groups.slice(0, 9).map((g) => ({ label: g.key[dim] ?? "(none)", value: Number(g.cost_usd) }));
  const rest = groups.slice(9).reduce((a, g) => a + Number(g.cost_usd), 0);
  if (rest) items.push({ label: "other", value: rest });
  shareBars($("#distribution"), items.filter((i) => i.value > 0), Number(s.totals.cost_usd), money);
}

function scopeText(scope) {
  if (!scope || typeof scope !== "object") return scope || "all requests";
  const parts = Object.entries(scope).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`);
  return parts.length ? parts.join(", ") : "all requests";
}

async function loadBudgets() {
  const body = await api("/api/budgets", {}, { optional: true });
  const list = body ? body.budgets || [] : [];
  $("#budgets-panel").hidden = !list.length;
  $("#budgets").replaceChildren(...list.map((b) => {
    const pct = Number(b.percent || 0);
    const projected = b.projected_spend_usd != null
      ? `projected ${money(b.projected_spend_usd)} by ${localTime(b.period_end)}` : "";
    return h("div", { class: `budget ${b.state || "ok"}`, dataset: { name: b.name } },
      h("div", { class: "budget-head" },
        h("b", {}, b.name), h("span", { class: "muted" }, ` ${scopeText(b.scope)} · ${b.period}`),
        h("span", { class: "budget-figures" }, `${money(b.spend_usd)} of ${money(b.limit_usd)} (${pct.toFixed(0)}%)`)),
      h("div", { class: "track" }, h("div", { class: "fill", style: `width:${Math.min(pct, 100)}%` })),
      h("div", { class: "muted" }, projected, b.projected_exceed_at ? ` · limit reached ${localTime(b.projected_exceed_at)}` : ""));
  }));
}

// ---- tables ----------------------------------------------------------------------------------

async function loadSessions(base) {
  const st = state.sessions;
  const body = await api("/api/sessions", {
    ...base, sort: st.sort, order: st.order, limit: st.limit, offset: st.offset, user: st.user,
  });
  const tbody = $("#sessions tbody");
  tbody.replaceChildren(...body.sessions.map((s) => h("tr", { class: "clickable", onclick: () => showSession(s.session) },
    h("td", { class: "mono", title: s.session }, s.session),
    h("td", {}, localTime(s.first_ts)), h("td", {}, localTime(s.last_ts)),
    h("td", {}, (s.models || []).join(", ")),
    h("td", { class: "num" }, integer(s.requests)),
    h("td", { class: "num" }, compact(s.input_tokens + s.output_tokens)),
    h("td", { class: "num" }, money(s.cost_usd)))));
  if (!body.sessions.length) tbody.append(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No sessions in this range (requests without X-Meter-Session are not in a session).")));
  for (const th of document.querySelectorAll("#sessions th[data-sort]")) {
    th.dataset.active = th.dataset.sort === st.sort ? st.order : "";
  }
  const pager = $("#sessions-pager");
  const end = st.offset + body.sessions.length;
  pager.querySelector("span").textContent = body.total ? `${st.offset + 1}–${end} of ${integer(body.total)}` : "";
  pager.querySelector("[data-dir='-1']").disabled = st.offset === 0;
  pager.querySelector("[data-dir='1']").disabled = body.next_offset == null;
}

async function loadRequests(base) {
  const st = state.requests;
  const body = await api("/api/requests", { ...base, ...st.filters, limit: st.limit, cursor: st.cursors[st.page] });
  st.rows = body.requests;
  st.next = body.next_cursor;
  renderRequests();
}

function renderRequests() {
  const st = state.requests;
  const rows = [...st.rows];
  if (st.sortKey) {
    rows.sort((a, b) => {
      const x = a[st.sortKey], y = b[st.sortKey];
      const cmp = typeof x === "number" || typeof y === "number" ? (x ?? -1) - (y ?? -1) : String(x ?? "").localeCompare(String(y ?? ""));
      return cmp * st.sortDir;
    });
  }
  const tbody = $("#requests tbody");
  tbody.replaceChildren(...rows.map((r) => h("tr", { class: "clickable", dataset: { id: r.id }, onclick: () => showRequest(r) },
    h("td", {}, localTime(r.ts)), h("td", {}, r.model || r.requested_model || "–"), h("td", {}, r.provider || "–"),
    h("td", { class: r.status >= 400 ? "num bad" : "num" }, r.status ?? "–"),
    h("td", { class: "num" }, compact(r.input_tokens)), h("td", { class: "num" }, compact(r.output_tokens)),
    h("td", { class: "num" }, ms(r.duration_ms)),
    h("td", { class: "num" }, r.cost_usd == null ? "unpriced" : money(r.cost_usd)))));
  if (!rows.length) tbody.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No requests match.")));
  for (const th of document.querySelectorAll("#requests th[data-key]")) {
    th.dataset.active = th.dataset.key === st.sortKey ? (st.sortDir > 0 ? "asc" : "desc") : "";
  }
  const pager = $("#requests-pager");
  pager.querySelector("span").textContent = `page ${st.page + 1}`;
  pager.querySelector("[data-dir='-1']").disabled = st.page === 0;
  pager.querySelector("[data-dir='1']").disabled = !st.next;
}

// ---- details ---------------------------------------------------------------------------------

function field(label, value) {
  return [h("dt", {}, label), h("dd", {}, value === null || value === undefined || value === "" ? "–" : value)];
}

function showRequest(r) {
  const tags = Object.entries(r.tags || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  $("#detail-body").replaceChildren(
    h("h2", {}, "Request"),
    h("dl", { class: "detail" },
      field("Id", r.id), field("Time", localTime(r.ts)), field("Source", r.source),
      field("Upstream / provider", `${r.upstream || "–"} / ${r.provider || "–"}`), field("Endpoint", `${r.method || ""} ${r.endpoint || ""}`),
      field("Model", r.requested_model && r.requested_model !== r.model ? `${r.requested_model} → ${r.model}` : r.model),
      field("Priced as", r.priced_model), field("Status", r.status), field("Streamed", r.streamed ? "yes" : "no"),
      field("Input tokens", integer(r.input_tokens)), field("Cache read", integer(r.cache_read_tokens)),
      field("Cache write", integer(r.cache_write_tokens)), field("Output tokens", integer(r.output_tokens)),
      field("Reasoning tokens", integer(r.reasoning_tokens)), field("Usage", r.usage_source),
      field("Cost", r.cost_usd == null ? "unpriced" : `${money(r.cost_usd)} (${r.cost_usd} USD)`),
      field("Provider-reported cost", r.provider_cost_usd == null ? null : money(r.provider_cost_usd)),
      field("Latency", ms(r.duration_ms)), field("Time to first byte", ms(r.ttfb_ms)), field("Upstream time", ms(r.upstream_ms)),
      field("User", r.user), field("Session", r.session), field("Tags", tags), field("Key", r.key_fingerprint),
      field("Error", r.error)),
    h("p", { class: "muted" }, "Prompt and completion text are not stored."));
  $("#detail").showModal();
}

async function showSession(id) {
  try {
    const s = await api(`/api/sessions/${encodeURIComponent(id)}`, { limit: 100 });
    const t = s.totals;
    $("#detail-body").replaceChildren(
      h("h2", {}, "Session ", h("span", { class: "mono" }, s.session)),
      h("p", {}, `${localTime(s.first_ts)} → ${localTime(s.last_ts)} · ${integer(t.requests)} requests · `,
        `${compact(t.input_tokens)} in / ${compact(t.output_tokens)} out · `, h("b", {}, money(t.cost_usd))),
      h("table", { class: "data" },
        h("thead", {}, h("tr", {}, ["Time", "Model", "Input", "Output", "Cost"].map((c) => h("th", {}, c)))),
        h("tbody", {}, s.requests.map((r) => h("tr", { class: "clickable", onclick: () => showRequest(r) },
          h("td", {}, localTime(r.ts)), h("td", {}, r.model || "–"), h("td", { class: "num" }, compact(r.input_tokens)),
          h("td", { class: "num" }, compact(r.output_tokens)),
          h("td", { class: "num" }, r.cost_usd == null ? "unpriced" : money(r.cost_usd)))))));
    if (!$("#detail").open) $("#detail").showModal();
  } catch (err) {
    if (err instanceof AuthRequired) showLogin(true);
    else setStatus("error", err.message);
  }
}

// ---- controls --------------------------------------------------------------------------------

function resetPages() {
  state.sessions.offset = 0;
  state.requests.cursors = [null];
  state.requests.page = 0;
}

function selectRange(range) {
  state.range = range;
  for (const b of document.querySelectorAll("#ranges button")) b.setAttribute("aria-pressed", b.dataset.range === range);
  $("#custom").hidden = range !== "custom";
}

$("#ranges").addEventListener("click", (ev) => {
  const range = ev.target.dataset && ev.target.dataset.range;
  if (!range) return;
  if (range === "custom") {
    const today = new Date();
    const fmt = (d) => `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-${String(d.getDate()).padStart(2, "0")}`;
    $("#from").value ||= state.from || fmt(new Date(today - 6 * DAY));
    $("#to").value ||= state.to || fmt(today);
    $("#custom").hidden = false;
    for (const b of document.querySelectorAll("#ranges button")) b.setAttribute("aria-pressed", b.dataset.range === "custom");
    return;
  }
  selectRange(range);
  resetPages();
  load();
});

$("#custom").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if ($("#from").value > $("#to").value) return setStatus("error", "The start date is after the end date.");
  state.from = $("#from").value;
  state.to = $("#to").value;
  selectRange("custom");
  resetPages();
  load();
});

$("#source").addEventListener("change", (ev) => { state.source = ev.target.value; resetPages(); load(); });
$("#stack").addEventListener("change", (ev) => { state.stack = ev.target.value; load({ quiet: true }); });
$("#bucket").addEventListener("change", (ev) => { state.bucket = ev.target.value; load({ quiet: true }); });
$("#dist").addEventListener("change", (ev) => { state.dist = ev.target.value; load({ quiet: true }); });
$("#dist-tag").addEventListener("change", (ev) => { state.distTag = ev.target.value.trim(); load({ quiet: true }); });

$("#sessions thead").addEventListener("click", (ev) => {
  const sort = ev.target.dataset && ev.target.dataset.sort;
  if (!sort) return;
  const st = state.sessions;
  st.order = st.sort === sort && st.order === "desc" ? "asc" : "desc";
  st.sort = sort;
  st.offset = 0;
  load({ quiet: true });
});
$("#sessions-filter").addEventListener("change", (ev) => { state.sessions.user = ev.target.value.trim(); state.sessions.offset = 0; load({ quiet: true }); });
$("#sessions-pager").addEventListener("click", (ev) => {
  const dir = Number(ev.target.dataset && ev.target.dataset.dir);
  if (!dir) return;
  const st = state.sessions;
  st.offset = Math.max(0, st.offset + dir * st.limit);
  load({ quiet: true });
});

$("#requests thead").addEventListener("click", (ev) => {
  const key = ev.target.dataset && ev.target.dataset.key;
  if (!key) return;
  const st = state.requests;
  st.sortDir = st.sortKey === key ? -st.sortDir : -1;
  st.sortKey = key;
  renderRequests();
});
$("#requests-filter").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const data = new FormData(ev.target);
  state.requests.filters = Object.fromEntries([...data.entries()].filter(([, v]) => String(v).trim()));
  state.requests.cursors = [null];
  state.requests.page = 0;
  load({ quiet: true });
});
$("#requests-pager").addEventListener("click", (ev) => {
  const dir = Number(ev.target.dataset && ev.target.dataset.dir);
  if (!dir) return;
  const st = state.requests;
  if (dir > 0 && st.next) {
    st.cursors[st.page + 1] = st.next;
    st.page += 1;
  } else if (dir < 0 && st.page > 0) {
    st.page -= 1;
  }
  load({ quiet: true });
});

setInterval(() => {
  const busy = $("#detail").open || $("#login").open || document.hidden;
  if (loadedOnce && $("#autorefresh").checked && !busy) load({ quiet: true });
}, REFRESH_S * 1000);

if (state.range === "custom" && state.from && state.to) {
  $("#from").value = state.from;
  $("#to").value = state.to;
}
selectRange(state.range);
load();
