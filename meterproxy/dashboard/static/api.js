// The page's only way to the data: fetch /api/* with the admin token when one is needed,
// and the number formats shared with `meterproxy report` (compact tokens, $0.0123 costs).

const TOKEN_KEY = "meterproxy.admin_token";

export class AuthRequired extends Error {}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";
}

export function saveToken(value, remember) {
  sessionStorage.setItem(TOKEN_KEY, value);
  if (remember) localStorage.setItem(TOKEN_KEY, value);
  else localStorage.removeItem(TOKEN_KEY);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  localStorage.removeItem(TOKEN_KEY);
}

// Answers by URL with their ETag: a refresh sends If-None-Match and an unchanged answer comes
// back as a bodiless 304, so the page gets the very same object and need not parse it again.
const answers = new Map();

export function apiUrl(path, params = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) {
    if (Array.isArray(v)) for (const item of v) url.searchParams.append(k, item);
    else if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  return url;
}

export function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

// GET an API path with query params; null for 404 when `optional` (a feature not installed).
export async function api(path, params = {}, { optional = false } = {}) {
  const url = apiUrl(path, params);
  const headers = { Accept: "application/json", ...authHeaders() };
  const known = answers.get(url.href);
  if (known) headers["If-None-Match"] = known.etag;
  const res = await fetch(url, { headers, cache: "no-store" });
  if (res.status === 401) throw new AuthRequired("admin token required");
  if (res.status === 304 && known) return known.body;
  if (res.status === 404 && optional) return null;
  let body = null;
  try {
    body = await res.json();
  } catch {
    body = null;
  }
  if (!res.ok) {
    const why = body && body.error ? body.error.message : `${res.status} ${res.statusText}`;
    throw new Error(`${url.pathname}: ${why}`);
  }
  const etag = res.headers.get("ETag");
  if (etag) {
    if (answers.size > 200) answers.clear();
    answers.set(url.href, { etag, body });
  }
  return body;
}

// As `meterproxy.reports.money`: cents from a dollar up, four decimals below, and two
// significant digits for crumbs (an embeddings call is $0.0000026, never $0.000000).
export function money(v) {
  const n = Number(v || 0);
  if (n === 0) return "$0";
  const a = Math.abs(n);
  if (a >= 1) return "$" + n.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  if (a >= 0.0001) return "$" + n.toFixed(4);
  const digits = Math.min(12, 1 - Math.floor(Math.log10(a)));
  return "$" + n.toFixed(digits);
}

export function compact(n) {
  n = Number(n || 0);
  if (n < 10000) return n.toLocaleString("en-US");
  for (const [unit, size] of [["B", 1e9], ["M", 1e6], ["K", 1e3]]) {
    if (n >= size) {
      const v = n / size;
      return (v < 100 ? v.toFixed(1) : Math.round(v).toLocaleString("en-US")) + unit;
    }
  }
  return String(n);
}

export function integer(n) {
  return Number(n || 0).toLocaleString("en-US");
}

export function percent(part, whole) {
  return whole ? `${((100 * part) / whole).toFixed(1)}%` : "–";
}

export function ms(v) {
  if (v === null || v === undefined) return "–";
  return v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${Math.round(v)} ms`;
}

export function localTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString("en-CA", { dateStyle: "short", timeStyle: "medium", hour12: false });
}

// A tiny element builder: text only, never HTML, so model names and tags cannot inject markup.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
