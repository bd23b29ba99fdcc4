// The operator's dashboard (see aggregator/dashboard.py). Every element is built with DOM calls and
// every value enters as a text node or a numeric attribute: nothing the server relays (an
// evaluation name an operator posted, an outcome, a worker error) is ever parsed as HTML.
"use strict";

const TOKEN_KEY = "fedkb.adminToken";
const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#c63", "#36c", "#3a7", "#a3a"];
const $ = (id) => document.getElementById(id);

function fill(node, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const c of children) if (c !== null && c !== undefined && c !== false) node.append(c instanceof Node ? c : String(c));
  return node;
}
const el = (tag, attrs, ...children) => fill(document.createElement(tag), attrs, children);
const svg = (tag, attrs, ...children) => fill(document.createElementNS(SVG_NS, tag), attrs, children);
const num = (x, d = 3) => (typeof x === "number" && Number.isFinite(x)) ? String(+x.toFixed(d)) : (x === null || x === undefined ? "" : String(x));
const when = (t) => (typeof t === "number") ? new Date(t * 1000).toISOString().slice(0, 19).replace("T", " ") : "";

function progress(id, label, value, max) {
  return [el("p", {}, label), el("progress", {id, value: Math.max(0, value), max: Math.max(1, max)})];
}

function table(node, cols, rows) {
  node.replaceChildren(el("tr", {}, ...cols.map(([name]) => el("th", {}, name))),
    ...rows.map((r) => el("tr", {}, ...cols.map(([, cell]) => el("td", {}, cell(r))))));
}

// series: [{name, color, dots, points: [[x, y], ...]}]; hline: a dashed reference (the clip norm).
function chart(node, series, hline) {
  const W = +node.getAttribute("width"), H = +node.getAttribute("height"), P = 30;
  const ys = series.flatMap((s) => s.points.map((p) => p[1])).concat(hline ? [hline] : []);
  if (!series.some((s) => s.points.length)) {
    node.replaceChildren(svg("text", {x: P, y: H / 2, fill: "#888"}, "no data yet"));
    return;
  }
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y1 = Math.max(...ys) * 1.1 || 1;
  const X = (x) => P + (W - 2 * P) * (x - x0) / (x1 - x0), Y = (y) => H - P - (H - 2 * P) * y / y1;
  const parts = [svg("line", {x1: P, y1: H - P, x2: W - P, y2: H - P, stroke: "#999"}),
                 svg("text", {x: 2, y: P, "font-size": 10}, num(y1)), svg("text", {x: 2, y: H - P, "font-size": 10}, "0")];
  if (hline) parts.push(svg("line", {class: "clip", x1: P, x2: W - P, y1: Y(hline), y2: Y(hline), stroke: "#c33", "stroke-dasharray": 4}),
                        svg("text", {x: W - P - 60, y: Y(hline) - 3, "font-size": 10, fill: "#c33"}, `clip ${num(hline)}`));
  series.forEach((s, i) => {
    if (!s.dots) parts.push(svg("polyline", {fill: "none", stroke: s.color, "stroke-width": 2, points: s.points.map((p) => `${X(p[0])},${Y(p[1])}`).join(" ")}));
    parts.push(...s.points.map((p) => svg("circle", {cx: X(p[0]), cy: Y(p[1]), r: s.dots ? 2.5 : 3.5, fill: s.color})));
    parts.push(svg("text", {class: "legend", x: P + 40, y: 12 + 13 * i, "font-size": 11, fill: s.color}, s.name));
  });
  node.replaceChildren(...parts);
}

function roundView(s, detailed) {
  const r = s.round, out = [];
  if (r) {
    const left = Math.max(0, r.deadline - s.time);
    out.push(el("p", {}, "Round ", el("b", {}, r.id), ` (${r.state}) trains v${r.model_version}; deadline in ${left.toFixed(0)} s.`));
    if (detailed) {
      out.push(...progress("accepted", `accepted ${r.accepted} / goal ${r.goal_clients} (min ${r.min_clients})`, r.accepted, r.goal_clients),
               ...progress("assigned", `assigned ${r.assigned} / ${r.max_assigned}`, r.assigned, r.max_assigned));
      const rejected = Object.entries(r.rejected).map(([k, v]) => `${k} ${v}`).join(", ");
      out.push(el("p", {id: "rejected"}, `rejected: ${rejected || "none"}`));
    }
  } else out.push(el("p", {}, "No active round."));
  const last = s.last_round;
  if (last) out.push(el("p", {class: last.state === "abandoned" ? "bad" : "ok"},
    `Last round ${last.id}: ${last.state} (${last.outcome ?? ""})${last.published_version ? ", published v" + last.published_version : ""}.`));
  if (s.worker && s.worker.last_error) out.push(el("p", {class: "bad", id: "worker-error"}, `worker error: ${s.worker.last_error}`));
  if (!detailed) out.push(el("p", {class: "muted"}, "Round progress, update norms, rejections and evaluations need the operator token."));
  $("round").replaceChildren(...out);
}

