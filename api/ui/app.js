// backlog console: a single page over the HTTP API, no framework, no build.
//
// The API key lives in sessionStorage (gone when the tab closes) and goes
// out only as an `Authorization: Bearer` header: never in a URL, never in
// a cookie. Data from the API is put in the page as text (textContent),
// never as HTML. The job event stream is read with fetch() because
// EventSource cannot send the header.
"use strict";

const KEY_ITEM = "backlog.apiKey";
const ADMIN_ITEM = "backlog.admin";
const JOB_STATUSES = ["queued", "processing", "complete", "failed", "cancelled"];
const JOB_TYPES = ["reading", "text", "pdf", "audiobook"];
const PROMPT_TYPES = new Set(["reading", "text"]);
const AGES = [
  ["", "Any age"],
  ["900", "Last 15 minutes"],
  ["3600", "Last hour"],
  ["86400", "Last 24 hours"],
  ["604800", "Last 7 days"],
];
const SERIES = ["pending", "scheduled", "blocked", "in_flight"];
const LIST_REFRESH_MS = 3000;
const JOB_REFRESH_MS = 2000;
const TIMES_REFRESH_MS = 5000;
const QUEUE_REFRESH_MS = 5000;
const HISTORY_REFRESH_MS = 15000;

// ------------------------------------------------------------ small helpers

/** An element: `h("a", {href: "#"}, "text", child)`; strings become text. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Make `el`'s children `children`, keeping the nodes already there: a page
 *  refreshed every few seconds must not replace a link or button under the
 *  pointer between press and release (the click is lost), nor drop the
 *  text a user is selecting. A new child takes the place of the old one
 *  with the same key (see KEY_ATTRIBUTES), else of the old
 *  unkeyed one at the same place among the unkeyed, if it has the same
 *  tag; the kept node gets the new one's attributes and text, its children
 *  are patched in turn, and kept nodes are never moved (a move is a
 *  removal). Listeners stay those of the first drawing, so a handler must
 *  not capture what a refresh changes; state held in properties (a
 *  select's value, a playing audio) is not compared, so such elements are
 *  not drawn through here. */
function patch(el, children) {
  const next = [];
  append({ append: (node) => next.push(node) }, children);
  const keyed = new Map();
  const unkeyed = [];
  for (const old of el.childNodes) {
    const key = keyOf(old);
    if (key) keyed.set(key, old);
    else unkeyed.push(old);
  }
  let place = 0;
  const kept = next.map((node) => {
    const key = keyOf(node);
    const old = key ? keyed.get(key) : unkeyed[place++];
    return old && old.nodeName === node.nodeName && old.namespaceURI === node.namespaceURI ? old : null;
  });
  const keep = new Set(kept.filter(Boolean));
  for (const old of [...el.childNodes]) if (!keep.has(old)) old.remove();
  let cursor = el.firstChild;
  next.forEach((node, i) => {
    const old = kept[i];
    if (!old) {
      el.insertBefore(node, cursor);
      return;
    }
    // Kept nodes are in their old order; one out of it is put in place.
    if (old !== cursor) el.insertBefore(old, cursor);
    else cursor = cursor.nextSibling;
    if (old.nodeType === Node.ELEMENT_NODE) {
      for (const attr of [...old.attributes]) if (!node.hasAttribute(attr.name)) old.removeAttribute(attr.name);
      for (const attr of node.attributes) {
        if (old.getAttribute(attr.name) !== attr.value) old.setAttribute(attr.name, attr.value);
      }
      patch(old, [...node.childNodes]);
    } else if (old.nodeValue !== node.nodeValue) {
      old.nodeValue = node.nodeValue;
    }
  });
}

const KEY_ATTRIBUTES = ["data-job", "data-task", "data-task-type", "data-pool", "data-chart", "id"];

function keyOf(node) {
  if (node.nodeType !== Node.ELEMENT_NODE) return null;
  const name = KEY_ATTRIBUTES.find((a) => node.hasAttribute(a));
  return name ? `${node.nodeName}[${name}=${node.getAttribute(name)}]` : null;
}

function badge(status, extra) {
  return h("span", { class: `badge ${status} ${extra || ""}` }, status.replace("_", " "));
}

/** `bytes` random bytes as hex (crypto.randomUUID needs a secure context;
 *  the console may be served over plain HTTP inside a private network). */
function randomHex(bytes) {
  return [...crypto.getRandomValues(new Uint8Array(bytes))]
    .map((b) => b.toString(16).padStart(2, "0")).join("");
}

function shortId(id) {
  return id.slice(0, 8) + "…" + id.slice(-4);
}

