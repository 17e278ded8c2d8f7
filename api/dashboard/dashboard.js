// mlxd dashboard: reads /health and /v1/usage, draws plain SVG, redraws every few seconds.
// When the server wants an API key, the page asks for it once and keeps it in this
// browser's localStorage; `/#key=KEY` sets it too (the fragment never reaches the server,
// and the page removes it from the address bar).
"use strict";

const REFRESH_MS = 5000;
const COLORS = ["#3b6fd8", "#e0793a", "#3aa76d", "#b04fc4", "#c9a227", "#d14d5b", "#4fb3c4", "#7d6b5d"];
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const int = (n) => String(n).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
const bytes = (n) => n >= 1e9 ? (n / 1e9).toFixed(2) + " GB" : n >= 1e6 ? (n / 1e6).toFixed(1) + " MB"
  : n >= 1e3 ? (n / 1e3).toFixed(0) + " kB" : int(n) + " B";
const seconds = (s) => s >= 3600 ? (s / 3600).toFixed(1) + " h" : s >= 60 ? (s / 60).toFixed(1) + " min" : s.toFixed(0) + " s";
const fixed = (x, d) => x === null || x === undefined ? "-" : x.toFixed(d);

const KEY_ITEM = "mlxd.apiKey";

class KeyRefused extends Error {}

function takeKeyFromFragment() {
  const match = location.hash.match(/^#(?:.*&)?key=([^&]*)/);
  if (!match) return;
  localStorage.setItem(KEY_ITEM, decodeURIComponent(match[1]));
  history.replaceState(null, "", location.pathname + location.search);
}

async function getJSON(path) {
  const key = localStorage.getItem(KEY_ITEM);
  const headers = key ? { Authorization: "Bearer " + key } : {};
  const response = await fetch(path, { cache: "no-store", headers });
  if (response.status === 401) throw new KeyRefused(key ? "the saved API key was refused" : "this server needs an API key");
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

// Ask for a key; the refresh loop waits until one is given.
function askForKey(message) {
  localStorage.removeItem(KEY_ITEM);
  $("status").textContent = "API key needed";
  $("status").className = "status down";
  $("key-message").textContent = message;
  $("key-form").hidden = false;
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_ITEM, $("key-input").value.trim());
  $("key-input").value = "";
  $("key-form").hidden = true;
  refresh();
});

function isoDay(date) { return date.toISOString().slice(0, 10); }

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function cells(row, values) {
  for (const v of values) { const td = document.createElement("td"); td.textContent = v; row.appendChild(td); }
}