// ε spent so far, at which δ, under which assumption, and whether the target ε lets a round open.
function privacyView(s) {
  const p = s.privacy, node = $("privacy");
  node.hidden = !p;
  if (!p) { node.replaceChildren(); return; }
  const out = [], spent = p.spent;
  if (spent) {
    const eps = (x) => x === null ? "unbounded" : num(x, 4);
    out.push(el("p", {id: "privacy-epsilon"}, "Privacy: ", el("b", {}, `ε = ${eps(spent.epsilon)}`),
      ` at δ = ${spent.delta.toExponential(2)} after ${spent.rounds} round${spent.rounds === 1 ? "" : "s"} `
      + `(${spent.mechanism}, noise multiplier ${num(spent.noise_multiplier)}`
      + `${"clip_norm" in spent ? `, clip ${num(spent.clip_norm)}` : ""}; `
      + `without amplification ε = ${eps(spent.epsilon_without_amplification)}).`));
    out.push(el("p", {id: "privacy-assumption", class: "muted"}, `Assumes: ${spent.sampling}. Accountant: ${spent.accountant}.`));
  } else out.push(el("p", {class: "bad"}, `Privacy: ${p.unaccounted}`));
  const b = p.budget;
  if (b && b.target_epsilon !== null)
    out.push(el("p", {id: "privacy-budget", class: b.state === "spent" ? "bad" : "ok"}, `Target ε ${num(b.target_epsilon)}: ${b.message}.`));
  node.replaceChildren(...out);
}

function detailView(s) {
  const n = s.update_norms;
  chart($("norms"), n ? [{name: `round ${n.round_id}`, color: "#36c", dots: true, points: n.norms.map((v, i) => [i + 1, v])}] : [],
        n ? n.clip_norm : null);
  const ev = s.versions.filter((v) => v.eval).sort((a, b) => a.version - b.version);
  const keys = ev.length ? Object.keys(ev[ev.length - 1].eval).slice(0, 4) : [];
  chart($("evals"), keys.map((k, i) => ({name: k, color: COLORS[i], points: ev.filter((v) => k in v.eval).map((v) => [v.version, v.eval[k]])})));
  table($("rounds"), [["round", (x) => x.id], ["state", (x) => x.state], ["version", (x) => x.model_version],
    ["accepted", (x) => `${x.accepted}/${x.goal_clients}`], ["published", (x) => x.published_version ?? ""],
    ["aggregate s", (x) => num(x.aggregate_seconds)], ["publish s", (x) => num(x.publish_seconds)], ["outcome", (x) => x.outcome ?? ""]], s.rounds);
}

function versionsView(s, detailed) {
  const cols = [["version", (x) => x.version], ["parent", (x) => x.parent_version ?? ""], ["round", (x) => x.round_id ?? ""],
                ["created (UTC)", (x) => when(x.created_at)]];
  if (detailed) cols.push(["clients", (x) => x.num_clients], ["examples", (x) => x.total_examples],
    ["eval", (x) => x.eval ? Object.entries(x.eval).map(([k, v]) => `${k}=${num(v)}`).join(" ") : ""]);
  table($("versions"), cols, s.versions);
}

async function fetchStatus() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) {
    const r = await fetch("/v1/admin/status", {cache: "no-store", headers: {Authorization: `Bearer ${token}`}});
    if (r.status !== 401) return [await r.json(), true];
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-note").textContent = "the server refused that token";
  }
  return [await (await fetch("/v1/status", {cache: "no-store"})).json(), false];
}

async function refresh() {
  let s, detailed;
  try { [s, detailed] = await fetchStatus(); }
  catch (e) { $("round").replaceChildren(el("p", {class: "bad"}, `status unavailable: ${e}`)); return; }
  $("version").textContent = `model v${s.model_version}`;
  $("updated").textContent = `updated ${when(s.time)} UTC`;
  $("token-form").hidden = detailed;
  $("forget-row").hidden = !detailed;
  $("detail").hidden = !detailed;
  roundView(s, detailed);
  privacyView(s);
  if (detailed) detailView(s);
  versionsView(s, detailed);
  document.body.dataset.view = detailed ? "operator" : "public";
  document.body.dataset.polls = String(+(document.body.dataset.polls || 0) + 1);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("token").value.trim();
    $("token").value = "";
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    $("token-note").textContent = "";
    refresh();
  });
  $("forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); refresh(); });
  refresh();
  setInterval(refresh, 2000);
});
