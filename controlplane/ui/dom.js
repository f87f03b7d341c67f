// Building the page from data: every value from the API goes in as text (a text node,
// textContent or an attribute set by name), never as HTML, so a container name or a label
// value is shown as it is and can never become markup.

const SVG = "http://www.w3.org/2000/svg";
export const NONE = "\u2014"; // an em dash: no figure (traffic not collected, or not known)

/** An element with attributes, listeners (on* with a function) and children (text or nodes). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (typeof value === "function") el.addEventListener(name.replace(/^on/, ""), value);
    else if (name === "class") el.className = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace what an element holds, only when it changed (a poll redraws nothing unchanged). */
export function fill(el, ...children) {
  const next = h("div", {}, ...children).childNodes;
  const now = el.childNodes;
  if (now.length === next.length && [...now].every((node, i) => node.isEqualNode(next[i]))) return;
  el.replaceChildren(...next);
}

export function setText(el, text) {
  const value = text === null || text === undefined ? NONE : String(text);
  if (el.textContent !== value) el.textContent = value;
}

export function setAttr(el, name, value) {
  if (value === null || value === undefined || value === false) {
    if (el.hasAttribute(name)) el.removeAttribute(name);
  } else if (el.getAttribute(name) !== String(value)) {
    el.setAttribute(name, String(value));
  }
}

/**
 * Keep a table body's rows in step with `items`, reusing the row of each key: a row (and the
 * control in it that has the focus, or a value being typed) survives every poll.
 * `make(item)` builds a row; `update(row, item)` brings it up to date.
 */
export function syncRows(tbody, items, keyOf, make, update, empty) {
  const old = new Map();
  for (const row of tbody.children) old.set(row.dataset.key, row);
  let previous = null;
  const place = (row) => {
    const wanted = previous ? previous.nextElementSibling : tbody.firstElementChild;
    if (wanted !== row) tbody.insertBefore(row, wanted);
    previous = row;
  };
  for (const item of items) {
    const key = keyOf(item);
    let row = old.get(key);
    old.delete(key);
    if (!row) {
      row = make(item);
      row.dataset.key = key;
    }
    update(row, item);
    place(row);
  }
  if (!items.length && empty) {
    let row = old.get("\0empty");
    old.delete("\0empty");
    if (!row) {
      const columns = tbody.closest("table").querySelectorAll("thead th").length || 1;
      row = h("tr", { class: "empty" }, h("td", { colspan: columns }, empty));
      row.dataset.key = "\0empty";
    }
    place(row);
  }
  for (const row of old.values()) row.remove();
}

/** A sparkline of counts per second (oldest first), described for screen readers. */
export function sparkline(counts, label) {
  const width = 120;
  const height = 24;
  const top = Math.max(1, ...counts);
  const step = counts.length > 1 ? width / (counts.length - 1) : width;
  const points = counts
    .map((n, i) => `${(i * step).toFixed(1)},${(height - 1 - (n / top) * (height - 2)).toFixed(1)}`)
    .join(" ");
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "spark");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const title = document.createElementNS(SVG, "title");
  title.textContent = label;
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points);
  svg.append(title, line);
  return svg;
}

// ---------------------------------------------------------------- words and numbers

export function methodText(algorithm) {
  if (!algorithm) return NONE;
  const words = [algorithm.method];
  if (algorithm.method === "hash") {
    words.push(algorithm.key || "");
    if (algorithm.consistent) words.push("consistent");
  }
  if (algorithm.method === "random" && algorithm.two) words.push("two");
  return words.join(" ");
}

export function rate(traffic) {
  return traffic ? `${number(traffic.rps_10s)}/s` : NONE;
}

/** The largest --stats-sample of the nginx serving a service: past 1, its counts of
 * ordinary answers are estimates (a reload nginx reports one in that many). */
export function sampling(service) {
  return Math.max(1, ...service.nginx.map((n) => n.stats_sample || 1));
}

/** A figure as text, marked "≈" with why when it is an estimate. */
export function estimate(text, sample) {
  if (sample <= 1 || text === NONE) return text;
  return h(
    "span",
    { title: `an estimate: a reload nginx reports 1 in ${sample} ordinary answers` },
    `\u2248 ${text}`,
  );
}

export function total(requests) {
  return requests ? Object.values(requests).reduce((sum, n) => sum + n, 0) : 0;
}

/** 5xx replies and failed connects, as a share of the last minute's tries. */
export function errorRate(traffic) {
  if (!traffic) return NONE;
  const failed = (traffic.requests?.["5xx"] || 0) + (traffic.connect_errors || 0);
  const tries = total(traffic.requests) + (traffic.connect_errors || 0);
  if (!tries) return "no requests";
  return `${number((100 * failed) / tries)} %`;
}

export function ms(value) {
  return value === null || value === undefined ? NONE : `${number(value)} ms`;
}

export function number(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return NONE;
  if (value === 0) return "0";
  if (Math.abs(value) >= 100) return String(Math.round(value));
  if (Math.abs(value) >= 10) return value.toFixed(1);
  return value.toFixed(2);
}

/** How long ago, in words: "2 min ago". */
export function ago(at, now = Date.now()) {
  const seconds = Math.max(0, Math.round((now - at.getTime()) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

/** A moment from the API: its local time (with the date unless today), and how long ago. */
export function timeEl(iso, now = Date.now()) {
  if (!iso) return NONE;
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return String(iso);
  const today = new Date(now).toDateString() === at.toDateString();
  return h(
    "span",
    { class: "moment" },
    h("time", { datetime: iso, title: iso }, today ? at.toLocaleTimeString() : at.toLocaleString()),
    " ",
    h("span", { class: "hint" }, `(${ago(at, now)})`),
  );
}