function ago(iso) {
  if (!iso) return "—";
  return `${duration((Date.now() - Date.parse(iso)) / 1000)} ago`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  seconds = Math.max(0, seconds);
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds < 10 ? seconds.toFixed(1) : Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.floor(seconds % 60)} s`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `${hours} h ${minutes % 60} min`;
  return `${Math.floor(hours / 24)} d`;
}

function between(from, to) {
  if (!from) return null;
  return ((to ? Date.parse(to) : Date.now()) - Date.parse(from)) / 1000;
}

function time(iso) {
  if (!iso) return "—";
  return h("time", { datetime: iso, title: new Date(iso).toLocaleString() }, ago(iso));
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function toast(message) {
  // One at a time: toasts share a corner, and a newer one would cover an
  // older one's text. They go into a live region that is on the page from
  // the start (index.html): one created with its text already in it is not
  // announced reliably.
  const region = document.getElementById("toasts");
  const el = h("div", { class: "toast" }, message);
  region.replaceChildren(el);
  setTimeout(() => el.remove(), 4000);
}

// -------------------------------------------------------------------- API

class ApiError extends Error {
  /** `retryAfter`: the seconds a 429 or 503 asked to wait, else 0. */
  constructor(status, message, retryAfter = 0) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

async function api(path, options = {}, key = apiKey()) {
  let response;
  try {
    response = await fetch(path, {
      ...options,
      headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` },
      credentials: "omit",
      cache: "no-store",
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    // fetch says only "Failed to fetch".
    throw new ApiError(0, "The API could not be reached (network error or server down).");
  }
  if (response.ok) return response;
  // HTTP/2 has no reason phrase.
  let message = `${response.status} ${response.statusText || "error"}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message = body.error.field ? `${body.error.field}: ${body.error.message}` : body.error.message;
    }
  } catch (_) {
    // Not JSON: keep the status line.
  }
  if (response.status === 401 && key === apiKey()) {
    signOut("The API refused the key (revoked?). Sign in again.");
  }
  throw new ApiError(response.status, message, Number(response.headers.get("Retry-After")) || 0);
}

async function getJson(path, signal) {
  return (await api(path, { signal })).json();
}

// ------------------------------------------------------------- the router

// Each page registers what to stop (timers, streams, blob URLs) when the
// user leaves it.
let leaving = [];
function onLeave(fn) {
  leaving.push(fn);
}

function route() {
  for (const fn of leaving) fn();
  leaving = [];
  const main = document.getElementById("main");
  main.replaceChildren();
  const key = apiKey();
  document.getElementById("nav").hidden = !key;
  document.getElementById("who").hidden = !key;
  if (!key) return renderSignIn(main);

  const admin = sessionStorage.getItem(ADMIN_ITEM) === "true";
  document.getElementById("nav-queue").hidden = !admin;
  document.getElementById("key-prefix").textContent = key.slice(0, 11) + "…";
  document.getElementById("role").textContent = admin ? "admin" : "client";

  const hash = location.hash.replace(/^#/, "") || "/jobs";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const section = path.startsWith("/queue") ? "queue" : "jobs";
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.section === section);
  }
  const job = path.match(/^\/jobs\/([0-9a-fA-F-]{36})$/);
  if (job) return renderJob(main, job[1]);
  if (path === "/queue") return renderQueue(main, admin);
  return renderJobs(main, params);
}

function signOut(message) {
  sessionStorage.removeItem(KEY_ITEM);
  sessionStorage.removeItem(ADMIN_ITEM);
  if (message) sessionStorage.setItem("backlog.signOutReason", message);
  go("#/jobs");
}

/** Show `hash`: a new address is routed by its hashchange event, the same
 *  one here (drawing twice would drop the sign-in form's reason). */
function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

// ---------------------------------------------------------------- sign in

function renderSignIn(main) {
  const reason = sessionStorage.getItem("backlog.signOutReason");
  sessionStorage.removeItem("backlog.signOutReason");
  const input = h("input", {
    id: "api-key", type: "password", autocomplete: "off", spellcheck: "false",
    placeholder: "bk_…", required: true,
  });
  const error = h("p", { class: "error-text", id: "sign-in-error", role: "alert", hidden: !reason }, reason || "");
  const button = h("button", { class: "btn primary", type: "submit", id: "sign-in" }, "Sign in");
  const form = h("form", { class: "card", onsubmit: (e) => { e.preventDefault(); signIn(); } },
    h("h1", {}, "Sign in"),
    h("p", {}, "Paste an API key. It stays in this tab's session storage and is sent only as a bearer token."),
    h("label", { for: "api-key" }, "API key"),
    input, button, error);
  main.append(h("div", { class: "signin" }, form));
  input.focus();

  async function signIn() {
    const key = input.value.trim();
    button.disabled = true;
    error.hidden = true;
    try {
      await api("/v1/jobs?limit=1", {}, key);
      // An admin key may read the queue; a client key gets a 403.
      let admin = false;
      try {
        await api("/v1/queue", {}, key);
        admin = true;
      } catch (e) {
        if (e.status !== 403) throw e;
      }
      sessionStorage.setItem(KEY_ITEM, key);
      sessionStorage.setItem(ADMIN_ITEM, String(admin));
      go(!location.hash || location.hash === "#/" ? "#/jobs" : location.hash);
    } catch (e) {
      error.textContent = e.status === 401 ? "This key was refused: unknown or revoked." : e.message;
      error.hidden = false;
      button.disabled = false;
    }
  }
}

// ------------------------------------------------------------------- jobs

function renderJobs(main, params) {
  const filter = {
    status: params.get("status") || "",
    type: params.get("type") || "",
    age: params.get("age") || "",
  };
  const cursors = params.get("cursor") ? [params.get("cursor")] : [];
  // The address keeps the filter (a reload or a shared link shows the
  // same list) without drawing a new page: what is typed in the new-job
  // form, and the focus, stay.
  const setFilter = (name, value) => {
    filter[name] = value;
    cursors.length = 0;
    const next = new URLSearchParams(filter);
    for (const [k, v] of [...next]) if (!v) next.delete(k);
    history.replaceState(null, "", `#/jobs?${next}`);
    load();
  };
  const select = (name, id, options) =>
    h("select", { id, onchange: (e) => setFilter(name, e.target.value) },
      options.map(([value, label]) => h("option", { value, selected: value === filter[name] }, label)));

  main.append(
    h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, "Jobs"), h("p", { class: "subtitle" }, "Newest first; refreshed every few seconds.")),
      h("span", { class: "live on", id: "list-live", role: "status" }, "live")),
    newJobForm(),
  );
  const tbody = h("tbody", { id: "jobs-body" });
  const pageInfo = h("span", {});
  const older = h("button", { class: "btn", type: "button", id: "older" }, "Older →");
  const newer = h("button", { class: "btn", type: "button", id: "newer" }, "← Newest");
  main.append(h("section", { class: "card flush" },
    h("div", { class: "filters" },
      h("div", {}, h("label", { for: "filter-status" }, "Status"),
        select("status", "filter-status", [["", "Any status"], ...JOB_STATUSES.map((x) => [x, x])])),
      h("div", {}, h("label", { for: "filter-type" }, "Type"),
        select("type", "filter-type", [["", "Any type"], ...JOB_TYPES.map((x) => [x, x])])),
      h("div", {}, h("label", { for: "filter-age" }, "Created"), select("age", "filter-age", AGES))),
    h("table", {},
      h("thead", {}, h("tr", {},
        ["Job", "Type", "Status", "Priority", "Created", "Ran for", "Error"].map((c, i) =>
          h("th", { class: i === 3 ? "num" : "" }, c)))),
      tbody),
    h("div", { class: "pager" }, pageInfo, h("span", {}, newer, " ", older))));

  let page = null;
  newer.addEventListener("click", () => { cursors.length = 0; load(); });
  older.addEventListener("click", () => {
    // A second press before the next page is drawn would skip it.
    if (page && page.next_cursor && cursors[cursors.length - 1] !== page.next_cursor) {
      cursors.push(page.next_cursor);
      load();
    }
  });

  const controller = new AbortController();
  let timer = null;
  onLeave(() => { controller.abort(); clearTimeout(timer); });

  // Loads overlap (the timer, a filter, a page button); only the latest
  // started is drawn, or rows of one page would show under another's label.
  let loads = 0;
  async function load() {
    clearTimeout(timer);
    const mine = ++loads;
    const query = new URLSearchParams({ limit: "25" });
    if (filter.status) query.set("status", filter.status);
    if (filter.type) query.set("type", filter.type);
    // From the link: anything but a sensible number of seconds is ignored
    // (an invalid date threw here, and the list stayed empty for good).
    const age = Number(filter.age);
    if (filter.age && Number.isFinite(age) && age > 0 && age < 1e9) {
      query.set("created_after", new Date(Date.now() - age * 1000).toISOString());
    }
    if (cursors.length) query.set("cursor", cursors[cursors.length - 1]);
    const live = document.getElementById("list-live");
    try {
      const read = await getJson(`/v1/jobs?${query}`, controller.signal);
      if (mine !== loads) return;
      page = read;
      drawRows(page.jobs);
      pageInfo.textContent = `${page.jobs.length} job${page.jobs.length === 1 ? "" : "s"}` +
        (cursors.length ? ` (page ${cursors.length + 1})` : "");
      older.disabled = !page.next_cursor;
      newer.disabled = !cursors.length;
      if (live) { live.className = "live on"; live.textContent = "live"; }
    } catch (e) {
      if (controller.signal.aborted || mine !== loads) return;
      if (live) { live.className = "live off"; live.textContent = e.message; }
    }
    timer = setTimeout(load, LIST_REFRESH_MS);
  }

  function drawRows(jobs) {
    if (!jobs.length) {
      tbody.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No jobs match.")));
      return;
    }
    patch(tbody, jobs.map((job) => h("tr", { "data-job": job.id },
      h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, shortId(job.id))),
      h("td", {}, job.type),
      h("td", {}, badge(job.status)),
      h("td", { class: "num" }, job.priority),
      h("td", {}, time(job.created_at)),
      h("td", {}, job.started_at ? duration(between(job.started_at, job.finished_at)) : "—"),
      h("td", { class: "err", title: job.error || "" }, job.error || ""))));
  }

  load();
}

