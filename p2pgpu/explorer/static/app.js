// p2pgpu explorer page: renders /api/stream (Server-Sent Events), falls back to polling /api/all.
// Every value from the network is untrusted text: it is set with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const checks = new Map(); // proof_hash -> last check result, kept across re-renders

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k === "style") e.style.cssText = v; // CSSOM: allowed by the page's Content-Security-Policy
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const short = (s, n = 10) => (typeof s === "string" && s.length > n + 2 ? s.slice(0, n) + "…" : s ?? "–");
const idSpan = (s, n) => el("span", { class: "id", title: s || "" }, short(s, n));
const fmtInt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : "–");
function fmtMem(mb) {
  if (typeof mb !== "number" || mb <= 0) return "–";
  return (mb / 1024).toFixed(mb % 1024 === 0 ? 0 : 1) + " GiB";
}
function fmtAmount(amount, currency) {
  if (typeof amount !== "number") return "–";
  if (!currency || currency === "SOL") {
    // Below 0.001 SOL, lamports read better than a long row of zeros.
    if (Math.abs(amount) < 1e6) return amount.toLocaleString("en-US") + (amount === 1 ? " lamport" : " lamports");
    return (amount / 1e9).toLocaleString("en-US", { maximumFractionDigits: 6 }) + " SOL";
  }
  return amount.toLocaleString("en-US") + " " + short(currency, 6);
}
function fmtMs(ms) {
  if (typeof ms !== "number") return "–";
  return ms < 1000 ? ms + " ms" : (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
}
function pill(text, kind) { return el("span", { class: "pill " + (kind || "") }, text); }
function stateKind(s) {
  if (["paid", "done", "succeeded", "finished", "completed", "confirmed", "running"].includes(s)) return "ok";
  if (["failed", "cancelled", "expired", "rejected", "lost"].includes(s)) return "bad";
  return "wait";
}

// A table whose cells carry data-label (the phone layout shows it as the cell's caption).
function table(cols, rows) {
  const head = el("thead", {}, el("tr", {}, cols.map((c) => el("th", { class: c.num ? "num" : "" }, c.label))));
  const body = el("tbody", {}, rows.map((r) => el("tr", {}, cols.map((c) => {
    const v = c.render(r);
    return el("td", { "data-label": c.label, class: [c.num ? "num" : "", c.wide ? "wide" : ""].join(" ").trim() },
      v instanceof Node ? v : String(v ?? "–"));
  }))));
  return el("table", {}, head, body);
}

function empty(panel, what) {
  if (!panel.available) {
    const m = (panel.missing_methods || []).join(", ");
    return el("p", { class: "empty" }, "No data yet" + (m ? ` (this node does not offer ${m} yet).` : "."));
  }
  return el("p", { class: "empty" }, what);
}

function put(id, node) { $(id).replaceChildren(node); }

function renderSummary(v) {
  const s = v.summary;
  $("network-name").textContent = s.network ? "network " + s.network : "";
  $("mode").textContent = v.public ? "public" : "";
  $("metrics-link").hidden = !!v.public;
  $("c-nodes").textContent = fmtInt(s.nodes);
  $("c-gpus").textContent = fmtInt(s.gpus_total);
  $("c-gpus-free").textContent = typeof s.gpus_free === "number" ? s.gpus_free + " free" : "";
  $("c-models").textContent = fmtInt(s.models);
  $("c-regions").textContent = s.regions ? s.regions + (s.regions === 1 ? " region" : " regions") : "";
  $("c-peers").textContent = fmtInt(s.peers);
  $("c-clusters").textContent = fmtInt(s.clusters);
  const states = Object.entries(s.jobs || {});
  $("c-jobs").textContent = fmtInt(states.reduce((a, [, n]) => a + n, 0));
  $("c-jobs-states").textContent = states.map(([k, n]) => `${n} ${k}`).join(", ");
  $("c-proofs").textContent = fmtInt(s.proofs);
  // The card holds the number; its unit goes on the line below, with the count of payouts.
  const paid = Object.entries(s.paid_total || {});
  const parts = paid.map(([c, a]) => fmtAmount(a, c).split(" "));
  $("c-paid").textContent = parts.length ? parts.map((p) => p[0]).join(" + ") : "0";
  const n = s.payouts_paid ? s.payouts_paid + (s.payouts_paid === 1 ? " payout" : " payouts") : "";
  $("c-paid-n").textContent = [parts.map((p) => p.slice(1).join(" ")).join(" + "), n].filter(Boolean).join(", ");
  const banner = $("banner");
  if (!v.daemon_up) {
    banner.hidden = false;
    banner.textContent = "The node daemon does not answer: " + (Object.values(v.errors || {})[0] || "is it running?");
  } else banner.hidden = true;
  $("asof").textContent = "as of " + new Date(v.as_of_ms).toLocaleTimeString() + (s.peer_id ? " · node " + short(s.peer_id, 12) : "");
}

function renderSupply(sup) {
  if (!sup.by_model.length) { put("supply-body", empty(sup, "No GPUs advertised yet.")); put("regions-body", el("span")); return; }
  const maxG = Math.max(...sup.by_model.map((m) => m.gpus), 1);
  put("supply-body", table([
    { label: "Model", wide: true, render: (m) => el("div", {}, el("div", {}, m.model),
        el("div", { class: "bar" }, el("span", { style: `width:${(100 * m.gpus / maxG).toFixed(1)}%` }))) },
    { label: "Memory", render: (m) => fmtMem(m.memory_mb) },
    { label: "GPUs", num: true, render: (m) => fmtInt(m.gpus) },
    { label: "Nodes", num: true, render: (m) => fmtInt(m.nodes) },
    { label: "Regions", render: (m) => Object.entries(m.regions).map(([r, n]) => `${r} ${n}`).join(", ") },
  ], sup.by_model));
  put("regions-body", table([
    { label: "Region", render: (r) => r.region },
    { label: "GPUs", num: true, render: (r) => fmtInt(r.gpus) },
    { label: "Models", render: (r) => Object.entries(r.models).map(([m, n]) => `${n}× ${m}`).join(", ") },
  ], sup.by_region));
}

function renderNodes(p) {
  if (!p.rows.length) return put("nodes-body", empty(p, "No node has advertised yet."));
  put("nodes-body", table([
    { label: "Peer", render: (n) => el("span", {}, idSpan(n.peer_id, 12), n.self ? " " : "", n.self ? pill("this node", "ok") : "") },
    { label: "GPUs", wide: true, render: (n) => n.gpus.map((g) => `${g.count}× ${g.model}`).join(", ") || "–" },
    { label: "Free", num: true, render: (n) => `${n.gpus_free ?? "–"} / ${n.gpus_total}` },
    { label: "Region", render: (n) => n.region ?? "–" },
    { label: "Price/GPU·h", num: true, render: (n) => n.price == null ? "–" : fmtAmount(n.price, n.currency) },
    { label: "Latency", num: true, render: (n) => n.self ? "–" : !n.connected ? "not linked" : n.latency_ms == null ? "linked" : n.latency_ms.toFixed(1) + " ms" },
    { label: "GPU source", render: (n) => n.simulated ? pill("simulated", "wait") : pill("NVML", "ok") },
  ], p.rows));
}

function renderClusters(p) {
  if (!p.rows.length) return put("clusters-body", empty(p, "No cluster formed yet."));
  put("clusters-body", table([
    { label: "Job", render: (c) => el("span", {}, c.name ? c.name + " " : "", idSpan(c.job_id, 10)) },
    { label: "Certificate", render: (c) => idSpan(c.certificate_hash, 12) },
    { label: "Members", wide: true, render: (c) => el("div", { class: "members" }, c.members.map((m) => pill(short(m, 10)))) },
    { label: "Formed in", num: true, render: (c) => fmtMs(c.formation_ms) },
    { label: "State", render: (c) => pill(c.state ?? "–", stateKind(c.state)) },
  ], p.rows));
}

function renderJobs(p) {
  if (!p.rows.length) return put("jobs-body", empty(p, "No jobs yet."));
  put("jobs-body", table([
    { label: "Job", render: (j) => el("span", {}, j.name ? j.name + " " : "", idSpan(j.job_id, 10)) },
    { label: "State", render: (j) => pill(j.state ?? "–", stateKind(j.state)) },
    { label: "Role", render: (j) => (j.roles || []).join(", ") || "–" },
    { label: "Nodes", num: true, render: (j) => j.nodes ?? "–" },
    { label: "Replicas", num: true, render: (j) => j.replicas ?? "–" },
    { label: "Members", num: true, render: (j) => j.members.length || "–" },
    { label: "Formed in", num: true, render: (j) => fmtMs(j.formation_ms) },
    { label: "Paid", render: (j) => !j.payouts_total ? "–" :
        pill(`${j.payouts_paid}/${j.payouts_total} paid`, j.payouts_paid === j.payouts_total ? "ok" : "wait") },
  ], p.rows));
}

function checkResult(h) {
  const r = checks.get(h);
  if (!r) return null;
  if (r.pending) return el("div", { class: "result na" }, "checking…");
  if (r.error) return el("div", { class: "result bad" }, r.error);
  const head = r.valid ? el("strong", { class: "ok" }, "✓ valid") :
    r.failed ? el("strong", { class: "bad" }, "✗ does not hold") : el("strong", { class: "na" }, "… not checkable yet");
  return el("div", { class: "result", "data-valid": String(r.valid) }, head,
    el("ul", {}, r.steps.map((s) => el("li", {},
      el("span", { class: "mark " + (s.ok === true ? "ok" : s.ok === false ? "bad" : "na") }, s.ok === true ? "✓" : s.ok === false ? "✗" : "–"),
      `${s.name}: ${s.detail}`))));
}

async function runCheck(h, button) {
  checks.set(h, { pending: true });
  button.disabled = true;
  rerenderProofs();
  try {
    const res = await fetch("/api/check/" + encodeURIComponent(h), { method: "POST" });
    const doc = await res.json();
    checks.set(h, res.ok ? doc : { error: doc.error || "check failed (" + res.status + ")" });
  } catch (e) {
    checks.set(h, { error: "the explorer did not answer: " + e });
  }
  rerenderProofs();
}

let lastViews = null;
function rerenderProofs() { if (lastViews) renderProofs(lastViews.proofs); }

function renderProofs(p) {
  if (!p.rows.length) return put("proofs-body", empty(p, "No proofs yet."));
  put("proofs-body", table([
    { label: "Proof", render: (r) => idSpan(r.proof_hash, 12) },
    { label: "Job", render: (r) => idSpan(r.job_id, 10) },
    { label: "Worker", render: (r) => idSpan(r.peer_id || r.worker, 10) },
    { label: "GPU time", num: true, render: (r) => fmtMs(r.gpu_ms) },
    { label: "Paid", render: (r) => r.paid ? pill("paid", "ok") : pill(r.status || "owed", "wait") },
    { label: "Check", wide: true, render: (r) => {
        const b = el("button", { class: "check", "data-proof": r.proof_hash, type: "button" }, "check");
        b.addEventListener("click", () => runCheck(r.proof_hash, b));
        if (checks.get(r.proof_hash)?.pending) b.disabled = true;
        return el("div", {}, b, checkResult(r.proof_hash));
      } },
  ], p.rows));
}

function renderPayouts(p) {
  if (!p.rows.length) return put("payouts-body", empty(p, "No payouts yet."));
  put("payouts-body", table([
    { label: "Proof", render: (r) => idSpan(r.proof_hash, 12) },
    { label: "Side", render: (r) => r.side === "owed" ? "we pay" : "we earn" },
    { label: "To", render: (r) => idSpan(r.payout_address || r.worker, 10) },
    { label: "Amount", num: true, render: (r) => fmtAmount(r.amount, r.currency) },
    { label: "Status", render: (r) => pill(r.status ?? "–", stateKind(r.status)) },
    { label: "Transaction", wide: true, render: (r) => r.tx_signature ? el("span", { class: "mono", title: r.tx_signature }, short(r.tx_signature, 24)) : "–" },
  ], p.rows));
}

let plotsVersion = null;
function renderNetwork(v) {
  const n = v.network;
  if (!n) return;
  const since = n.since_ms ? new Date(n.since_ms).toLocaleString() : "now";
  $("network-note").textContent =
    `${fmtInt(n.gpus_online.total)} GPUs online on ${fmtInt(n.gpus_online.nodes)} nodes; ` +
    `${fmtInt(n.jobs_seen_24h)} jobs seen and ${fmtInt(n.clusters_24h)} clusters formed in 24 h; ` +
    `${fmtAmount(n.paid_30d, n.currency)} paid in 30 days. GPU history since ${since}.`;
  if (plotsVersion !== v.version) {
    plotsVersion = v.version;
    for (const name of n.plots) {
      const img = $("plot-" + name);
      if (img) img.src = "/plots/" + encodeURIComponent(name) + ".svg?v=" + encodeURIComponent(v.version);
    }
  }
  if (!n.top_earners.length) return put("earners-body", el("p", { class: "empty" }, "Nobody has been paid yet."));
  put("earners-body", table([
    { label: "Worker", render: (e) => el("span", {}, idSpan(e.worker, 12), e.self ? " " : "", e.self ? pill("this node", "ok") : "") },
    { label: "Region", render: (e) => e.region ?? "–" },
    { label: "GPUs", wide: true, render: (e) => (e.gpus || []).join(", ") || "–" },
    { label: "Payouts", num: true, render: (e) => fmtInt(e.payouts) },
    { label: "Paid", num: true, render: (e) => fmtAmount(e.amount, n.currency) },
  ], n.top_earners));
}

function render(v) {
  lastViews = v;
  renderSummary(v);
  renderNetwork(v);
  renderSupply(v.supply);
  renderNodes(v.nodes);
  renderClusters(v.clusters);
  renderJobs(v.jobs);
  renderProofs(v.proofs);
  renderPayouts(v.payouts);
  document.body.dataset.version = String(v.version);
}

function setLive(state, text) { $("live").dataset.state = state; $("live-text").textContent = text; }

let pollTimer = null;
async function poll() {
  try {
    const res = await fetch("/api/all", { cache: "no-store" });
    render(await res.json());
    setLive("live", "live (polling)");
  } catch (e) {
    setLive("down", "explorer unreachable");
  }
  pollTimer = setTimeout(poll, 2000);
}

function stream() {
  if (!window.EventSource) return poll();
  const es = new EventSource("/api/stream");
  es.addEventListener("views", (ev) => { render(JSON.parse(ev.data)); setLive("live", "live"); });
  es.onerror = () => {
    setLive("connecting", "reconnecting…");
    if (es.readyState === EventSource.CLOSED && pollTimer === null) poll();
  };
}

stream();
