// The operations page of fifo-executor. Plain JavaScript, no dependencies, served from the
// binary. Everything it shows comes from the JSON API under /api/v1; the admin token lives in
// this tab's sessionStorage and goes out only as an Authorization header.
"use strict";

(function () {
  const TOKEN_KEY = "fifo-executor.admin-token";
  const EVERY_KEY = "fifo-executor.refresh-seconds";
  const $ = (id) => document.getElementById(id);

  const state = {
    tab: "overview",
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    paused: false,
    every: Number(localStorage.getItem(EVERY_KEY)) || 3,
    timer: null,
    busy: false,
    actions: { q: "", sort: "queue_length", order: "desc", offset: 0, limit: 50 },
    shown: [], // refs of the rows on screen, in their order
    listedWithActions: null, // overview's action count when the list was last taken
    listedTotal: 0,
    detail: null, // the ref shown on the detail tab
    dlqEntries: [],
  };

  // ---------------------------------------------------------------------------------------
  // The API

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (state.token) headers.Authorization = "Bearer " + state.token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
    let json = null;
    try {
      json = await res.json();
    } catch (_) {
      json = null;
    }
    if (!res.ok) {
      const msg = json && json.error ? json.error : res.status + " " + res.statusText;
      throw new ApiError(res.status, msg);
    }
    return json;
  }

  const enc = encodeURIComponent;

  // ---------------------------------------------------------------------------------------
  // Small helpers for the DOM

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function td(value, cls) {
    return el("td", { class: cls || "" }, value === null || value === undefined ? "–" : value);
  }

  function fillBody(table, rows) {
    const body = table.tBodies[0];
    body.replaceChildren(...rows);
  }

  function seconds(s) {
    if (s === null || s === undefined || Number.isNaN(s)) return "–";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 120) return s.toFixed(1) + " s";
    if (s < 7200) return (s / 60).toFixed(1) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }

  function rate(r) {
    if (r === null || r === undefined) return "–";
    return r >= 100 ? r.toFixed(0) : r.toFixed(1);
  }

  function when(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
  }

  function rateLimit(r) {
    return r ? r.max + " / " + r.per_seconds + " s" : "none";
  }

  function badge(text) {
    const t = String(text);
    const cls =
      t === "healthy" || t === "ok" || t === "true"
        ? "good"
        : t === "degraded" || t === "false"
          ? "warn"
          : "bad";
    return el("span", { class: "badge " + cls }, t);
  }

  function showError(where, e) {
    const target = typeof where === "string" ? $(where) : where;
    if (target) {
      target.className = "error";
      target.textContent = e.message || String(e);
    }
  }

  function showOk(where, text) {
    const target = $(where);
    target.className = "ok";
    target.textContent = text;
  }

  function banner(text) {
    const b = $("banner");
    if (text) {
      b.textContent = text;
      b.hidden = false;
    } else {
      b.hidden = true;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Token and refresh controls

  function applyToken() {
    const has = state.token !== "";
    for (const b of document.querySelectorAll(".admin")) b.disabled = !has;
    $("token-state").textContent = has ? "admin token set" : "read-only";
    $("token-clear").disabled = !has;
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    $("token").value = "";
    state.token = t;
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    else sessionStorage.removeItem(TOKEN_KEY);
    applyToken();
    refresh();
  });
  $("token-clear").addEventListener("click", () => {
    state.token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    applyToken();
    refresh();
  });

  $("refresh-every").value = String(state.every);
  if ($("refresh-every").value !== String(state.every)) {
    state.every = 3;
    $("refresh-every").value = "3";
  }
  $("refresh-every").addEventListener("change", () => {
    state.every = Number($("refresh-every").value);
    localStorage.setItem(EVERY_KEY, String(state.every));
    schedule();
  });
  $("refresh-pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("refresh-pause").textContent = state.paused ? "Resume" : "Pause";
    $("refresh-state").textContent = state.paused ? "paused" : "";
    if (!state.paused) refresh();
    schedule();
  });

  function schedule() {
    clearTimeout(state.timer);
    if (state.paused) return;
    state.timer = setTimeout(async () => {
      await refresh();
      schedule();
    }, state.every * 1000);
  }

  // ---------------------------------------------------------------------------------------
  // Tabs (the hash says which; changing it fetches nothing but the API)

  function route() {
    const h = decodeURIComponent(location.hash.replace(/^#/, ""));
    if (h.startsWith("action/")) {
      state.tab = "action";
      state.detail = h.slice("action/".length);
    } else {
      state.tab = ["overview", "actions", "dlq", "purge", "cluster"].includes(h) ? h : "overview";
    }
    for (const s of document.querySelectorAll("section.tab")) {
      s.hidden = s.id !== "tab-" + state.tab;
    }
    for (const a of document.querySelectorAll("#tabs a")) {
      const active = a.dataset.tab === state.tab || (state.tab === "action" && a.dataset.tab === "actions");
      a.classList.toggle("active", active);
    }
    refresh();
  }
  window.addEventListener("hashchange", route);

  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    try {
      switch (state.tab) {
        case "overview":
          await refreshOverview();
          break;
        case "actions":
          await refreshActions();
          break;
        case "action":
          await refreshDetail();
          break;
        case "dlq":
          await refreshDlq();
          break;
        case "purge":
          break;
        case "cluster":
          await refreshCluster();
          break;
      }
      banner(null);
      $("updated").textContent = "Updated " + new Date().toLocaleTimeString() + ".";
    } catch (e) {
      banner("Could not refresh: " + (e.message || e));
    } finally {
      state.busy = false;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Overview

  let lastOverview = null;

  async function overview() {
    const o = (await api("GET", "/api/v1/overview")).data;
    lastOverview = o;
    $("instance").textContent = o.instance + (o.mode === "shared" ? " (shared cluster)" : "");
    return o;
  }

  async function refreshOverview() {
    const o = await overview();
    const t = o.totals;
    const status = o.health ? o.health.status : "not checked yet";
    $("ov-status").replaceChildren(badge(status));
    $("ov-queued").textContent = t.queued;
    $("ov-running").textContent = t.running;
    $("ov-dispatched").textContent = rate(t.dispatched_per_second);
    $("ov-completed").textContent = rate(t.completed_per_second);
    $("ov-dlq").textContent = t.dlq_size === null ? "?" : t.dlq_size;
    $("ov-actions").textContent = t.actions;
    drawChart($("chart-rate"), o.history, [
      ["dispatched_per_second", "dispatched"],
      ["completed_per_second", "completed"],
    ]);
    drawChart($("chart-wait"), o.history, [
      ["queue_wait_mean_seconds", "wait-mean"],
      ["queue_wait_max_seconds", "wait-max"],
    ]);
    const rows = [];
    if (o.health) {
      $("ov-last-check").textContent = "checked " + when(o.health.last_check) + (o.health.emergency_mode ? " · EMERGENCY MODE" : "");
      for (const [name, c] of Object.entries(o.health.checks)) {
        rows.push(
          el("tr", {}, td(name), el("td", {}, badge(c.status)), td(c.value, "num"), td(c.warning, "num"), td(c.critical, "num"), td(c.detail || "")),
        );
      }
    } else {
      $("ov-last-check").textContent = "no check has run yet";
    }
    fillBody($("health-table"), rows);
    await refreshConfigState();
  }

  async function refreshConfigState() {
    try {
      const c = (await api("GET", "/api/v1/config/status")).data;
      let text = "Configuration " + (c.path ? "from " + c.path + " " : "") + "last loaded " + when(c.loaded_at) + ".";
      if (c.last_reload) {
        text += " Last reload: " + c.last_reload.result;
        if (c.last_reload.needs_restart && c.last_reload.needs_restart.length) {
          text += "; needs a restart: " + c.last_reload.needs_restart.join(", ");
        }
        if (c.last_reload.error) text += " (" + c.last_reload.error + ")";
      }
      $("config-state").textContent = text;
    } catch (e) {
      $("config-state").textContent = "Configuration state unavailable: " + e.message;
    }
  }

  $("config-reload").addEventListener("click", async () => {
    try {
      const r = (await api("POST", "/api/v1/admin/reload")).data;
      let text = r.result;
      if (r.applied && r.applied.length) text += ": " + r.applied.join(", ");
      if (r.needs_restart && r.needs_restart.length) text += "; needs a restart: " + r.needs_restart.join(", ");
      showOk("config-result", text);
    } catch (e) {
      showError("config-result", e);
    }
    refreshConfigState();
  });

  const SVG = "http://www.w3.org/2000/svg";

  function drawChart(svg, history, series) {
    const W = 600;
    const H = 160;
    const PAD = 4;
    const span = 15 * 60 * 1000;
    const now = lastOverview ? new Date(lastOverview.now).getTime() : Date.now();
    let max = 0;
    for (const p of history) for (const [k] of series) if (p[k] !== null && p[k] > max) max = p[k];
    const top = max > 0 ? max * 1.1 : 1;
    const parts = [];
    for (const [k, cls] of series) {
      let d = "";
      let pen = false;
      for (const p of history) {
        const v = p[k];
        const x = W - ((now - new Date(p.at).getTime()) / span) * W;
        if (v === null || v === undefined || x < 0) {
          pen = false;
          continue;
        }
        const y = H - PAD - (v / top) * (H - 2 * PAD);
        d += (pen ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1) + " ";
        pen = true;
      }
      const path = document.createElementNS(SVG, "path");
      path.setAttribute("d", d || "M0 " + (H - PAD));
      path.setAttribute("class", "line " + cls);
      parts.push(path);
    }
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", "4");
    label.setAttribute("y", "14");
    label.setAttribute("class", "axis");
    label.textContent = "max " + (series[0][0].includes("wait") ? seconds(max) : rate(max) + "/s");
    const left = document.createElementNS(SVG, "text");
    left.setAttribute("x", "4");
    left.setAttribute("y", String(H - 6));
    left.setAttribute("class", "axis");
    left.textContent = "−15 min";
    const right = document.createElementNS(SVG, "text");
    right.setAttribute("x", String(W - 30));
    right.setAttribute("y", String(H - 6));
    right.setAttribute("class", "axis");
    right.textContent = "now";
    svg.replaceChildren(...parts, label, left, right);
  }

  // ---------------------------------------------------------------------------------------
  // Actions

  function actionRow(r) {
    const link = el("a", { href: "#action/" + enc(r.action_ref) }, r.action_ref);
    return el(
      "tr",
      { "data-ref": r.action_ref },
      el("td", {}, link),
      td(r.queue_length, "num"),
      td(r.active_count, "num"),
      td(r.max_concurrent, "num"),
      td(seconds(r.oldest_age_seconds), "num"),
      td(rateLimit(r.rate_limit)),
      el("td", {}, badge(r.enabled ? "true" : "false")),
      el("td", {}, badge(r.health)),
    );
  }

  async function listActions() {
    const a = state.actions;
    const q = new URLSearchParams({ sort: a.sort, order: a.order, offset: a.offset, limit: a.limit });
    if (a.q) q.set("q", a.q);
    const res = await api("GET", "/api/v1/actions?" + q);
    state.shown = res.data.map((r) => r.action_ref);
    state.listedTotal = res.total;
    state.listedWithActions = lastOverview ? lastOverview.totals.actions : null;
    fillBody($("actions-table"), res.data.map(actionRow));
    const end = Math.min(res.offset + res.data.length, res.total);
    $("actions-page").textContent = res.total ? res.offset + 1 + "–" + end + " of " + res.total : "no actions" + (a.q ? " match" : " yet");
    $("actions-prev").disabled = res.offset === 0;
    $("actions-next").disabled = end >= res.total;
    for (const th of $("actions-table").tHead.rows[0].cells) {
      th.classList.toggle("sorted", th.dataset.sort === a.sort);
      th.classList.toggle("desc", th.dataset.sort === a.sort && a.order === "desc");
    }
  }

  // A refresh asks only for the rows on screen, unless actions came or went since the list
  // was taken (then the page of rows is taken again).
  async function refreshActions() {
    await overview();
    const changed = state.listedWithActions === null || lastOverview.totals.actions !== state.listedWithActions;
    if (changed || state.shown.length === 0) {
      await listActions();
      return;
    }
    const res = await api("GET", "/api/v1/actions?refs=" + state.shown.map(enc).join(","));
    const byRef = new Map(res.data.map((r) => [r.action_ref, r]));
    const body = $("actions-table").tBodies[0];
    for (const tr of Array.from(body.rows)) {
      const r = byRef.get(tr.dataset.ref);
      if (r) tr.replaceWith(actionRow(r));
      else tr.classList.add("gone");
    }
  }

  function relist() {
    listActions().catch((e) => banner("Could not list actions: " + e.message));
  }

  let filterTimer = null;
  $("actions-filter").addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => {
      state.actions.q = $("actions-filter").value.trim();
      state.actions.offset = 0;
      relist();
    }, 250);
  });
  $("actions-limit").addEventListener("change", () => {
    state.actions.limit = Number($("actions-limit").value);
    state.actions.offset = 0;
    relist();
  });
  $("actions-prev").addEventListener("click", () => {
    state.actions.offset = Math.max(0, state.actions.offset - state.actions.limit);
    relist();
  });
  $("actions-next").addEventListener("click", () => {
    state.actions.offset += state.actions.limit;
    relist();
  });
  $("actions-resort").addEventListener("click", relist);
  for (const th of $("actions-table").tHead.rows[0].cells) {
    th.addEventListener("click", () => {
      const a = state.actions;
      if (a.sort === th.dataset.sort) a.order = a.order === "desc" ? "asc" : "desc";
      else {
        a.sort = th.dataset.sort;
        a.order = th.dataset.sort === "action_ref" ? "asc" : "desc";
      }
      a.offset = 0;
      relist();
    });
  }

  // ---------------------------------------------------------------------------------------
  // One action

  let policyShownFor = null;

  async function refreshDetail() {
    const ref = state.detail;
    $("ad-title").textContent = ref;
    let d;
    try {
      d = (await api("GET", "/api/v1/actions/" + enc(ref) + "?waiting=20")).data;
    } catch (e) {
      if (e.status === 404) {
        $("ad-note").textContent = "This executor has not seen the action " + ref + ".";
        return;
      }
      throw e;
    }
    const s = d.stats;
    $("ad-note").textContent = (d.note || "") + (s.owner ? " Partition " + s.partition + ", owned by " + s.owner + "." : "");
    $("ad-queued").textContent = s.queue_length;
    $("ad-running").textContent = s.active_count + " / " + s.max_concurrent;
    $("ad-oldest").textContent = seconds(s.oldest_age_seconds);
    $("ad-enabled").replaceChildren(badge(d.policy.enabled ? "true" : "false"));
    $("ad-health").replaceChildren(badge(d.health));
    $("ad-totals").textContent = s.total_enqueued + " / " + s.total_completed;
    $("ad-waiting-total").textContent = d.waiting_total > d.waiting.length ? "(first " + d.waiting.length + " of " + d.waiting_total + ")" : "(" + d.waiting_total + ")";
    fillBody(
      $("ad-waiting"),
      d.waiting.map((w) => el("tr", {}, td(w.position, "num"), td(w.execution_id), td(when(w.enqueued_at)), td(seconds(w.wait_seconds), "num"))),
    );
    fillBody(
      $("ad-running-list"),
      d.running.map((r) => el("tr", {}, td(r.execution_id), td(when(r.started_at)), td(seconds(r.running_seconds), "num"))),
    );
    fillBody(
      $("ad-ends"),
      d.recent_ends.map((r) => el("tr", {}, td(r.execution_id), el("td", {}, badge(r.outcome === "completed" || r.outcome === "succeeded" ? "ok" : r.outcome)), td(when(r.ended_at)))),
    );
    // The form keeps what the operator is typing; it is filled when the action is opened.
    if (policyShownFor !== ref) {
      fillPolicy(d.policy);
      policyShownFor = ref;
    }
  }

  function fillPolicy(p) {
    $("pf-limit").value = p.concurrency_limit;
    $("pf-rate-max").value = p.rate_limit ? p.rate_limit.max : "";
    $("pf-rate-per").value = p.rate_limit ? p.rate_limit.per_seconds : "";
    $("pf-enabled").checked = p.enabled;
  }

  async function putPolicy(body, what) {
    try {
      const p = (await api("PUT", "/api/v1/actions/" + enc(state.detail) + "/policy", body)).data;
      fillPolicy(p);
      showOk("pf-result", what);
    } catch (e) {
      showError("pf-result", e);
    }
    refresh();
  }

  $("policy-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const max = $("pf-rate-max").value.trim();
    const per = $("pf-rate-per").value.trim();
    if ((max === "") !== (per === "")) {
      showError("pf-result", new Error("a rate limit needs both a number and a period (leave both empty for none)"));
      return;
    }
    putPolicy(
      {
        concurrency_limit: Number($("pf-limit").value),
        rate_limit: max === "" ? null : { max: Number(max), per_seconds: Number(per) },
        enabled: $("pf-enabled").checked,
      },
      "policy saved",
    );
  });
  $("ad-pause").addEventListener("click", () => putPolicy({ enabled: false }, "paused: nothing more is dispatched"));
  $("ad-resume").addEventListener("click", () => putPolicy({ enabled: true }, "resumed"));

  // ---------------------------------------------------------------------------------------
  // Dead letters

  function dlqFilter() {
    const f = {};
    const qf = $("dlq-queue-from").value;
    const ec = $("dlq-error-class").value.trim();
    if (qf) f.queue_from = qf;
    if (ec) f.error_class = ec;
    return f;
  }

  async function refreshDlq() {
    const o = await overview();
    $("dlq-size").textContent = o.totals.dlq_size === null ? "The DLQ size is not known (dlq disabled or unreadable)." : o.totals.dlq_size + " entries in attune.dlq.";
    if (!state.token) {
      $("dlq-locked").hidden = false;
      fillBody($("dlq-table"), []);
      return;
    }
    $("dlq-locked").hidden = true;
    const q = new URLSearchParams({ limit: $("dlq-limit").value, ...dlqFilter() });
    const peek = (await api("GET", "/api/v1/dlq?" + q)).data;
    state.dlqEntries = peek.entries;
    const classes = new Set(peek.entries.map((e) => e.error_class).filter(Boolean));
    $("dlq-classes").replaceChildren(...Array.from(classes).sort().map((c) => el("option", { value: c })));
    fillBody(
      $("dlq-table"),
      peek.entries.map((e, i) =>
        el(
          "tr",
          {},
          td(e.execution_id),
          td(e.action_ref),
          td(e.queue_from),
          td(e.error_class),
          td(e.error_message || (e.unreadable ? "unreadable entry" : "")),
          td(when(e.failed_at)),
          el(
            "td",
            { class: "row-buttons" },
            el("button", { type: "button", onclick: () => showEntry(i) }, "View"),
            el("button", { type: "button", class: "admin", disabled: !e.execution_id, onclick: () => dlqOne("replay", e.execution_id) }, "Replay"),
            el("button", { type: "button", class: "admin danger", disabled: !e.execution_id, onclick: () => dlqOne("discard", e.execution_id) }, "Discard"),
          ),
        ),
      ),
    );
  }

  function showEntry(i) {
    $("dlq-entry-json").textContent = JSON.stringify(state.dlqEntries[i], null, 2);
    $("dlq-entry").showModal();
  }

  function dlqReport(verb, r) {
    const done = r.replayed || r.discarded || [];
    let text = verb + " " + done.length;
    if (r.skipped && r.skipped.length) text += ", skipped " + r.skipped.length + " (" + r.skipped.map((s) => s.reason).filter(Boolean)[0] + ")";
    if (r.not_found && r.not_found.length) text += ", not found " + r.not_found.length;
    return text;
  }

  async function dlqOne(op, id) {
    if (op === "discard" && !confirm("Discard the dead letter of execution " + id + "? It cannot be brought back.")) return;
    try {
      const r = (await api("POST", "/api/v1/dlq/" + op, { execution_ids: [id] })).data;
      showOk("dlq-result", dlqReport(op === "replay" ? "replayed" : "discarded", r));
    } catch (e) {
      showError("dlq-result", e);
    }
    refresh();
  }

  async function dlqMatching(op) {
    const filter = dlqFilter();
    const limit = Number($("dlq-limit").value);
    const what = Object.keys(filter).length ? JSON.stringify(filter) : "every entry";
    if (!confirm((op === "replay" ? "Replay" : "Discard") + " up to " + limit + " dead letters matching " + what + "?")) return;
    try {
      const r = (await api("POST", "/api/v1/dlq/" + op, { filter, limit })).data;
      showOk("dlq-result", dlqReport(op === "replay" ? "replayed" : "discarded", r));
    } catch (e) {
      showError("dlq-result", e);
    }
    refresh();
  }
  $("dlq-replay-matching").addEventListener("click", () => dlqMatching("replay"));
  $("dlq-discard-matching").addEventListener("click", () => dlqMatching("discard"));
  for (const id of ["dlq-queue-from", "dlq-limit"]) $(id).addEventListener("change", refresh);
  $("dlq-error-class").addEventListener("change", refresh);

  // ---------------------------------------------------------------------------------------
  // Purge

  async function purge(dryRun) {
    if (!dryRun && !confirm("Run a purge cycle now? What it removes is dead-lettered or deleted.")) return;
    const out = $("purge-report");
    out.replaceChildren(el("p", { class: "muted" }, "running…"));
    try {
      const r = (await api("POST", "/api/v1/purge?dry_run=" + dryRun)).data;
      const byCat = new Map();
      for (const e of r.entries) {
        if (!byCat.has(e.state)) byCat.set(e.state, []);
        byCat.get(e.state).push(e);
      }
      const parts = [
        el("p", { id: "purge-summary" }, (r.dry_run ? "Dry run: would purge " : "Purged ") + r.purged + " (" + r.queued + " queued, " + r.running + " running)" + (r.emergency_mode ? " — emergency mode: waiting executions are not purged by age" : "") + "."),
      ];
      if (r.ledger) parts.push(el("p", {}, "Ledger: " + JSON.stringify(r.ledger)));
      if (r.ledger_error) parts.push(el("p", { class: "error" }, "Ledger: " + r.ledger_error));
      for (const [cat, entries] of byCat) {
        parts.push(el("h3", {}, cat + " (" + entries.length + ")"));
        const table = el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Execution"), el("th", {}, "Action"), el("th", { class: "num" }, "Age"), el("th", { class: "num" }, "Limit"))), el("tbody"));
        fillBody(table, entries.map((e) => el("tr", {}, td(e.execution_id), td(e.action_ref), td(seconds(e.age_seconds), "num"), td(seconds(e.limit_seconds), "num"))));
        parts.push(table);
      }
      out.replaceChildren(...parts);
    } catch (e) {
      out.replaceChildren(el("p", { class: "error" }, e.message));
    }
  }
  $("purge-preview").addEventListener("click", () => purge(true));
  $("purge-run").addEventListener("click", () => purge(false));

  // ---------------------------------------------------------------------------------------
  // Cluster

  async function refreshCluster() {
    const c = (await api("GET", "/api/v1/cluster")).data;
    const owners = new Set(c.partitions.map((p) => p.owner));
    $("cluster-summary").textContent = c.partition_count + " partitions, " + owners.size + " owner(s); answered by " + c.instance_id + ".";
    fillBody(
      $("cluster-table"),
      c.partitions.map((p) => el("tr", { class: p.owner === c.instance_id ? "mine" : "" }, td(p.partition, "num"), td(p.owner), td(p.epoch, "num"), td(when(p.since)), td(p.actions, "num"), td(p.queued, "num"), td(p.running, "num"))),
    );
  }

  applyToken();
  route();
  schedule();
})();