function newJobForm() {
  const type = h("select", { id: "new-type" }, JOB_TYPES.map((t) => h("option", { value: t }, t)));
  const body = h("textarea", { id: "new-input", rows: 1, required: true });
  const bodyLabel = h("label", { for: "new-input" }, "Prompt");
  const priority = h("input", { id: "new-priority", type: "number", min: -100, max: 100, value: 0 });
  const error = h("p", { class: "error-text", id: "new-job-error", role: "alert", hidden: true });
  const submit = h("button", { class: "btn primary", type: "submit", id: "submit-job" }, "Submit job");
  const relabel = () => {
    const prompt = PROMPT_TYPES.has(type.value);
    bodyLabel.textContent = prompt ? "Prompt" : "Text";
    body.placeholder = prompt ? "A short story about a lighthouse keeper" : "The text to render";
  };
  type.addEventListener("change", relabel);
  relabel();
  // One key per filled-in form, sent again when a press is repeated after
  // an error: if the first request created the job but its answer was lost,
  // the second gets that job instead of making another.
  let idempotencyKey = null;
  for (const input of [type, body, priority]) {
    input.addEventListener("input", () => { idempotencyKey = null; });
  }
  return h("form", {
    class: "card", id: "new-job",
    onsubmit: async (e) => {
      e.preventDefault();
      submit.disabled = true;
      error.hidden = true;
      const field = PROMPT_TYPES.has(type.value) ? "prompt" : "text";
      idempotencyKey = idempotencyKey || `console-${randomHex(16)}`;
      try {
        const response = await api("/v1/jobs", {
          method: "POST",
          headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey },
          body: JSON.stringify({
            type: type.value, input: { [field]: body.value }, priority: Number(priority.value || 0),
          }),
        });
        const job = await response.json();
        location.hash = `#/jobs/${job.id}`;
      } catch (err) {
        error.textContent = err.message;
        error.hidden = false;
        submit.disabled = false;
      }
    },
  },
  h("h2", {}, "New job"),
  h("div", { class: "form-row" },
    h("div", {}, h("label", { for: "new-type" }, "Type"), type),
    h("div", {}, bodyLabel, body),
    h("div", {}, h("label", { for: "new-priority" }, "Priority"), priority),
    submit),
  error);
}

