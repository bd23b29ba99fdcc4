"""The dashboard page: static HTML plus a small script that polls /v1/status every 2 s.

Kept as a string (no template engine, no CDN, no package data to install): round progress,
rounds and versions tables, an inline-SVG chart of the active round's update norms against the
clip norm, and evaluation curves across versions when evaluations were posted.
"""

DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedkb aggregator</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
 h1{font-size:1.3em} h2{font-size:1.05em;margin-top:1.6em}
 .bar{background:#eee;height:18px;border-radius:4px;position:relative;width:420px}
 .bar span{position:absolute;left:0;top:0;bottom:0;border-radius:4px}
 table{border-collapse:collapse} td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:right}
 th:first-child,td:first-child{text-align:left} .muted{color:#888} .bad{color:#b00} .ok{color:#070}
 svg{background:#fafafa;border:1px solid #ddd}
</style></head><body>
<h1>fedkb aggregator <span id="version" class="muted"></span></h1>
<div id="round">loading…</div>
<h2>Update norms (server-measured, before clipping)</h2>
<svg id="norms" width="640" height="200"></svg>
<h2>Evaluation by model version</h2>
<svg id="evals" width="640" height="200"></svg>
<h2>Rounds</h2><table id="rounds"></table>
<h2>Model versions</h2><table id="versions"></table>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;","\\"":"&quot;"}[c]));
const fmt = (x, d = 3) => (x === null || x === undefined) ? "" : (typeof x === "number" ? +x.toFixed(d) : esc(x));
function bar(value, max, color) {
  const w = max > 0 ? Math.min(100, 100 * value / max) : 0;
  return `<div class="bar"><span style="width:${w}%;background:${color}"></span></div>`;
}
function table(el, cols, rows) {
  el.innerHTML = "<tr>" + cols.map((c) => `<th>${c[0]}</th>`).join("") + "</tr>" +
    rows.map((r) => "<tr>" + cols.map((c) => `<td>${c[1](r)}</td>`).join("") + "</tr>").join("");
}
function chart(svg, series, hline) {
  const W = +svg.getAttribute("width"), H = +svg.getAttribute("height"), P = 30;
  const all = series.flatMap((s) => s.points.map((p) => p[1])).concat(hline ? [hline] : []);
  if (!all.length) { svg.innerHTML = `<text x="${P}" y="${H/2}" fill="#888">no data yet</text>`; return; }
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y1 = Math.max(...all) * 1.1 || 1;
  const X = (x) => P + (W - 2 * P) * (x - x0) / (x1 - x0), Y = (y) => H - P - (H - 2 * P) * y / y1;
  let out = `<line x1="${P}" y1="${H-P}" x2="${W-P}" y2="${H-P}" stroke="#999"/>` +
            `<text x="2" y="${P}" font-size="10">${fmt(y1)}</text><text x="2" y="${H-P}" font-size="10">0</text>`;
  if (hline) out += `<line x1="${P}" x2="${W-P}" y1="${Y(hline)}" y2="${Y(hline)}" stroke="#c33" stroke-dasharray="4"/>` +
                    `<text x="${W-P-60}" y="${Y(hline)-3}" font-size="10" fill="#c33">clip ${fmt(hline)}</text>`;
  series.forEach((s, i) => {
    const pts = s.points.map((p) => `${X(p[0])},${Y(p[1])}`).join(" ");
    if (s.dots) out += s.points.map((p) => `<circle cx="${X(p[0])}" cy="${Y(p[1])}" r="2" fill="${s.color}"/>`).join("");
    else out += `<polyline fill="none" stroke="${s.color}" stroke-width="2" points="${pts}"/>`;
    out += `<text x="${P + 5 + 110 * i}" y="12" font-size="11" fill="${s.color}">${esc(s.name)}</text>`;
  });
  svg.innerHTML = out;
}
async function refresh() {
  let s;
  try { s = await (await fetch("/v1/status", {cache: "no-store"})).json(); }
  catch (e) { $("round").innerHTML = `<span class="bad">status unavailable: ${esc(e)}</span>`; return; }
  $("version").textContent = `model v${s.model_version}`;
  const r = s.round, last = s.last_round;
  let html = "";
  if (r) {
    const left = Math.max(0, r.deadline - s.time);
    html += `<p>Round <b>${r.id}</b> (${r.state}) trains v${r.model_version}; deadline in ${left.toFixed(0)} s.</p>` +
      `<p>accepted ${r.accepted} / goal ${r.goal_clients} (min ${r.min_clients})</p>${bar(r.accepted, r.goal_clients, "#3a7")}` +
      `<p>assigned ${r.assigned} / ${r.max_assigned}</p>${bar(r.assigned, r.max_assigned, "#68c")}` +
      `<p>rejected: ${Object.entries(r.rejected).map(([k, v]) => `${esc(k)} ${v}`).join(", ") || "none"}</p>`;
  } else html += "<p>No active round.</p>";
  if (last) html += `<p class="${last.state === "abandoned" ? "bad" : "ok"}">Last round ${last.id}: ${last.state}` +
      ` (${esc(last.outcome)})${last.published_version ? ", published v" + last.published_version : ""}.</p>`;
  if (s.worker.last_error) html += `<p class="bad">worker error: ${esc(s.worker.last_error)}</p>`;
  $("round").innerHTML = html;
  const n = s.update_norms;
  chart($("norms"), n ? [{name: `round ${n.round_id}`, color: "#36c", dots: true,
                          points: n.norms.map((v, i) => [i + 1, v])}] : [], n ? n.clip_norm : null);
  const ev = s.versions.filter((v) => v.eval).sort((a, b) => a.version - b.version);
  const keys = ev.length ? Object.keys(ev[ev.length - 1].eval).slice(0, 4) : [];
  const colors = ["#c63", "#36c", "#3a7", "#a3a"];
  chart($("evals"), keys.map((k, i) => ({name: k, color: colors[i],
        points: ev.filter((v) => k in v.eval).map((v) => [v.version, v.eval[k]])})));
  table($("rounds"), [["round", (x) => x.id], ["state", (x) => x.state], ["version", (x) => x.model_version],
    ["accepted", (x) => `${x.accepted}/${x.goal_clients}`], ["published", (x) => x.published_version ?? ""],
    ["aggregate s", (x) => fmt(x.aggregate_seconds)], ["publish s", (x) => fmt(x.publish_seconds)],
    ["outcome", (x) => esc(x.outcome)]], s.rounds);
  table($("versions"), [["version", (x) => x.version], ["parent", (x) => x.parent_version ?? ""],
    ["round", (x) => x.round_id ?? ""], ["clients", (x) => x.num_clients], ["examples", (x) => x.total_examples],
    ["created", (x) => new Date(x.created_at * 1000).toISOString().slice(0, 19)],
    ["eval", (x) => x.eval ? Object.entries(x.eval).map(([k, v]) => `${esc(k)}=${fmt(v)}`).join(" ") : ""]], s.versions);
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
