// drawdown customer portal. Plain JS, no dependencies. The token comes from the portal URL
// (?token=... or #token=...), is kept in this tab's sessionStorage and removed from the address
// bar; every API call sends it as a bearer token. The page polls once a second.
"use strict";

(function () {
  const POLL_MS = 1000;
  const PAGE = 8;
  const PENDING_MAX_MS = 24 * 3600 * 1000;
  const $ = (id) => document.getElementById(id);

  // ---- token -------------------------------------------------------------------------------
  function takeToken() {
    const url = new URL(window.location.href);
    const hash = new URLSearchParams(url.hash.replace(/^#/, ""));
    const fresh = url.searchParams.get("token") || hash.get("token");
    if (fresh) {
      sessionStorage.setItem("drawdown.portal.token", fresh);
      history.replaceState(null, "", url.pathname);
      return fresh;
    }
    return sessionStorage.getItem("drawdown.portal.token");
  }

  const token = takeToken();
  let session = null; // {customer_id, expires_at, meters: [{meter, top_up_packs, auto_top_up}]}
  let stopped = false;
  const cards = new Map(); // meter -> {el, parts, page: {cursor, back: []}}

  function notice(text, info) {
    const n = $("notice");
    n.textContent = text;
    n.className = info ? "notice info" : "notice";
    n.hidden = !text;
  }

  class HttpError extends Error {
    constructor(status, body) {
      super((body && body.error && body.error.message) || "HTTP " + status);
      this.status = status;
    }
  }

  async function api(path, options) {
    const opts = options || {};
    const headers = { Authorization: "Bearer " + token };
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, {
      method: opts.method || "GET",
      headers: headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      cache: "no-store",
    });
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    if (r.status === 401) {
      stopped = true;
      notice("This link has expired or is not valid. Ask for a new link to see your usage.");
      throw new HttpError(401, body);
    }
    if (!r.ok) throw new HttpError(r.status, body);
    return body;
  }

  const enc = encodeURIComponent;
  const customerPath = () => "v1/customers/" + enc(session.customer_id);
  const meterPath = (m) => customerPath() + "/meters/" + enc(m);

  // ---- formatting --------------------------------------------------------------------------
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    const s = String(v);
    const neg = s.startsWith("-");
    const [int, frac] = (neg ? s.slice(1) : s).split(".");
    const grouped = int.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    return (neg ? "−" : "") + grouped + (frac ? "." + frac : "");
  }
  function signed(v) {
    const s = String(v);
    return s.startsWith("-") ? fmt(s) : (Number(s) === 0 ? "0" : "+" + fmt(s));
  }
  function day(ms) {
    if (ms === null || ms === undefined) return "never";
    return new Date(ms).toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" });
  }
  function when(ms) {
    const d = new Date(ms);
    if (d.toDateString() === new Date().toDateString()) return timeOfDay(ms);
    return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }
  function timeOfDay(ms) {
    return new Date(ms).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }
  const REASONS = {
    usage: "Usage", grant: "Credits added", grant_scheduled: "Credits scheduled",
    activated: "Credits started", expired: "Credits expired", cycle_end: "Cycle ended",
    void_usage: "Usage refunded", void_grant: "Credits removed",
    reserved: "Held for a job", settled: "Job finished", released: "Hold released",
    reservation_expired: "Hold expired",
  };
  const STATUS = { active: "Active", low: "Low balance", exhausted: "Exhausted" };
  const KINDS = { cycle: "Plan", top_up: "Top-up", adjustment: "Adjustment" };

  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v;
      else if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children || []) if (c) e.appendChild(c);
    return e;
  }

  // An SVG element (the chart is drawn with the DOM: no markup strings, no external resources).
  function svg(tag, attrs, children) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const c of children || []) if (c) e.appendChild(c);
    return e;
  }

  // "about 3 days", "about 12 hours", "about 40 minutes": a forecast in plain words.
  function about(ms) {
    const min = Math.max(1, Math.round(ms / 60000));
    if (min < 90) return "about " + min + (min === 1 ? " minute" : " minutes");
    const h = Math.round(min / 60);
    if (h < 36) return "about " + h + " hours";
    const d = Math.round(h / 24);
    return "about " + d + (d === 1 ? " day" : " days");
  }

  // The balance over the recent movements (a step line, one dot per movement, oldest left, evenly
  // spaced), and the forecast as a dashed line from the latest balance down to zero at the right
  // edge, at `runs_out_at` (not to the same time scale: minutes of movements against days).
  function chart(m, events, width) {
    const W = Math.max(200, Math.round(width || 320)), H = 90, PAD = 5;
    const pts = events.slice().sort((a, b) => a.at - b.at || a.version - b.version);
    if (pts.length === 0) return el("div", { class: "chart none", text: "No movements yet." });
    const values = pts.map((p) => Number(p.balance)).concat([0]);
    const lo = Math.min(...values), hi = Math.max(...values, lo + 1);
    const span = (W - 2 * PAD) * (m.runs_out_at ? 0.75 : 1);
    const x = (i) => PAD + (pts.length === 1 ? 0 : (span * i) / (pts.length - 1));
    const y = (v) => H - PAD - ((H - 2 * PAD) * (v - lo)) / (hi - lo);
    let d = "";
    pts.forEach((p, i) => {
      const px = x(i).toFixed(1), py = y(Number(p.balance)).toFixed(1);
      d += i === 0 ? "M" + px + " " + py : "H" + px + "V" + py;
    });
    const last = pts.length - 1;
    const parts = [
      svg("line", { class: "zero", x1: PAD, x2: W - PAD, y1: y(0).toFixed(1), y2: y(0).toFixed(1) }),
      svg("path", { class: "line", d: d }),
    ];
    if (m.runs_out_at) {
      parts.push(svg("line", {
        class: "forecast-line", "stroke-dasharray": "4 3",
        x1: x(last).toFixed(1), y1: y(Number(pts[last].balance)).toFixed(1),
        x2: (W - PAD).toFixed(1), y2: y(0).toFixed(1), "data-runs-out-at": m.runs_out_at,
      }));
    }
    pts.forEach((p, i) => {
      parts.push(svg("circle", {
        class: "pt", r: 2.5, cx: x(i).toFixed(1), cy: y(Number(p.balance)).toFixed(1),
        "data-at": p.at, "data-version": p.version, "data-balance": p.balance,
      }));
    });
    return svg("svg", {
      class: "chart", viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "Balance over the last " + pts.length + " movements"
        + (m.runs_out_at ? ", and the forecast to zero" : ""),
    }, parts);
  }

  function table(headers, rows) {
    const head = el("tr", {}, headers.map(([h, cls]) => el("th", { text: h, class: cls || "" })));
    const body = rows.map((cells) =>
      el("tr", {}, cells.map(([t, cls, title]) => {
        const td = el("td", { text: t, class: cls || "" });
        if (title) td.title = title;
        return td;
      })));
    return el("table", {}, [el("thead", {}, [head]), el("tbody", {}, body)]);
  }

  // ---- pending top-ups (kept across reloads, per customer) -----------------------------------
  const pendingKey = () => "drawdown.portal.pending." + session.customer_id;
  function loadPending() {
    try { return JSON.parse(localStorage.getItem(pendingKey()) || "[]"); } catch (_) { return []; }
  }
  function savePending(list) { localStorage.setItem(pendingKey(), JSON.stringify(list)); }
  const recentlyDone = new Map(); // request_id -> {meter, pack, until}

  function uuid4() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }

  async function topUp(meter, pack, button) {
    const req = { request_id: uuid4(), meter: meter, pack: pack, at: Date.now() };
    savePending(loadPending().concat([req]));
    button.disabled = true;
    let lastError = null;
    // Retries send the same request_id: drawdown and the billing system publish / charge once.
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        await api(meterPath(meter) + "/top-ups", {
          method: "POST", body: { pack: pack, request_id: req.request_id },
        });
        lastError = null;
        break;
      } catch (e) {
        lastError = e;
        if (e.status && e.status < 500) break;
        await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
      }
    }
    button.disabled = false;
    if (lastError) {
      savePending(loadPending().filter((p) => p.request_id !== req.request_id));
      if (!stopped) notice("The top-up could not be requested: " + lastError.message);
    } else {
      notice("");
    }
    refresh();
  }

  // ---- cards -------------------------------------------------------------------------------
  function card(meter) {
    if (cards.has(meter)) return cards.get(meter);
    const conf = (session.meters.find((m) => m.meter === meter)) || { top_up_packs: [], auto_top_up: null };
    const parts = {
      status: el("span", { class: "status" }),
      balance: el("div", { class: "balance" }),
      bar: el("div", {}),
      held: el("div", { class: "held" }),
      barLabel: el("div", { class: "muted" }),
      forecast: el("div", { class: "muted forecast" }),
      chart: el("div", { class: "chart-box" }),
      credited: el("b"), consumed: el("b"), extra: el("b"), extraLabel: el("span", { text: "Overage" }),
      pending: el("div", {}),
      grants: el("div", { class: "grants" }),
      moves: el("div", { class: "moves" }),
      pageLabel: el("span", { class: "muted" }),
      newer: el("button", { text: "‹ Newer", type: "button" }),
      older: el("button", { text: "Older ›", type: "button" }),
    };
    const actions = el("div", { class: "actions" });
    for (const pack of conf.top_up_packs) {
      const b = el("button", { class: "primary topup", type: "button", "data-pack": pack, text: "Top up · " + pack });
      b.addEventListener("click", () => topUp(meter, pack, b));
      actions.appendChild(b);
    }
    if (conf.auto_top_up) {
      actions.appendChild(el("span", {
        class: "auto",
        text: "Auto top-up: " + conf.auto_top_up.pack + " when below " + fmt(conf.auto_top_up.below),
      }));
    }
    const root = el("article", { class: "card", "data-meter": meter }, [
      el("div", { class: "card-head" }, [el("h2", { text: meter }), parts.status]),
      parts.balance,
      el("div", { class: "balance-label", text: "units left" }),
      el("div", { class: "bar", role: "progressbar" }, [parts.bar, parts.held]),
      parts.barLabel,
      parts.chart,
      parts.forecast,
      el("div", { class: "figures" }, [
        el("div", { class: "figure" }, [parts.credited, el("span", { text: "Credited" })]),
        el("div", { class: "figure" }, [parts.consumed, el("span", { text: "Consumed" })]),
        el("div", { class: "figure" }, [parts.extra, parts.extraLabel]),
      ]),
      conf.top_up_packs.length || conf.auto_top_up ? actions : null,
      parts.pending,
      el("h3", { text: "Active credits" }),
      parts.grants,
      el("h3", { text: "Recent movements" }),
      parts.moves,
      el("div", { class: "pager" }, [parts.newer, parts.pageLabel, parts.older]),
    ]);
    const c = { el: root, parts: parts, page: { cursor: null, back: [], next: null } };
    parts.older.addEventListener("click", () => {
      if (!c.page.next) return;
      c.page.back.push(c.page.cursor);
      c.page.cursor = c.page.next;
      refreshMoves(meter, c);
    });
    parts.newer.addEventListener("click", () => {
      if (!c.page.back.length) return;
      c.page.cursor = c.page.back.pop();
      refreshMoves(meter, c);
    });
    cards.set(meter, c);
    $("meters").appendChild(root);
    return c;
  }

  function renderMeter(c, m, detail) {
    const p = c.parts;
    c.el.className = "card " + m.status;
    p.status.className = "status " + m.status;
    p.status.textContent = STATUS[m.status] || m.status;
    p.balance.textContent = fmt(m.balance);
    p.balance.className = "balance" + (String(m.balance).startsWith("-") ? " negative" : "");
    p.credited.textContent = fmt(m.credited);
    p.consumed.textContent = fmt(m.consumed);
    const blocked = Number(m.blocked) > 0;
    p.extra.textContent = fmt(blocked ? m.blocked : m.overage);
    p.extraLabel.textContent = blocked ? "Blocked" : "Overage";
    const active = detail.grants.filter((g) => g.active);
    const total = active.reduce((s, g) => s + Number(g.amount), 0);
    // What is left, split into what reservations hold (striped, right) and the rest.
    const left = Math.max(0, Number(m.balance));
    const held = Math.min(left, Math.max(0, Number(m.reserved || 0)));
    const pct = total > 0 ? Math.min(100, (100 * left) / total) : 0;
    const heldPct = total > 0 ? Math.min(pct, (100 * held) / total) : 0;
    p.bar.style.width = (pct - heldPct).toFixed(1) + "%";
    p.held.style.width = heldPct.toFixed(1) + "%";
    p.held.setAttribute("data-reserved", m.reserved || "0");
    p.bar.parentElement.setAttribute("aria-valuenow", pct.toFixed(0));
    p.barLabel.textContent = (total > 0
      ? Math.round(pct) + "% of " + fmt(String(total)) + " in active credits left"
      : "No active credits")
      + (Number(m.reserved || 0) > 0 ? " · " + fmt(m.reserved) + " reserved by running jobs" : "");
    // The burn rate (units/hour, 6 places) is shown to 2; the forecast as a local date.
    const [rInt, rFrac] = String(m.burn_rate || "0").split(".");
    const rate = rInt + (rFrac && rFrac.slice(0, 2) !== "00" ? "." + rFrac.slice(0, 2) : "");
    p.forecast.textContent = Number(m.burn_rate || 0) > 0
      ? "Using about " + fmt(rate) + " an hour" + (m.runs_out_at
        ? " · runs out in " + about(m.runs_out_at - Date.now()) + " ("
          + new Date(m.runs_out_at).toLocaleString() + ")"
        : "")
      : "";
    p.chart.replaceChildren(chart(m, detail.recent_events, p.chart.clientWidth));

    const rows = detail.grants
      .filter((g) => !g.active || Number(g.remaining) > 0)
      .map((g) => [
        [g.id, "id", g.id],
        [KINDS[g.kind] || g.kind],
        [fmt(g.remaining) + " / " + fmt(g.amount), "num"],
        [g.active ? day(g.expires_at) : "starts " + day(g.effective_at), "num",
          g.expires_at ? new Date(g.expires_at).toLocaleString() : "never expires"],
      ]);
    p.grants.replaceChildren(rows.length
      ? table([["Grant"], ["Kind"], ["Left / granted", "num"], ["Expires", "num"]], rows)
      : el("div", { class: "none", text: "No active credits." }));

    // Pending top-ups of this meter: resolved once a grant or movement carries the request id.
    const seen = new Set(detail.grants.map((g) => g.id).concat(detail.recent_events.map((e) => e.cause_id)));
    const now = Date.now();
    const all = loadPending();
    const keep = [];
    for (const r of all) {
      if (r.meter === m.meter && seen.has(r.request_id)) {
        recentlyDone.set(r.request_id, { meter: r.meter, pack: r.pack, until: now + 8000 });
      } else if (now - r.at < PENDING_MAX_MS) {
        keep.push(r);
      }
    }
    if (keep.length !== all.length) savePending(keep);
    const lines = keep.filter((r) => r.meter === m.meter).map((r) =>
      el("div", { class: "pending", "data-request-id": r.request_id,
        text: "Top-up " + r.pack + " requested at " + timeOfDay(r.at) + " · pending" }));
    for (const [id, d] of recentlyDone) {
      if (d.until < now) recentlyDone.delete(id);
      else if (d.meter === m.meter) {
        lines.push(el("div", { class: "pending done", text: "Top-up " + d.pack + " received" }));
      }
    }
    p.pending.replaceChildren(...lines);
  }

  async function refreshMoves(meter, c) {
    const q = "?limit=" + PAGE + (c.page.cursor ? "&cursor=" + enc(c.page.cursor) : "");
    const page = await api(meterPath(meter) + "/events" + q);
    c.page.next = page.next_cursor;
    const rows = page.events.map((e) => [
      [when(e.at), "", new Date(e.at).toLocaleString() + " · " + e.cause_id],
      [REASONS[e.reason] || e.reason],
      [signed(e.delta), "num " + (String(e.delta).startsWith("-") ? "minus" : Number(e.delta) === 0 ? "" : "plus")],
      [fmt(e.balance), "num"],
    ]);
    c.parts.moves.replaceChildren(rows.length
      ? table([["When"], ["What"], ["Change", "num"], ["Balance", "num"]], rows)
      : el("div", { class: "none", text: "No movements." }));
    const n = c.page.back.length;
    c.parts.pageLabel.textContent = "page " + (n + 1);
    c.parts.newer.disabled = n === 0;
    c.parts.older.disabled = !page.next_cursor;
  }

  let inFlight = false;
  async function refresh() {
    if (stopped || inFlight || !session) return;
    inFlight = true;
    try {
      let state;
      try {
        state = await api(customerPath() + "/state");
      } catch (e) {
        if (e.status === 404) state = { meters: [] };
        else throw e;
      }
      $("empty").hidden = state.meters.length > 0;
      await Promise.all(state.meters.map(async (m) => {
        const c = card(m.meter);
        const detail = await api(meterPath(m.meter));
        renderMeter(c, m, detail);
        await refreshMoves(m.meter, c);
      }));
      $("updated").textContent = "Updated " + timeOfDay(Date.now()) + " · refreshes every second";
    } catch (e) {
      if (!stopped) {
        $("updated").textContent = "Connection problem, retrying… (" + e.message + ")";
      }
    } finally {
      inFlight = false;
    }
  }

  function showSession() {
    $("customer").textContent = session.customer_id;
    const mins = Math.max(0, Math.round((session.expires_at - Date.now()) / 60000));
    $("session").textContent = mins >= 1 ? "session ends in " + mins + " min" : "session ends in under a minute";
    if (Date.now() >= session.expires_at && !stopped) {
      stopped = true;
      notice("This link has expired. Ask for a new link to see your usage.");
    }
  }

  async function start() {
    if (!token) {
      notice("This page needs a portal link. Ask for a link to see your usage and credits.");
      $("updated").textContent = "";
      return;
    }
    try {
      session = await api("v1/portal-sessions/current");
    } catch (e) {
      if (!stopped) notice("The portal is not available: " + e.message);
      return;
    }
    document.title = "Usage and credits · " + session.customer_id;
    showSession();
    await refresh();
    setInterval(() => { showSession(); refresh(); }, POLL_MS);
  }

  start();
})();