// -------------------------------------------------------------- job page

function renderJob(main, id) {
  const controller = new AbortController();
  const blobUrls = new Map(); // artifact id -> blob: URL
  let timer = null;
  let finished = false;
  onLeave(() => {
    controller.abort();
    clearTimeout(timer);
    for (const url of blobUrls.values()) URL.revokeObjectURL(url);
  });

  const live = h("span", { class: "live", id: "job-live", role: "status" }, "connecting");
  const head = h("div", { class: "page-head" });
  const meta = h("section", { class: "card" });
  const graph = h("section", { class: "card" }, h("h2", {}, "Tasks"));
  const graphBox = h("div", { class: "graph", id: "task-graph" });
  const taskTable = h("tbody", { id: "task-rows" });
  graph.append(graphBox, h("table", {},
    h("thead", {}, h("tr", {},
      ["Task", "Status", "Attempts", "Waited", "Ran for", "Last heartbeat", "Last error"].map((c) => h("th", {}, c)))),
    taskTable));
  const artifacts = h("section", { class: "artifacts", id: "artifacts" });
  main.append(h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")), head, meta, graph, artifacts);

  // Reads overlap (the timer, each status event, an action); only the
  // latest started is drawn, or an older answer could undo a newer one
  // (a retried job shown failed again, and its polling stopped).
  let reads = 0;
  async function refresh() {
    clearTimeout(timer);
    const read = ++reads;
    try {
      const detail = await getJson(`/v1/jobs/${id}`, controller.signal);
      if (read !== reads) return;
      draw(detail);
      finished = ["complete", "failed", "cancelled"].includes(detail.status);
      if (finished) {
        live.className = "live";
        live.textContent = "finished";
      }
    } catch (e) {
      if (controller.signal.aborted || read !== reads) return;
      if (e.status === 404 || e.status === 400) {
        main.replaceChildren(h("div", { class: "card empty" }, `No job ${id} for this key.`));
        finished = true;
        return;
      }
      live.className = "live off";
      live.textContent = e.message;
    }
    // The event stream reports the job's status; tasks move in between
    // (one completes, the next is claimed), so poll while unfinished.
    if (!finished) timer = setTimeout(refresh, JOB_REFRESH_MS);
  }

  // Drawn by patch(), so what a refresh did not change stays as it is.
  // Focusable from script only: where focus goes when the button that had
  // it is gone. The block stays; refreshes patch what is inside it.
  const title = h("div", { id: "job-title", tabindex: "-1" });
  const actions = h("div", { class: "actions" });
  head.append(title, h("div", { class: "actions" }, live, actions));

  let busy = false; // an action's request is in flight

  function draw(job) {
    patch(title, [
      h("h1", {}, `${job.type} job `, badge(job.status, "big"), " "),
      h("p", { class: "subtitle mono" }, job.id)]);
    patch(actions, [
      job.status === "queued" || job.status === "processing"
        ? h("button", { class: "btn danger", type: "button", id: "cancel-job", disabled: busy,
          onclick: () => act("cancel") }, "Cancel") : null,
      job.status === "failed"
        ? h("button", { class: "btn", type: "button", id: "retry-job", disabled: busy,
          onclick: () => act("retry") }, "Retry") : null,
    ]);
    const input = job.input || {};
    patch(meta, [
      h("dl", { class: "meta" },
        field("Created", time(job.created_at)),
        field("Started", time(job.started_at)),
        field("Finished", time(job.finished_at)),
        field("Total time", job.started_at ? duration(between(job.created_at, job.finished_at)) : "—"),
        field("Priority", job.priority),
        field("Idempotency key", job.idempotency_key || "—")),
      job.error ? h("pre", { class: "job-error", id: "job-error" }, job.error) : null,
      h("h2", { class: "input-head" }, input.prompt !== undefined ? "Prompt" : "Input text"),
      h("pre", { id: "job-input" }, input.prompt !== undefined ? input.prompt : (input.text || "")),
    ]);
    patch(graphBox, [taskGraph(job.tasks)]);
    patch(taskTable, job.tasks.map((t) => h("tr", { "data-task": t.type },
      h("td", { class: "mono" }, t.type),
      h("td", {}, badge(taskState(t, job.tasks))),
      h("td", {}, `${t.attempts} / ${t.max_attempts}`),
      h("td", {}, duration(between(t.created_at, t.claimed_at || t.finished_at))),
      h("td", {}, ran(t)),
      h("td", {}, time(t.heartbeat_at)),
      h("td", { class: "err", title: t.last_error || "" }, t.last_error || ""))));
    drawArtifacts(job.artifacts);
  }

  function field(name, value) {
    return h("div", {}, h("dt", {}, name), h("dd", {}, value));
  }

  // The buttons are disabled while an action is in flight (a second press
  // would only answer 409), through `busy`, which every drawing reads. A
  // job queued again is followed again unless it still is.
  async function act(what) {
    busy = true;
    for (const button of actions.querySelectorAll("button")) button.disabled = true;
    try {
      await api(`/v1/jobs/${id}/${what}`, { method: "POST" });
      toast(what === "cancel" ? "Job cancelled" : "Job queued again");
    } catch (e) {
      toast(e.message);
    }
    busy = false;
    await refresh();
    // The button pressed may be gone (a cancelled job has no Cancel): keep
    // keyboard focus on the page, at its title, not lost to <body>. The
    // title's block, not its heading: a later refresh may redraw that.
    if (!document.activeElement || document.activeElement === document.body) title.focus();
    if (!finished) follow();
  }

  // Cards are kept across refreshes (a PDF frame or a playing audio is not
  // reloaded); new artifacts get a card, in the pipeline's order.
  const cards = new Map(); // artifact id -> card
  function drawArtifacts(list) {
    const order = { text: 0, pdf: 1, audio: 2 };
    const sorted = [...list].sort((a, b) => (order[a.kind] ?? 9) - (order[b.kind] ?? 9));
    for (const a of sorted) if (!cards.has(a.id)) cards.set(a.id, artifactCard(a));
    // Only new cards are inserted: a frame taken out of the page and put
    // back reloads (the PDF back at page 1).
    let after = null;
    for (const a of sorted) {
      const card = cards.get(a.id);
      if (!card.isConnected) artifacts.insertBefore(card, after ? after.nextSibling : artifacts.firstChild);
      after = card;
    }
  }

  function artifactCard(artifact) {
    const body = h("div", { class: "artifact-body" }, h("p", { class: "muted" }, "Loading…"));
    const download = h("a", { class: "btn", download: `${artifact.kind}-${id.slice(0, 8)}${extension(artifact)}`,
      id: `download-${artifact.kind}` }, "Download");
    const card = h("section", { class: `card artifact ${artifact.kind}`, "data-artifact": artifact.id },
      h("div", { class: "artifact-head" },
        h("h3", {}, artifact.kind === "pdf" ? "PDF" : artifact.kind),
        h("span", { class: "facts" },
          `${artifact.content_type} · ${bytes(artifact.bytes)} · sha256 ${artifact.sha256.slice(0, 12)}…`),
        download),
      body);
    loadArtifact(artifact, body, download);
    return card;
  }

  async function loadArtifact(artifact, body, download) {
    try {
      const response = await api(artifact.download_path, { signal: controller.signal });
      // The type the API declared, whatever the blob guessed.
      const blob = new Blob([await response.blob()], { type: artifact.content_type });
      const url = URL.createObjectURL(blob);
      blobUrls.set(artifact.id, url);
      const text = artifact.kind === "text" ? await blob.text() : null;
      download.href = url;
      if (artifact.kind === "pdf") {
        body.replaceChildren(h("iframe", { src: url, title: "PDF", id: "pdf-frame" }));
      } else if (artifact.kind === "audio") {
        body.replaceChildren(h("audio", { controls: true, preload: "metadata", src: url, id: "audio-player" }));
      } else {
        body.replaceChildren(h("pre", { id: "text-artifact" }, text));
      }
    } catch (e) {
      if (controller.signal.aborted) return;
      // A finished job's page reads nothing more: the user asks again.
      body.replaceChildren(h("p", { class: "error-text", role: "alert" }, e.message),
        h("button", { class: "btn", type: "button", id: `reload-${artifact.kind}`, onclick: () => {
          body.replaceChildren(h("p", { class: "muted" }, "Loading…"));
          loadArtifact(artifact, body, download);
        } }, "Try again"));
    }
  }

  // Follow the job's event stream: each `status` event re-reads the job.
  // The stream ends when the job finishes (or after the server's limit);
  // an unfinished job is followed again.
  let following = false;
  async function follow() {
    if (following) return;
    following = true;
    try {
      await followStream();
    } finally {
      following = false;
    }
  }

  async function followStream() {
    while (!controller.signal.aborted && !finished) {
      // A server over its stream limit says when to ask again; until then
      // the job is polled.
      let wait = 1000;
      try {
        const response = await api(`/v1/jobs/${id}/events`, {
          signal: controller.signal, headers: { Accept: "text/event-stream" },
        });
        live.className = "live on";
        live.textContent = "live";
        await readEvents(response, (name) => { if (name === "status") refresh(); });
      } catch (e) {
        if (controller.signal.aborted) return;
        live.className = "live off";
        live.textContent = e.status === 429 ? "too many streams; polling" : "reconnecting";
        if (e.retryAfter) wait = e.retryAfter * 1000;
      }
      await refresh();
      if (!finished) await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  refresh().then(follow);
}

/** How long a task's current (or last) attempt ran; none before a claim. */
function ran(task) {
  const running = ["claimed", "processing"].includes(task.status);
  if (!task.claimed_at || !(running || task.finished_at)) return "—";
  return duration(between(task.claimed_at, running ? null : task.finished_at));
}

function extension(artifact) {
  return { pdf: ".pdf", text: ".txt" }[artifact.kind] ||
    (artifact.content_type.includes("wav") ? ".wav" : artifact.content_type.includes("mpeg") ? ".mp3" : "");
}

/** Read `text/event-stream` from a fetch response, calling `onEvent(name, data)`. */
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

/** What a task is doing: the queue's status, with a pending task told
 *  apart as `blocked` (on a task it depends on) or `scheduled` (a retry
 *  backing off). */
function taskState(task, tasks) {
  if (task.status !== "pending") return task.status;
  const done = new Set(tasks.filter((t) => t.status === "complete").map((t) => t.type));
  if (task.depends_on.some((dep) => !done.has(dep))) return "blocked";
  if (Date.parse(task.run_at) > Date.now()) return "scheduled";
  return "pending";
}

/** The task graph as SVG: one column per dependency depth, arrows from
 *  each task to those that wait for it. */
function taskGraph(tasks) {
  const byType = new Map(tasks.map((t) => [t.type, t]));
  const depth = new Map();
  const depthOf = (t) => {
    if (depth.has(t.type)) return depth.get(t.type);
    depth.set(t.type, 0);
    const d = Math.max(0, ...t.depends_on.map((dep) => (byType.has(dep) ? depthOf(byType.get(dep)) + 1 : 0)));
    depth.set(t.type, d);
    return d;
  };
  tasks.forEach(depthOf);
  const columns = [];
  for (const t of tasks) (columns[depth.get(t.type)] ||= []).push(t);
  const W = 230, H = 96, GAP_X = 90, GAP_Y = 22, PAD = 8;
  const tallest = Math.max(...columns.map((c) => c.length));
  const height = tallest * H + (tallest - 1) * GAP_Y + PAD * 2;
  const width = columns.length * W + (columns.length - 1) * GAP_X + PAD * 2;
  const at = new Map();
  columns.forEach((column, x) => {
    const top = (height - (column.length * H + (column.length - 1) * GAP_Y)) / 2;
    column.forEach((t, y) => at.set(t.type, { x: PAD + x * (W + GAP_X), y: top + y * (H + GAP_Y) }));
  });
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "Task graph" });
  svg.append(s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, s("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow" }))));
  for (const t of tasks) {
    for (const dep of t.depends_on) {
      const from = at.get(dep), to = at.get(t.type);
      if (!from || !to) continue;
      const x1 = from.x + W, y1 = from.y + H / 2, x2 = to.x - 2, y2 = to.y + H / 2, mid = (x1 + x2) / 2;
      svg.append(s("path", { class: "edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`,
        "marker-end": "url(#arrow)" }));
    }
  }
  for (const t of tasks) {
    const { x, y } = at.get(t.type);
    const state = taskState(t, tasks);
    const timing = {
      complete: `took ${ran(t)}`,
      failed: `failed after ${ran(t)}`,
      cancelled: `cancelled ${ago(t.finished_at)}`,
      claimed: `claimed ${ago(t.claimed_at)}`,
      processing: `running ${ran(t)}`,
      blocked: `waits for ${t.depends_on.join(", ")}`,
      scheduled: `retry in ${duration(-between(t.run_at))}`,
      pending: `waiting ${duration(between(t.run_at))}`,
    }[state];
    const g = s("g", { class: `node ${state}`, "data-task": t.type, "data-state": state,
      transform: `translate(${x},${y})` });
    g.append(
      s("title", {}, t.last_error ? `${t.type}: ${t.last_error}` : t.type),
      s("rect", { class: "box", width: W, height: H, rx: 9 }),
      s("rect", { class: "stripe", width: 5, height: H - 2, x: 1, y: 1, rx: 2 }),
      s("text", { class: "title", x: 18, y: 24 }, t.type),
      s("text", { class: "state", x: 18, y: 45 }, state),
      s("text", { x: W - 14, y: 45, "text-anchor": "end" }, `attempt ${t.attempts}/${t.max_attempts}`),
      s("text", { x: 18, y: 66 }, timing));
    if (t.last_error) {
      const err = t.last_error.length > 30 ? t.last_error.slice(0, 29) + "…" : t.last_error;
      g.append(s("text", { class: "err", x: 18, y: 85 }, err));
    }
    svg.append(g);
  }
  return svg;
}