function niceMax(x) {
  if (x <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  return [1, 1.5, 2, 3, 4, 5, 6, 8, 10].map((m) => m * p).find((m) => m >= x);
}

// Stacked bars: one bar per label, one stack per series.
function barChart(target, labels, series) {
  const W = 900, H = 220, L = 60, B = 24, T = 8;
  const totals = labels.map((_, i) => series.reduce((s, ser) => s + ser.values[i], 0));
  const top = niceMax(Math.max(0, ...totals));
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  for (let k = 0; k <= 4; k++) {
    const y = T + (H - T - B) * (1 - k / 4);
    svg.appendChild(el("line", { x1: L, x2: W, y1: y, y2: y, stroke: "#e2e5eb" }));
    svg.appendChild(el("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, int(Math.round(top * k / 4))));
  }
  const slot = (W - L) / Math.max(1, labels.length);
  labels.forEach((label, i) => {
    let y = H - B;
    series.forEach((ser, s) => {
      const h = (H - T - B) * ser.values[i] / top;
      if (h > 0) {
        const rect = el("rect", { x: L + i * slot + slot * 0.15, y: y - h, width: slot * 0.7, height: h, fill: COLORS[s % COLORS.length] });
        rect.appendChild(el("title", {}, `${ser.name} ${label}: ${int(ser.values[i])} tokens`));
        svg.appendChild(rect);
        y -= h;
      }
    });
    svg.appendChild(el("text", { x: L + (i + 0.5) * slot, y: H - 6, "text-anchor": "middle" }, label.slice(5)));
  });
  target.replaceChildren(svg, legend(series.map((s) => s.name)));
}

// Each request as a dot at the time it arrived; the axis spans the requests shown.
function scatterChart(target, points, digits, empty) {
  const W = 440, H = 180, L = 44, B = 24, T = 8;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  const top = niceMax(Math.max(0, ...points.map((p) => p.value)));
  for (let k = 0; k <= 2; k++) {
    const y = T + (H - T - B) * (1 - k / 2);
    svg.appendChild(el("line", { x1: L, x2: W, y1: y, y2: y, stroke: "#e2e5eb" }));
    svg.appendChild(el("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, (top * k / 2).toFixed(digits)));
  }
  if (!points.length) {
    svg.appendChild(el("text", { x: (W + L) / 2, y: H / 2, "text-anchor": "middle" }, empty));
    target.replaceChildren(svg);
    return;
  }
  const t0 = Math.min(...points.map((p) => p.t)), t1 = Math.max(...points.map((p) => p.t));
  const x = (t) => L + 6 + (W - L - 12) * (t1 > t0 ? (t - t0) / (t1 - t0) : 0.5);
  for (const p of points) {
    const dot = el("circle", { cx: x(p.t), cy: T + (H - T - B) * (1 - p.value / top), r: 3, fill: COLORS[0], "fill-opacity": 0.6 });
    dot.appendChild(el("title", {}, `${p.label}: ${p.value.toFixed(digits)}`));
    svg.appendChild(dot);
  }
  const clock = (t) => new Date(t).toISOString().slice(11, 19) + " UTC";
  svg.appendChild(el("text", { x: L, y: H - 6, "text-anchor": "start" }, clock(t0)));
  if (t1 > t0) svg.appendChild(el("text", { x: W, y: H - 6, "text-anchor": "end" }, clock(t1)));
  target.replaceChildren(svg);
}

function legend(names) {
  const box = document.createElement("div");
  box.className = "legend";
  names.forEach((name, i) => {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = COLORS[i % COLORS.length];
    item.append(swatch, name);
    box.appendChild(item);
  });
  return box;
}

function showHealth(health) {
  $("status").textContent = health.status;
  $("status").className = "status " + (health.status === "ok" ? "ok" : "down");
  $("active").textContent = health.requests ? health.requests.active : "-";
  $("queued").textContent = health.requests ? health.requests.queued : "-";
  $("mlx-active").textContent = bytes(health.memory.mlx_active_bytes);
  $("mlx-peak").textContent = bytes(health.memory.mlx_peak_bytes);
  $("prefix-cache").textContent = bytes(health.memory.prompt_cache_bytes);
  const body = $("models");
  body.replaceChildren();
  for (const m of health.models || []) {
    const row = document.createElement("tr");
    cells(row, [m.name, bytes(m.memory_bytes), m.idle_seconds ? seconds(m.idle_seconds) : "busy"]);
    body.appendChild(row);
  }
}

function showTotals(totals) {
  for (const k of ["requests", "prompt", "cached", "computed", "completion", "reasoning"]) {
    const key = k === "requests" ? "requests" : k === "computed" ? "computed_prompt_tokens" : k + "_tokens";
    $("total-" + k).textContent = int(totals[key]);
  }
  $("cache-ratio").textContent = totals.prompt_tokens ? (100 * totals.cached_tokens / totals.prompt_tokens).toFixed(1) + " %" : "-";
}

function showDaily(summary, now) {
  const days = [];
  for (let i = 13; i >= 0; i--) days.push(isoDay(new Date(now - i * 86400000)));
  const models = [...new Set(summary.groups.map((g) => g.key.model))].sort();
  const series = models.map((name) => ({
    name,
    values: days.map((day) => summary.groups
      .filter((g) => g.key.model === name && g.key.day === day)
      .reduce((s, g) => s + g.prompt_tokens + g.completion_tokens, 0)),
  }));
  barChart($("tokens-chart"), days, series);
}

function showTimings(rows) {
  const points = (field) => rows.filter((r) => r[field] !== null)
    .map((r) => ({ t: r.ts * 1000, value: r[field], label: r.model + " " + r.time.slice(11, 19) }));
  scatterChart($("ttft-chart"), points("ttft_s"), 2, "no requests yet");
  scatterChart($("tps-chart"), points("decode_tps"), 1, "no requests yet");
}

function showRequests(rows) {
  const body = $("requests");
  body.replaceChildren();
  for (const r of rows) {
    const row = document.createElement("tr");
    const outcome = r.outcome === "finished" ? r.finish_reason : r.outcome + " (" + r.finish_reason + ")";
    cells(row, [r.time.replace("T", " ").slice(0, 19), r.model, r.door, r.client, outcome, int(r.prompt_tokens),
      int(r.cached_tokens), int(r.completion_tokens), fixed(r.ttft_s, 2), fixed(r.decode_tps, 1)]);
    body.appendChild(row);
  }
}

async function refresh() {
  const now = Date.now();
  try {
    const since14 = isoDay(new Date(now - 13 * 86400000));
    const [health, all, daily, recent] = await Promise.all([
      getJSON("/health"),
      getJSON("/v1/usage"),
      getJSON("/v1/usage?group_by=day,model&since=" + since14),
      getJSON("/v1/usage/requests?limit=200"),
    ]);
    showHealth(health);
    showTotals(all.totals);
    showDaily(daily, now);
    showTimings(recent.data);
    showRequests(recent.data.slice(0, 20));
    $("updated").textContent = "updated " + new Date(now).toISOString().slice(11, 19) + " UTC";
  } catch (e) {
    if (e instanceof KeyRefused) return askForKey(e.message);
    $("status").textContent = "unreachable: " + e.message;
    $("status").className = "status down";
  }
  setTimeout(refresh, REFRESH_MS);
}

takeKeyFromFragment();
refresh();
