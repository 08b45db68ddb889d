// The status page: reads GET /status (the same JSON scripts read) every few seconds
// and shows it as text, tables and small inline SVG charts.  No framework, no build
// step, nothing from elsewhere: the page must work on a machine without internet.
//
// With a token configured the API answers 401; the page then asks for the token once
// and keeps it in sessionStorage (this tab only) and sends it in the Authorization
// header.  It never goes into a URL: the form is never submitted (and CSP's
// form-action 'none' would refuse it anyway).
"use strict";

const REFRESH_MS = 5000;
// counts older than this (seconds) are said to be (the daemon re-reads a million
// jobs' counts only every 25-60 s)
const COUNTS_STALE_S = 10;
const TOKEN_KEY = "runner-api-token";
const STATES = ["pending", "running", "done", "failed"];
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
let timer = null;

function fmtInt(n) {
  return n === null || n === undefined ? "–" : Math.round(n).toLocaleString("en");
}

function fmtNum(x, digits) {
  if (x === null || x === undefined) return "–";
  return x.toLocaleString("en", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

// The same units as runner.status.format_duration: '45s', '3m 12s', '2h 05m', '3d 04h'.
function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "unknown";
  const s = Math.round(seconds);
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
  return `${Math.floor(s / 86400)}d ${pad(Math.floor((s % 86400) / 3600))}h`;
}

function fmtTime(unixS) {
  const d = new Date(unixS * 1000);
  return d.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" });
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function num(value, text) {
  return el("td", { class: "num", "data-value": String(value) }, text === undefined ? fmtInt(value) : text);
}

function fillBody(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}

// A bar chart of `values` (one per bucket), labelled: its largest value and the
// first and last bucket's times as text in the SVG, and a title on every bar.
function barChart(values, labels, { cls = "bar", unit = "", height = 120, label = "" } = {}) {
  const width = 600;
  const pad = { top: 14, bottom: 18, left: 4, right: 4 };
  const max = Math.max(...values, 0);
  const step = (width - pad.left - pad.right) / Math.max(values.length, 1);
  const inner = height - pad.top - pad.bottom;
  const svg = svgEl("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `${label}: ${values.length} bars, highest ${fmtNum(max, 2)} ${unit}`,
  });
  svg.append(svgEl("line", { class: "axis", x1: pad.left, x2: width - pad.right, y1: height - pad.bottom, y2: height - pad.bottom }));
  values.forEach((v, i) => {
    const h = max > 0 ? (v / max) * inner : 0;
    const bar = svgEl("rect", {
      class: cls,
      x: pad.left + i * step + 1,
      y: height - pad.bottom - h,
      width: Math.max(step - 2, 1),
      height: h,
    });
    bar.append(svgEl("title", {}, `${labels[i]}: ${fmtNum(v, 2)} ${unit}`));
    svg.append(bar);
  });
  svg.append(svgEl("text", { x: pad.left, y: 11 }, `max ${fmtNum(max, 2)} ${unit}`));
  if (labels.length) {
    svg.append(svgEl("text", { x: pad.left, y: height - 4 }, labels[0]));
    svg.append(svgEl("text", { x: width - pad.right, y: height - 4, "text-anchor": "end" }, labels[labels.length - 1]));
  }
  return svg;
}

function sparkline(values, label) {
  const width = 160, height = 26;
  const max = Math.max(...values, 0);
  const step = width / Math.max(values.length, 1);
  const svg = svgEl("svg", { class: "spark", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label, preserveAspectRatio: "none" });
  values.forEach((v, i) => {
    const h = max > 0 ? (v / max) * (height - 2) : 0;
    svg.append(svgEl("rect", { class: "bad", x: i * step, y: height - h, width: Math.max(step - 1, 1), height: h }));
  });
  return svg;
}

function renderProgress(r) {
  const total = r.total || 0;
  const finished = (r.counts.done || 0) + (r.counts.failed || 0);
  const bar = $("bar");
  bar.max = Math.max(total, 1);
  bar.value = finished;
  const pct = total ? (100 * finished) / total : 100;
  $("progress-text").textContent = `${fmtInt(finished)} of ${fmtInt(total)} finished (${fmtNum(pct, 1)} %), ${fmtInt(r.remaining)} left`;
  $("progress-text").dataset.finished = String(finished);
  let eta;
  if (r.remaining === 0) eta = "ETA: nothing left to do";
  else if (r.eta_s === null || r.eta_s === undefined) eta = "ETA: unknown (nothing finished in the last hour)";
  else eta = `ETA: ${fmtDuration(r.eta_s)} (at the last ${r.eta_basis} rate)`;
  $("eta").textContent = eta;
  $("eta").dataset.etaS = r.eta_s === null || r.eta_s === undefined ? "" : String(r.eta_s);
  document.title = `runner: ${fmtNum(pct, 1)} % · ${eta.replace("ETA: ", "ETA ")}`;

  fillBody($("counts"), STATES.map((state) => {
    const n = r.counts[state] || 0;
    return el("tr", { "data-state": state }, el("th", { scope: "row" }, state), num(n), num(total ? n / total : 0, `${fmtNum(total ? (100 * n) / total : 0, 1)} %`));
  }).concat([el("tr", { "data-state": "total" }, el("th", { scope: "row" }, "total"), num(total), el("td", {}, "")) ]));

  fillBody($("rates"), Object.entries(r.rates || {}).map(([label, rate]) =>
    el("tr", { "data-window": label },
      el("th", { scope: "row" }, `last ${label}`),
      el("td", {}, rate.covered_s < rate.window_s ? `${fmtDuration(rate.covered_s)} of it` : "all of it"),
      num(rate.finished),
      num(rate.per_min, fmtNum(rate.per_min, 2)),
      num(rate.audio_h_per_h, fmtNum(rate.audio_h_per_h, 1)))));
}

function renderThroughput(r) {
  const t = r.throughput;
  if (!t) return;
  const buckets = t.buckets;
  const minutes = Math.round(t.bucket_s / 60);
  document.querySelectorAll(".bucket-len").forEach((n) => { n.textContent = `${minutes} min`; });
  const labels = buckets.map((b) => fmtTime(b.start));
  const done = buckets.reduce((a, b) => a + b.done, 0);
  const failed = buckets.reduce((a, b) => a + b.failed, 0);
  const hours = (r.now - t.since) / 3600;
  $("throughput-summary").textContent = `Last ${fmtNum(hours, 1)} h (from finished_at, every daemon): ${fmtInt(done)} done, ${fmtInt(failed)} failed.`;
  $("videos-chart").replaceChildren(barChart(buckets.map((b) => b.videos_per_min), labels, { unit: "videos/min", label: "Videos per minute" }));
  $("audio-chart").replaceChildren(barChart(buckets.map((b) => b.audio_h_per_h), labels, { cls: "bar2", unit: "audio-h/h", label: "Audio-hours per hour" }));
  fillBody($("throughput"), buckets.slice().reverse().map((b) =>
    el("tr", {}, el("th", { scope: "row" }, fmtTime(b.start)), num(b.done), num(b.failed),
      num(b.videos_per_min, fmtNum(b.videos_per_min, 2)), num(b.audio_h_per_h, fmtNum(b.audio_h_per_h, 1)))));

  const classes = t.error_classes || [];
  const rows = classes.map((cls) => {
    const series = buckets.map((b) => b.failed_by_class[cls] || 0);
    const sum = series.reduce((a, b) => a + b, 0);
    const peak = Math.max(...series);
    return el("tr", { "data-class": cls }, el("th", { scope: "row" }, cls), num(sum), num(peak),
      el("td", {}, sparkline(series, `${cls}: ${sum} failed, at most ${peak} per ${minutes} min`)));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "4" }, "No failures in the last hours.")));
  fillBody($("failures-by-class"), rows);
  $("failures-summary").textContent = `${fmtInt(r.counts.failed || 0)} failed in all; ${fmtInt(failed)} in the last ${fmtNum(hours, 1)} h.`;
}