// ------------------------------------------------------------------ queue

function renderQueue(main, admin) {
  if (!admin) {
    main.append(h("div", { class: "card empty" }, "The queue is shown to admin keys only."));
    return;
  }
  const controller = new AbortController();
  const timers = [];
  onLeave(() => { controller.abort(); timers.forEach(clearTimeout); });

  const stats = h("div", { class: "stats", id: "queue-stats" });
  const depthBody = h("tbody", { id: "depth-rows" });
  const charts = h("div", { class: "charts", id: "charts" });
  const chartNote = h("p", { class: "muted", id: "chart-note" });
  const pools = h("tbody", { id: "pool-rows" });
  main.append(
    h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, "Queue"),
        h("p", { class: "subtitle" }, "Depth per task type and the worker pools the controller scales.")),
      h("span", { class: "live on", id: "queue-live", role: "status" }, "live")),
    stats,
    h("section", { class: "card flush" }, h("h2", {}, "Depth now"),
      h("table", {}, h("thead", {}, h("tr", {},
        h("th", {}, "Task type"), ...["Pending", "Scheduled", "Blocked", "In flight", "Oldest pending",
          "Done / min"].map((c) => h("th", { class: "num" }, c)))), depthBody)),
    h("section", { class: "card" }, h("h2", {}, "Last hour"),
      h("div", { class: "legend" }, SERIES.map((name) =>
        h("span", {}, h("i", { class: `swatch ${name}` }), name.replace("_", " ")))),
      charts, chartNote),
    h("section", { class: "card flush" }, h("h2", {}, "Worker pools"),
      h("table", {}, h("thead", {}, h("tr", {},
        ["Pool", "Desired / current / ready", "Busy", "Load", "Conditions", "Last decision", "Updated"]
          .map((c) => h("th", {}, c)))), pools)));

  const every = (ms, fn) => {
    const run = async () => {
      try {
        await fn();
        const live = document.getElementById("queue-live");
        if (live) { live.className = "live on"; live.textContent = "live"; }
      } catch (e) {
        if (controller.signal.aborted) return;
        const live = document.getElementById("queue-live");
        if (live) { live.className = "live off"; live.textContent = e.message; }
      }
      if (!controller.signal.aborted) timers.push(setTimeout(run, ms));
    };
    run();
  };

  every(QUEUE_REFRESH_MS, async () => {
    const depth = await getJson("/v1/queue", controller.signal);
    const total = (k) => depth.task_types.reduce((sum, t) => sum + t[k], 0);
    const oldest = Math.max(0, ...depth.task_types.map((t) => t.oldest_pending_seconds));
    patch(stats, [
      stat("Pending", total("pending"), "runnable now"),
      stat("In flight", total("in_flight"), "claimed or running"),
      stat("Blocked", total("blocked"), `${total("scheduled")} scheduled for retry`),
      stat("Oldest pending", oldest ? duration(oldest) : "—", `${total("completed_last_minute")} done in the last minute`)]);
    patch(depthBody, depth.task_types.map((t) => h("tr", { "data-task-type": t.task_type },
      h("td", { class: "mono" }, t.task_type, t.capped ? " (capped)" : ""),
      ...["pending", "scheduled", "blocked", "in_flight"].map((k) => h("td", { class: "num" }, t[k])),
      h("td", { class: "num" }, t.oldest_pending_seconds ? duration(t.oldest_pending_seconds) : "—"),
      h("td", { class: "num" }, t.completed_last_minute))));
  });

  every(HISTORY_REFRESH_MS, async () => {
    const history = await getJson("/v1/queue/history", controller.signal);
    // In the order the API lists them (the pipeline's), as the table above.
    const types = [...new Set(history.samples.flatMap((sm) => sm.task_types.map((t) => t.task_type)))];
    patch(charts, types.map((type) => h("div", { class: "chart", "data-chart": type },
      h("h3", {}, type), depthChart(history.samples, type))));
    chartNote.textContent = history.interval_seconds
      ? `${history.samples.length} samples, one every ${history.interval_seconds} s, kept by this API process since it started.`
      : "This API process samples no depth history (DEPTH_SAMPLE_SECONDS=0).";
  });

  every(QUEUE_REFRESH_MS, async () => {
    const list = (await getJson("/v1/pools", controller.signal)).pools;
    if (!list.length) {
      pools.replaceChildren(h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No controller has reported a pool.")));
      return;
    }
    patch(pools, list.map((p) => {
      const age = between(p.updated_at);
      const conditions = Array.isArray(p.conditions) ? p.conditions : [];
      return h("tr", { "data-pool": p.pool },
        h("td", {}, h("b", {}, p.pool), h("div", { class: "muted" }, p.backend),
          h("div", { class: "muted mono task-types" }, (p.task_types || []).join(", "))),
        h("td", { class: "replicas" }, h("b", {}, p.desired_replicas), " / ", p.current_replicas, " / ", p.ready_replicas),
        h("td", { class: "num" }, p.busy_replicas),
        h("td", { class: "load" }, `${p.pending} pending`, h("div", { class: "muted" }, `${p.in_flight} in flight`)),
        h("td", {}, h("div", { class: "conditions" }, conditions.map((c) => h("span", {
          class: `cond ${String(c.status).toLowerCase()} ${["Fallback", "Degraded", "Paused"].includes(c.type) ? "warn" : ""}`,
          title: [c.reason, c.message].filter(Boolean).join(": "),
        }, c.type)))),
        h("td", { class: "decision" }, p.last_decision || "—",
          p.last_scale_at ? h("div", { class: "muted" }, "scaled ", time(p.last_scale_at)) : null),
        h("td", {}, time(p.updated_at), age > 120 ? h("div", { class: "stale" }, "stale: is a controller running?") : null));
    }));
  });
}

