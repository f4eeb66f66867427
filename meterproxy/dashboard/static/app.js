// The analytics page: one state object (mirrored in the URL, so a view can be shared), one
// `load` that fetches what the state asks for from the JSON API, and views that only draw.
// Every figure shown comes from /api/*; every filter applies to every figure.

import {
  AuthRequired, api, apiUrl, authHeaders, compact, forgetToken, h, integer, money, percent, saveToken, token,
} from "./api.js";
import { PALETTE, shareBars, stackedBars, tokenBar } from "./charts.js";
import {
  $, markSorted, renderBudgets, renderCards, renderUnpriced, requestDetail, requestRows, sessionDetail, sessionRows,
} from "./views.js";

const params = new URLSearchParams(location.search);
const TZ = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
const REFRESH_S = Math.max(1, Number(params.get("refresh") || 30));
const DAY = 86400000;
const HOUR = 3600000;
const FILTERS = ["source", "provider", "model", "user", "project", "session"];
const PREFIX = new Set(["provider", "model", "user"]); // typed names match by prefix
const BURN_SERIES = 8;

const state = {
  range: params.get("range") || "7d",
  from: params.get("from") || "",
  to: params.get("to") || "",
  filters: Object.fromEntries(FILTERS.filter((f) => params.get(f)).map((f) => [f, params.get(f)])),
  stack: params.get("stack") || "model",
  bucket: params.get("bucket") || "",
  dist: params.get("dist") || "model",
  distTag: params.get("tag") || "",
  raw: params.get("raw") === "1",
  sessions: { sort: "last_seen", order: "desc", offset: 0, limit: 10 },
  requests: { sort: "time", order: "desc", cursors: [null], page: 0, offset: 0, limit: 20, next: null },
  detail: null,
};
let loadSeq = 0;
let loadedOnce = false;
// The load whose answers are still awaited, if any. The periodic refresh never starts a load while
// one is in flight: a new load supersedes the old one (its answers are dropped), so on a server
// slower than the refresh interval each tick would cancel the last and the page would never show
// anything again. A load the user asks for (range, filters) still supersedes at once.
let inFlight = 0;
let lastBurn = null;

// ---- time ranges -----------------------------------------------------------------------------

function localDate(s) {
  const [y, m, d] = s.split("-").map(Number);
  return new Date(y, m - 1, d);
}

// Ranges that end now end at the next whole hour instead: every row so far is inside, and the
// URLs stay the same between two refreshes within the hour, so an unchanged answer is a 304.
function bounds() {
  const now = new Date();
  const nextHour = new Date(Math.ceil((now.getTime() + 1) / HOUR) * HOUR);
  let since;
  let until = nextHour;
  const midnight = new Date(now.getFullYear(), now.getMonth(), now.getDate());
  switch (state.range) {
    case "today": since = midnight; break;
    case "30d": since = new Date(nextHour - 30 * DAY); break;
    case "month": since = new Date(now.getFullYear(), now.getMonth(), 1); break;
    case "custom":
      since = localDate(state.from);
      until = new Date(localDate(state.to).getTime() + DAY);
      break;
    default: since = new Date(nextHour - 7 * DAY);
  }
  const span = until - since;
  // The previous range has the same length and the same place in the calendar.
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
  return { since, until, prevSince, prevUntil, bucket, open: state.range !== "custom", now };
}

const iso = (d) => d.toISOString();
const rangeNames = {
  today: "yesterday by this time", "7d": "previous 7 days", "30d": "previous 30 days",
  month: "last month by this day", custom: "previous period",
};