function renderFailures(r) {
  const rows = (r.top_failures || []).map((f) =>
    el("tr", {}, num(f.count), el("td", {}, f.error_class || ""), el("td", {}, f.error || ""),
      el("td", {}, ...(f.examples || []).flatMap((k, i) => (i ? [", ", el("code", {}, k)] : [el("code", {}, k)])))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "4" }, "No failed jobs.")));
  fillBody($("top-failures"), rows);
}

function renderWorkers(r) {
  const now = r.now;
  const rows = (r.workers || []).map((w) => {
    const queues = w.queues ? Object.entries(w.queues).map(([k, v]) => `${k} ${v}`).join(", ") : "–";
    const busy = w.embed_busy_ratio === undefined || w.embed_busy_ratio === null ? "–" : `${fmtNum(100 * w.embed_busy_ratio, 0)} %`;
    const lease = w.lease_expires_at ? fmtDuration(Math.max(0, w.lease_expires_at - now)) : "–";
    const oldest = w.oldest_claim_age_s === null || w.oldest_claim_age_s === undefined ? "–" : `${fmtDuration(w.oldest_claim_age_s)} ago`;
    const held = w.in_hand !== undefined ? w.in_hand : w.running;
    const name = el("td", {}, el("code", {}, w.worker_id));
    if (w.this) name.append(" (this one)");
    return el("tr", { "data-worker": w.worker_id }, name, el("td", {}, w.host || ""), num(held), el("td", {}, oldest),
      el("td", {}, lease), num(w.finished_1h || 0), el("td", {}, queues), el("td", {}, busy));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "8" }, "No daemon holds jobs or finished any in the last hour.")));
  fillBody($("workers"), rows);
}