function stat(label, value, sub) {
  return h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: "value" }, value),
    h("div", { class: "sub" }, sub));
}

/** A line chart of one task type's depth over the last hour (or since
 *  this API process started sampling, when that is less), in SVG. */
function depthChart(samples, type) {
  const W = 420, H = 150, L = 34, R = 8, T = 8, B = 20;
  const now = Date.now();
  const points = samples
    .map((sm) => ({ at: Date.parse(sm.at), d: sm.task_types.find((t) => t.task_type === type) }))
    .filter((p) => p.d && p.at >= now - 3600 * 1000);
  const span = Math.min(3600 * 1000, Math.max(60 * 1000, points.length ? now - points[0].at : 0));
  const max = Math.max(4, ...points.flatMap((p) => SERIES.map((k) => p.d[k])));
  const top = niceCeiling(max);
  const x = (at) => L + ((at - (now - span)) / span) * (W - L - R);
  const y = (v) => T + (1 - v / top) * (H - T - B);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${type} depth, last hour` });
  for (const v of [0, top / 2, top]) {
    svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }),
      s("text", { class: "tick", x: L - 6, y: y(v) + 3, "text-anchor": "end" },
        Number.isInteger(v) ? v : v.toFixed(1)));
  }
  for (const [part, anchor] of [[1, "start"], [0.5, "middle"], [0, "end"]]) {
    svg.append(s("text", { class: "tick", x: x(now - part * span), y: H - 5, "text-anchor": anchor },
      part ? `-${roughly(part * span / 1000)}` : "now"));
  }
  if (points.length) {
    for (const k of SERIES) {
      const d = points.map((p, i) => `${i ? "L" : "M"}${x(p.at).toFixed(1)},${y(p.d[k]).toFixed(1)}`).join(" ");
      svg.append(s("path", { class: `series ${k}`, d }));
    }
  }
  return svg;
}

function roughly(seconds) {
  return seconds >= 90 ? `${Math.round(seconds / 60)} min` : `${Math.round(seconds)} s`;
}

function niceCeiling(v) {
  const step = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= v) return m * step;
  return 10 * step;
}

// ------------------------------------------------------------------ start

// "4 s ago" must age on a page that no longer reads anything (a finished
// job); patch() puts the current text back at the next drawing anyway.
setInterval(() => {
  for (const el of document.querySelectorAll("time[datetime]")) {
    el.textContent = ago(el.getAttribute("datetime"));
  }
}, TIMES_REFRESH_MS);

document.getElementById("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
route();