function exactRange(r) {
  const fmt = (d) => d.toLocaleString("en-GB", { day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit", hour12: false });
  const end = r.open ? `now (${fmt(r.now)})` : fmt(new Date(r.until - 1));
  return `${fmt(r.since)} → ${end}, ${TZ}`;
}

// The filters as API parameters: typed names match by prefix, the project is a tag.
function filterParams() {
  const out = {};
  for (const [k, v] of Object.entries(state.filters)) {
    if (!v) continue;
    if (k === "project") out.tag = `project:${v}`;
    else out[k] = PREFIX.has(k) && !v.endsWith("*") ? `${v}*` : v;
  }
  return out;
}

function syncUrl() {
  const q = new URLSearchParams();
  q.set("range", state.range);
  if (state.range === "custom") { q.set("from", state.from); q.set("to", state.to); }
  for (const [k, v] of Object.entries(state.filters)) if (v) q.set(k, v);
  if (state.stack !== "model") q.set("stack", state.stack);
  if (state.bucket) q.set("bucket", state.bucket);
  if (state.dist !== "model") q.set("dist", state.dist);
  if (state.distTag) q.set("tag", state.distTag);
  if (state.raw) q.set("raw", "1");
  if (params.get("refresh")) q.set("refresh", params.get("refresh"));
  history.replaceState(null, "", `${location.pathname}?${q}`);
}

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

// ---- model names -----------------------------------------------------------------------------

// One model reaches the store under several names; the API says which price-table id each one
// prices as. Grouped by that id unless the reader asks for the raw names.
function modelName(raw, priced) {
  if (state.raw || !raw) return raw ?? "(none)";
  return priced[raw] || raw;
}

function mergeGroups(groups, dim, priced) {
  const merged = new Map();
  for (const g of groups) {
    const raw = g.key[dim] ?? null;
    const name = dim === "model" ? modelName(raw, priced) : raw ?? "(none)";
    const m = merged.get(name) || { label: name, names: new Set(), cost: 0, unpriced: 0, requests: 0 };
    if (raw) m.names.add(raw);
    m.cost += Number(g.cost_usd);
    m.unpriced += g.unpriced_requests;
    m.requests += g.requests;
    merged.set(name, m);
  }
  return [...merged.values()];
}

// ---- loading ---------------------------------------------------------------------------------

async function load({ quiet = false } = {}) {
  const seq = ++loadSeq;
  inFlight = seq;
  if (!quiet) setStatus("loading");
  document.body.dataset.state = "loading";
  syncUrl();
  try {
    const r = bounds();
    const f = filterParams();
    const base = { since: iso(r.since), until: iso(r.until), ...f };
    const prev = { since: iso(r.prevSince), until: iso(r.prevUntil), ...f };
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
      filters: JSON.stringify(f),
    });
    $("#range-text").textContent = exactRange(r);
    renderCards(cur, before, sessCur, sessPrev.total, rangeNames[state.range]);
    renderUnpriced(cur.unpriced_models || []);
    tokenBar($("#tokenbar"), cur.totals);
    $("#cache-ratio").textContent = `cache hit ratio ${percent(cur.totals.cache_read_tokens, cur.totals.input_tokens)} of input tokens`;
    await Promise.all([
      loadBurn(base, r.bucket), loadDistribution(base), loadBudgets(), loadSessions(base), loadRequests(base),
      loadSuggestions(base),
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
  } finally {
    if (inFlight === seq) inFlight = 0;
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
  const select = $("#filters [name=source]");
  const have = new Set([...select.options].map((o) => o.value));
  for (const g of all.groups) {
    const v = g.key.source;
    if (v && !have.has(v)) select.append(h("option", { value: v }, v));
  }
  select.value = state.filters.source || "";
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

// Suggestions for the filter boxes: the values the range holds (names from the data, not guesses).
// Read once per range, not on every refresh.
let suggested = "";
async function loadSuggestions(base) {
  const since = base.since, until = base.until;
  if (suggested === `${since}/${until}`) return;
  suggested = `${since}/${until}`;
  const [byModel, byUser, byProject] = await Promise.all([
    api("/api/summary", { since, until, group_by: "model,provider" }),
    api("/api/summary", { since, until, group_by: "user" }),
    api("/api/summary", { since, until, group_by: "tag:project" }),
  ]);
  const fill = (id, values) => $(id).replaceChildren(...[...new Set(values.filter(Boolean))].sort()
    .map((v) => h("option", { value: v })));
  fill("#list-model", byModel.groups.map((g) => g.key.model));
  fill("#list-provider", byModel.groups.map((g) => g.key.provider));
  fill("#list-user", byUser.groups.map((g) => g.key.user));
  fill("#list-project", byProject.groups.map((g) => g.key["tag:project"]));
}

// ---- charts ----------------------------------------------------------------------------------

async function loadBurn(base, bucket) {
  const ts = await api("/api/timeseries", { ...base, bucket, split: state.stack, tz: TZ, limit: 1000 });
  const priced = ts.priced_models || {};
  // Merge series under one name (priced model), then keep the top 8 and fold the rest into
  // "other", so the bars always add up to the range's total.
  const merged = new Map();
  for (const sr of ts.series) {
    const raw = sr.key[state.stack] ?? null;
    const name = state.stack === "model" ? modelName(raw, priced) : raw ?? "(none)";
    const values = sr.points.map((p) => Number(p.cost_usd));
    const m = merged.get(name);
    if (m) m.values = m.values.map((v, i) => v + values[i]);
    else merged.set(name, { name, values });
  }
  const ranked = [...merged.values()].map((m) => ({ ...m, sum: m.values.reduce((a, v) => a + v, 0) }))
    .filter((m) => m.sum > 0).sort((a, b) => b.sum - a.sum);
  const series = ranked.slice(0, BURN_SERIES);
  const rest = ranked.slice(BURN_SERIES);
  if (rest.length) {
    series.push({ name: `other (${rest.length})`, values: rest[0].values.map((_, i) => rest.reduce((a, m) => a + m.values[i], 0)) });
  }
  series.forEach((sr, k) => { sr.color = k === BURN_SERIES ? "#868e96" : PALETTE[k % PALETTE.length]; });
  const first = ts.series[0];
  const labels = first ? first.points.map((p) => p.t) : [];
  const unpriced = ts.series.reduce((a, sr) => a + sr.totals.unpriced_requests, 0);
  lastBurn = { labels, series, bucket, unpriced };
  drawBurn();
}

function drawBurn() {
  if (!lastBurn) return;
  const { labels, series, bucket } = lastBurn;
  const days = labels.length > 1 && new Date(labels.at(-1)) - new Date(labels[0]) >= DAY;
  const pad = (n) => String(n).padStart(2, "0");
  const fmt = (t) => {
    const d = new Date(t);
    const day = `${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    if (bucket !== "hour") return day;
    return days ? `${day} ${pad(d.getHours())}h` : `${pad(d.getHours())}:00`;
  };
  const axis = (v) => (v === 0 || v >= 0.01 ? `$${v.toFixed(v >= 100 ? 0 : 2)}` : money(v));
  stackedBars($("#burn"), { labels, series, format: money, axisFormat: axis, xLabel: fmt });
  if (lastBurn.unpriced) {
    $("#burn").append(h("p", { class: "muted small unpriced-note" },
      `${integer(lastBurn.unpriced)} unpriced requests are not drawn (their cost is unknown; see Unpriced spend).`));
  }
}

async function loadDistribution(base) {
  const tag = state.dist === "tag";
  $("#dist-tag").hidden = !tag;
  $("#dist-tag").value = state.distTag;
  if (tag && !state.distTag) {
    $("#distribution").replaceChildren(h("p", { class: "empty" }, "Type a tag name."));
    return;
  }
  const dim = tag ? `tag:${state.distTag}` : state.dist === "project" ? "tag:project" : state.dist;
  const s = await api("/api/summary", { ...base, group_by: dim });
  const groups = mergeGroups(s.groups, dim, s.priced_models || {});
  const priced = groups.filter((g) => g.cost > 0).sort((a, b) => b.cost - a.cost);
  const items = priced.slice(0, 9).map((g) => ({ label: g.label, value: g.cost, title: [...g.names].join(", ") || g.label }));
  const rest = priced.slice(9).reduce((a, g) => a + g.cost, 0);
  if (rest) items.push({ label: "other", value: rest });
  // Unpriced names stay on the list, with their request count instead of an invented $0.
  for (const g of groups.filter((x) => x.unpriced && !x.cost).sort((a, b) => b.unpriced - a.unpriced)) {
    items.push({ label: g.label, value: 0, note: `${integer(g.unpriced)} unpriced`, title: `${g.label}: not in the price tables` });
  }
  shareBars($("#distribution"), items, Number(s.totals.cost_usd), money);
}

async function loadBudgets() {
  const body = await api("/api/budgets", {}, { optional: true });
  renderBudgets(body ? body.budgets || [] : []);
}

// ---- tables ----------------------------------------------------------------------------------

async function loadSessions(base) {
  const st = state.sessions;
  const body = await api("/api/sessions", { ...base, sort: st.sort, order: st.order, limit: st.limit, offset: st.offset });
  const tbody = $("#sessions tbody");
  tbody.replaceChildren(...sessionRows(body.sessions, (id) => showSession(id, 0)));
  if (!body.sessions.length) tbody.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No sessions in this range (requests without X-Meter-Session are not in a session).")));
  markSorted("#sessions", "data-sort", st.sort, st.order);
  const pager = $("#sessions-pager");
  const end = st.offset + body.sessions.length;
  pager.querySelector("span").textContent = body.total ? `${integer(st.offset + 1)}–${integer(end)} of ${integer(body.total)}` : "";
  pager.querySelector("[data-dir='-1']").disabled = st.offset === 0;
  pager.querySelector("[data-dir='1']").disabled = body.next_offset == null;
}

async function loadRequests(base) {
  const st = state.requests;
  const byTime = st.sort === "time" && st.order === "desc";
  const query = { ...base, limit: st.limit };
  if (byTime) query.cursor = st.cursors[st.page];
  else Object.assign(query, { sort: st.sort, order: st.order, offset: st.offset });
  const body = await api("/api/requests", query);
  st.next = byTime ? body.next_cursor : body.next_offset;
  const tbody = $("#requests tbody");
  tbody.replaceChildren(...requestRows(body.requests, showRequest));
  if (!body.requests.length) tbody.append(h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No requests match.")));
  markSorted("#requests", "data-key", st.sort, st.order);
  $("#most-expensive").setAttribute("aria-pressed", st.sort === "cost" && st.order === "desc");
  $("#newest").setAttribute("aria-pressed", byTime);
  const pager = $("#requests-pager");
  pager.querySelector("span").textContent = byTime ? `page ${st.page + 1}`
    : body.total ? `${integer(st.offset + 1)}–${integer(st.offset + body.requests.length)} of ${integer(body.total)}` : "";
  pager.querySelector("[data-dir='-1']").disabled = byTime ? st.page === 0 : st.offset === 0;
  pager.querySelector("[data-dir='1']").disabled = st.next == null;
}

// ---- details ---------------------------------------------------------------------------------

function openDetail(children) {
  $("#detail-body").replaceChildren(...children);
  if (!$("#detail").open) $("#detail").showModal();
}

function showRequest(r) {
  openDetail(requestDetail(r));
}

async function showSession(id, offset) {
  try {
    const r = bounds();
    const s = await api(`/api/sessions/${encodeURIComponent(id)}`, { since: iso(r.since), until: iso(r.until), limit: 100, offset });
    state.detail = { id, offset };
    openDetail(sessionDetail(s, offset, (dir) => showSession(id, Math.max(0, offset + dir * 100)), showRequest));
  } catch (err) {
    if (err instanceof AuthRequired) showLogin(true);
    else setStatus("error", err.message);
  }
}

// ---- what-if ---------------------------------------------------------------------------------

// On demand only (never on the 30 s refresh): it reprices every row of the range on the server.
async function runWhatIf(form) {
  const r = bounds();
  const data = new FormData(form);
  const query = { since: iso(r.since), until: iso(r.until), ...filterParams(), as_model: data.get("as_model").trim() };
  if (data.get("as_provider").trim()) query.as_provider = data.get("as_provider").trim();
  query.prices = data.get("prices");
  const note = $("#whatif-note");
  const table = $("#whatif");
  note.textContent = "Pricing…";
  try {
    const w = await api("/api/whatif", query);
    $("#whatif-as").textContent = `As ${w.as_model}`;
    const signed = (v) => (Number(v) > 0 ? "+" : Number(v) < 0 ? "−" : "") + money(Math.abs(Number(v)));
    const row = (m, label) => h("tr", {},
      h("td", { "data-label": "Model" }, label),
      h("td", { class: "num", "data-label": "Requests" }, integer(m.requests)),
      ...(m.compared_requests
        ? [h("td", { class: "num", "data-label": "Actual" }, money(m.actual_cost_usd)),
          h("td", { class: "num", "data-label": `As ${w.as_model}` }, money(m.as_model_cost_usd)),
          h("td", { class: "num", "data-label": "Difference" }, signed(m.difference_usd))]
        : [h("td", { class: "num", "data-label": "Actual" }, m.actual_unpriced_requests ? "unpriced" : "–"),
          h("td", { class: "num", "data-label": `As ${w.as_model}` }, "–"),
          h("td", { class: "num", "data-label": "Difference" }, "–")]));
    table.tBodies[0].replaceChildren(...w.models.map((m) => row(m, m.model)));
    table.tFoot.replaceChildren(row(w.totals, "Total"));
    table.hidden = false;
    const t = w.totals;
    const left = [];
    if (t.as_model_unpriced_requests) left.push(`${integer(t.as_model_unpriced_requests)} ${w.as_model} has no price for at their date`);
    if (t.actual_unpriced_requests) left.push(`${integer(t.actual_unpriced_requests)} unpriced as recorded`);
    note.textContent = `Priced as ${w.priced_as} ${w.prices === "today" ? "at today's prices" : "at each request's date"}; `
      + `compared ${integer(t.compared_requests)} requests${left.length ? ` (left out: ${left.join("; ")})` : ""}. `
      + `Caching saved ${money(w.cache_savings.saved_usd)} on this traffic, net of cache-write premiums.`
      // Estimates (no usage reported) never join the table's totals: a sentence of their own.
      // As `report --as-model` prints it: every estimated request counted, priced where both ways can.
      + (w.estimated.requests
        ? ` Estimated (not in the totals): ${integer(w.estimated.requests)} requests without usage, `
          + (w.estimated.compared_requests
            ? `${money(w.estimated.actual_cost_usd)} as recorded, ${money(w.estimated.as_model_cost_usd)} as ${w.as_model}.`
            : "none priced both ways.")
        : "");
  } catch (err) {
    if (err instanceof AuthRequired) showLogin(true);
    table.hidden = true;
    note.textContent = err.message;
  }
}

$("#whatif-form").addEventListener("submit", (ev) => { ev.preventDefault(); runWhatIf(ev.target); });

// ---- export ----------------------------------------------------------------------------------

async function exportRows(format) {
  const r = bounds();
  const url = apiUrl("/api/export", { format, since: iso(r.since), until: iso(r.until), ...filterParams() });
  try {
    const res = await fetch(url, { headers: authHeaders() });
    if (res.status === 401) throw new AuthRequired("admin token required");
    if (!res.ok) throw new Error(`export: ${res.status} ${res.statusText}`);
    const blob = await res.blob();
    const a = h("a", { href: URL.createObjectURL(blob), download: `meterproxy-${state.range}.${format}` });
    document.body.append(a);
    a.click();
    a.remove();
  } catch (err) {
    if (err instanceof AuthRequired) showLogin(true);
    else setStatus("error", err.message);
  }
}

// ---- controls --------------------------------------------------------------------------------

function resetPages() {
  state.sessions.offset = 0;
  Object.assign(state.requests, { cursors: [null], page: 0, offset: 0 });
}

function selectRange(range) {
  state.range = range;
  for (const b of document.querySelectorAll("#ranges button")) b.setAttribute("aria-pressed", b.dataset.range === range);
  $("#custom").hidden = range !== "custom";
}

function showFilters() {
  const form = $("#filters");
  for (const name of FILTERS) form.elements[name].value = state.filters[name] || "";
  const active = Object.entries(state.filters).filter(([, v]) => v).map(([k, v]) => `${k}: ${v}`);
  $("#filter-summary").textContent = active.length ? `(${active.join(", ")})` : "(none)";
}

$("#ranges").addEventListener("click", (ev) => {
  const button = ev.target.closest("button");
  const range = button && button.dataset.range;
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

$("#filters").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const data = new FormData(ev.target);
  state.filters = Object.fromEntries([...data.entries()].map(([k, v]) => [k, String(v).trim()]).filter(([, v]) => v));
  showFilters();
  resetPages();
  load();
});
$("#filters [name=source]").addEventListener("change", () => $("#filters").requestSubmit());
$("#clear-filters").addEventListener("click", () => {
  state.filters = {};
  showFilters();
  resetPages();
  load();
});

$("#stack").addEventListener("change", (ev) => { state.stack = ev.target.value; load({ quiet: true }); });
$("#bucket").addEventListener("change", (ev) => { state.bucket = ev.target.value; load({ quiet: true }); });
$("#dist").addEventListener("change", (ev) => { state.dist = ev.target.value; load({ quiet: true }); });
$("#dist-tag").addEventListener("change", (ev) => { state.distTag = ev.target.value.trim(); load({ quiet: true }); });
$("#raw-names").addEventListener("change", (ev) => { state.raw = ev.target.checked; load({ quiet: true }); });
$("#export-csv").addEventListener("click", () => exportRows("csv"));
$("#export-jsonl").addEventListener("click", () => exportRows("jsonl"));

$("#sessions thead").addEventListener("click", (ev) => {
  const th = ev.target.closest("th[data-sort]");
  if (!th) return;
  const st = state.sessions;
  st.order = st.sort === th.dataset.sort && st.order === "desc" ? "asc" : "desc";
  st.sort = th.dataset.sort;
  st.offset = 0;
  load({ quiet: true });
});
$("#sessions-pager").addEventListener("click", (ev) => {
  const dir = Number(ev.target.dataset && ev.target.dataset.dir);
  if (!dir) return;
  const st = state.sessions;
  st.offset = Math.max(0, st.offset + dir * st.limit);
  load({ quiet: true });
});

function sortRequests(sort, order) {
  Object.assign(state.requests, { sort, order, cursors: [null], page: 0, offset: 0 });
  load({ quiet: true });
}

$("#requests thead").addEventListener("click", (ev) => {
  const th = ev.target.closest("th[data-key]");
  if (!th) return;
  const st = state.requests;
  const key = th.dataset.key;
  sortRequests(key, st.sort === key && st.order === "desc" ? "asc" : "desc");
});
$("#most-expensive").addEventListener("click", () => sortRequests("cost", "desc"));
$("#newest").addEventListener("click", () => sortRequests("time", "desc"));
$("#requests-pager").addEventListener("click", (ev) => {
  const dir = Number(ev.target.dataset && ev.target.dataset.dir);
  if (!dir) return;
  const st = state.requests;
  if (st.sort === "time" && st.order === "desc") {
    if (dir > 0 && st.next) {
      st.cursors[st.page + 1] = st.next;
      st.page += 1;
    } else if (dir < 0 && st.page > 0) {
      st.page -= 1;
    }
  } else {
    st.offset = Math.max(0, st.offset + dir * st.limit);
  }
  load({ quiet: true });
});

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(drawBurn, 150);
});

setInterval(() => {
  const busy = $("#detail").open || $("#login").open || document.hidden;
  if (loadedOnce && !inFlight && $("#autorefresh").checked && !busy) load({ quiet: true });
}, REFRESH_S * 1000);

if (state.range === "custom" && state.from && state.to) {
  $("#from").value = state.from;
  $("#to").value = state.to;
}
$("#stack").value = state.stack;
$("#bucket").value = state.bucket;
$("#dist").value = state.dist;
$("#raw-names").checked = state.raw;
if (Object.keys(state.filters).length) $("#filters-box").open = true;
showFilters();
selectRange(state.range);
load();