function describeValue(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

// Whatever the report has under `specs` (the spec of done vectors, with counts), or
// until it has that, the models of recently done jobs and the daemon's own model.
function renderSpec(r) {
  const box = $("spec");
  const parts = [];
  const specs = r.specs;
  if (specs && (Array.isArray(specs) ? specs.length : Object.keys(specs).length)) {
    // runner.spec's entries: {id, description, spec: {model, layer, pooling, ...}}
    const list = (Array.isArray(specs) ? specs : Object.entries(specs).map(([id, s]) => ({ id, spec: s })))
      .map((s) => {
        const flat = { id: s.id, description: s.description };
        const inner = s.spec && typeof s.spec === "object" ? s.spec : {};
        for (const [k, v] of Object.entries(inner)) flat[k] = v;
        for (const [k, v] of Object.entries(s)) if (!["id", "description", "spec"].includes(k)) flat[k] = v;
        return flat;
      });
    const keys = [...new Set(list.flatMap((s) => Object.keys(s)))].filter((k) => list.some((s) => s[k] !== undefined));
    const table = el("table", { id: "specs" }, el("caption", {}, "Embedding specs recorded for stored vectors"),
      el("thead", {}, el("tr", {}, ...keys.map((k) => el("th", { scope: "col" }, k)))),
      el("tbody", {}, ...list.map((s) => el("tr", {}, ...keys.map((k) => el("td", {}, describeValue(s[k])))))));
    parts.push(el("div", { class: "scroll" }, table));
  }
  const models = (r.throughput && r.throughput.models) || [];
  if (models.length) {
    parts.push(el("p", {}, "Models of jobs done in the last hour: ",
      ...models.flatMap((m, i) => [i ? "; " : "", el("code", {}, m.model_id), ` (${fmtInt(m.done)})`])));
  }
  if (r.daemon && r.daemon.model_id) {
    parts.push(el("p", {}, "This daemon's model: ", el("code", {}, r.daemon.model_id)));
  }
  if (!parts.length) parts.push(el("p", {}, "No vectors stored yet."));
  box.replaceChildren(...parts);
}

function render(r) {
  renderProgress(r);
  renderThroughput(r);
  renderFailures(r);
  renderWorkers(r);
  renderSpec(r);
  const asOf = new Date(r.now * 1000).toLocaleString("en-GB");
  let text = `As of ${asOf}; refreshes every ${REFRESH_MS / 1000} s.`;
  // a big database's counts are re-read every 25-60 s: say how old they are then
  const countsAge = r.counts_as_of === null || r.counts_as_of === undefined ? 0 : r.now - r.counts_as_of;
  if (countsAge > COUNTS_STALE_S) text += ` Counts as of ${fmtDuration(countsAge)} earlier.`;
  $("as-of").textContent = text;
  $("as-of").dataset.countsAgeS = String(Math.max(0, countsAge));
  $("error").hidden = true;
  $("token-form").hidden = true;
  $("report").hidden = false;
  document.body.dataset.state = "ready";
  document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(load, REFRESH_MS);
}

function askToken(message) {
  clearTimeout(timer);
  $("report").hidden = true;
  $("token-form").hidden = false;
  $("token-error").textContent = message;
  $("as-of").textContent = "This API needs a token.";
  document.body.dataset.state = "token";
  $("token").focus();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  document.body.dataset.state = document.body.dataset.state === "ready" ? "ready" : "error";
}

async function load() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch("/status?top=10", { headers, cache: "no-store", credentials: "omit" });
  } catch (err) {
    showError(`cannot reach the daemon (${err.message}); retrying`);
    schedule();
    return;
  }
  if (response.status === 401) {
    if (token) sessionStorage.removeItem(TOKEN_KEY);
    askToken(token ? "That token was refused; enter it again." : "");
    return;
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    showError(`GET /status: ${message}`);
    schedule();
    return;
  }
  render(await response.json());
  schedule();
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    $("token").value = "";
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    load();
  });
  load();
});
