// One service: its backends with their state, why and since when, weight and figures; the
// balancing method and the actions (method, weight, drain); what is left out; its events.

import { API, ApiFailure, del, get, patch, put, servicePath } from "./api.js";
import {
  NONE,
  errorRate,
  estimate,
  fill,
  h,
  methodText,
  ms,
  rate,
  sampling,
  setText,
  sparkline,
  syncRows,
  timeEl,
  total,
} from "./dom.js";
import { eventRows, nginxWord, table } from "./parts.js";

const METHODS = ["round_robin", "least_conn", "ip_hash", "hash", "random", "least_time"];
/** The API's backend states, in the words of the dashboard, and how each looks. */
const STATES = {
  up: ["serving", "ok"],
  draining: ["draining", "warn"],
  starting: ["held", "warn"],
  unhealthy: ["unhealthy", "bad"],
  paused: ["paused", "warn"],
  stopping: ["stopping", "warn"],
};

export function servicePage(name, app) {
  let made = 0;
  const id = (prefix) => `${prefix}-${++made}`;

  const banner = h("div", { class: "banner", role: "alert", hidden: true });
  const facts = {
    method: h("dd"),
    hosts: h("dd"),
    networks: h("dd"),
    nginx: h("dd"),
    rps: h("dd"),
    errors: h("dd"),
    p95: h("dd"),
  };
  const summary = h(
    "dl",
    { class: "facts" },
    [
      ["Method", facts.method],
      ["Host names", facts.hosts],
      ["Networks", facts.networks],
      ["nginx", facts.nginx],
      ["Requests", facts.rps],
      ["Errors (1 min)", facts.errors],
      ["p95", facts.p95],
    ].map(([term, dd]) => h("div", {}, h("dt", {}, term), dd)),
  );
  const method = methodForm(name, app);
  const backends = table("backends-title", [
    "Backend",
    "Address",
    "State",
    "Why, since when",
    "Weight",
    "In nginx",
    "Requests",
    "5xx (1 min)",
    "p95",
    "Last minute",
    "Drain",
  ]);
  const nginx = table("service-nginx-title", [
    "nginx",
    "Data plane",
    "Config version",
    "Sends this service's requests",
    "Backends it sends to",
    "Last config not taken",
  ]);
  const warnings = h("ul", { class: "warnings" });
  const events = table("service-events-title", ["Time", "Kind", "What happened"]);
  const content = h(
    "div",
    {},
    summary,
    method.el,
    h("section", {}, h("h2", { id: "backends-title" }, "Backends"), backends.el),
    h("section", {}, h("h2", { id: "service-nginx-title" }, "nginx"), nginx.el),
    h("section", {}, h("h2", { id: "warnings-title" }, "Warnings"), warnings),
    h("section", {}, h("h2", { id: "service-events-title" }, "Recent events"), events.el),
  );
  const root = h(
    "section",
    { class: "view", "aria-labelledby": "view-title" },
    h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Overview"), " / service"),
    h("h1", { id: "view-title", tabindex: "-1" }, "Service ", h("span", { class: "name" }, name)),
    banner,
    content,
  );

  async function load() {
    const [service, recent] = await Promise.all([
      get(servicePath(name)),
      get(`${API}/events?limit=100`),
    ]);
    return { service, recent };
  }

  function update({ service, recent }) {
    banner.hidden = service.exists;
    if (!service.exists) {
      setText(banner, "No container has this service yet: only its overrides are kept.");
    }
    content.hidden = false;
    fill(
      facts.method,
      h("code", {}, methodText(service.algorithm)),
      h("span", { class: "hint" }, ` from ${service.algorithm_source}`),
    );
    fill(facts.hosts, service.hosts.join(", ") || NONE);
    fill(facts.networks, service.networks.join(", ") || NONE);
    fill(facts.nginx, nginxWord(service.nginx));
    fill(facts.rps, estimate(rate(service.traffic), sampling(service)));
    fill(facts.errors, errorRate(service.traffic));
    fill(facts.p95, ms(service.traffic ? service.traffic.p95_ms : null));
    method.show(service);

    const drained = (b) => Boolean(service.overrides.backends[b.name]?.drain);
    const items = [
      ...service.backends.map((b) => ({ backend: b })),
      ...service.excluded.map((e) => ({ excluded: e })),
    ];
    syncRows(
      backends.body,
      items,
      (item) =>
        item.backend
          ? `b\n${item.backend.container}\n${item.backend.network}`
          : `x\n${item.excluded.container}\n${item.excluded.reason}`,
      (item) => (item.backend ? backendRow(item.backend) : backends.row()),
      (row, item) =>
        item.backend
          ? row.show(item.backend, drained(item.backend), service)
          : showExcluded(row, item.excluded),
      "No backend: no running container is in this service.",
    );
    syncRows(
      nginx.body,
      service.nginx,
      (n) => n.container,
      () => nginx.row(),
      (row, n) => {
        const [who, mode, version, sync, serving, failure] = row.cells;
        fill(who, n.name);
        fill(
          mode,
          n.dataplane || "not known yet",
          n.stats_sample > 1
            ? h("div", { class: "hint" }, `counts 1 in ${n.stats_sample} ordinary answers`)
            : null,
        );
        fill(version, n.version === null ? "not deployed to yet" : String(n.version));
        fill(sync, n.in_sync === null ? NONE : n.in_sync ? "yes" : "no");
        fill(serving, n.serving === null ? NONE : String(n.serving));
        fill(
          failure,
          n.failure
            ? h(
                "div",
                {},
                `version ${n.failure.version} (${n.failure.refused ? "nginx -t refused it" : "not delivered"})`,
                h("pre", { class: "error-text" }, n.failure.error),
              )
            : "none",
        );
      },
      "No managed nginx.",
    );
    fill(
      warnings,
      service.warnings.length
        ? service.warnings.map((w) => h("li", {}, w))
        : h("li", { class: "hint" }, "No warning."),
    );
    eventRows(events, recent.events.filter((e) => concerns(e, name)).slice(0, 20));
  }

  /** An unknown service is said on the page (true); anything else is the header's to say. */
  function failed(error) {
    if (error.status !== 404) return false;
    banner.hidden = false;
    setText(banner, error.message);
    content.hidden = true;
    return true;
  }

  /** A backend's row, with its weight form and drain button kept across polls. */
  function backendRow(first) {
    const row = backends.row();
    const n = id("backend");
    const weight = h("input", {
      id: `${n}-weight`,
      name: "weight",
      type: "text",
      inputmode: "numeric",
      autocomplete: "off",
      class: "weight",
      "aria-describedby": `${n}-weight-error`,
    });
    const weightError = h("span", { id: `${n}-weight-error`, class: "field-error", role: "alert" });
    const setWeight = h("button", { type: "submit" }, "Set");
    const weightNote = h("span", { class: "hint" });
    let typed = false;
    weight.addEventListener("input", () => {
      typed = true;
    });
    const weightForm = h(
      "form",
      { class: "inline", novalidate: true },
      h("label", { for: weight.id, class: "sr-only" }, `Weight of ${first.name} (empty: the labels decide)`),
      h("span", { class: "nowrap" }, weight, " ", setWeight),
      weightNote,
      weightError,
    );
    const drain = h("button", { type: "button", class: "drain" }, "Drain");
    const drainResult = h("span", { class: "result", role: "status" });
    const drainError = h("span", { class: "field-error", role: "alert" });
    row.cells[4].append(weightForm);
    row.cells[10].append(drain, drainResult, drainError);
    let current = first;
    let isDrained = false;
    const path = () => `${servicePath(name)}/backends/${encodeURIComponent(current.name)}?wait=true`;

    weightForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = weight.value.trim();
      // as typed: the API says what a weight may be (empty drops the override)
      const body = { weight: text === "" ? null : /^[0-9]+$/.test(text) ? Number(text) : text };
      const done = await act(app, setWeight, () => patch(path(), body), {
        weight: [weight, weightError],
        "": [weight, weightError],
      });
      if (done) typed = false;
      if (done) setText(drainResult, resultText(done.applied, "weight set"));
    });
    drain.addEventListener("click", async () => {
      const wanted = !isDrained;
      const done = await act(app, drain, () => patch(path(), { drain: wanted }), {
        drain: [drain, drainError],
        "": [drain, drainError],
      });
      if (done) setText(drainResult, resultText(done.applied, wanted ? "drained" : "undrained"));
    });

    row.show = (b, drained, service) => {
      current = b;
      isDrained = drained;
      const [who, address, state, why, , inNginx, rps, errors, p95, spark] = row.cells;
      fill(who, b.name, h("div", { class: "hint nowrap" }, b.container.slice(0, 12)));
      fill(
        address,
        h("span", { class: "nowrap" }, b.ip.includes(":") ? `[${b.ip}]:${b.port}` : `${b.ip}:${b.port}`),
        h("div", { class: "hint" }, b.network),
      );
      const [word, look] = STATES[b.state] || [b.state, ""];
      fill(
        state,
        h("span", { class: `badge ${look}`, title: `API state: ${b.state}` }, word),
        b.backup ? h("div", { class: "hint" }, "backup") : null,
      );
      fill(
        why,
        reasons(b, drained).map((line) => h("div", {}, line)),
        b.since || b.health?.since
          ? h("div", { class: "hint" }, "since ", timeEl(b.since || b.health.since))
          : null,
      );
      if (document.activeElement !== weight && !typed) weight.value = String(b.weight);
      const override = service.overrides.backends[b.name];
      setText(weightNote, override?.weight ? "set through the API" : "");
      fill(
        inNginx,
        h(
          "span",
          { title: b.served_by.length ? `served by ${b.served_by.join(", ")}` : null },
          b.in_nginx === null ? NONE : b.in_nginx ? "yes" : "no",
        ),
      );
      const traffic = b.traffic;
      const sample = sampling(service);
      fill(
        rps,
        estimate(rate(traffic), sample),
        traffic
          ? h(
              "div",
              { class: "hint nowrap" },
              estimate(`${total(traffic.requests)} in 1 min`, sample),
            )
          : null,
      );
      fill(
        errors,
        traffic ? String(traffic.requests?.["5xx"] || 0) : NONE,
        traffic?.connect_errors
          ? h("div", { class: "hint" }, `+${traffic.connect_errors} failed connects`)
          : null,
      );
      fill(p95, ms(traffic ? traffic.p95_ms : null));
      fill(
        spark,
        traffic?.per_second?.length
          ? sparkline(
              traffic.per_second,
              `requests per second over the last minute, at most ${Math.max(...traffic.per_second)}`,
            )
          : NONE,
      );
      setText(drain, drained ? "Undrain" : "Drain");
      drain.setAttribute("aria-label", `${drained ? "Undrain" : "Drain"} ${b.name}`);
    };
    return row;
  }

  return { root, title: `Service ${name}`, load, update, failed };
}

function showExcluded(row, e) {
  const [who, address, state, why, ...rest] = row.cells;
  fill(who, e.container);
  fill(address, NONE);
  fill(state, h("span", { class: "badge bad" }, "excluded"));
  fill(why, e.reason);
  for (const cell of rest) fill(cell, "");
}

/** Why a backend is in the state it is, as far as the API says. */
function reasons(b, drained) {
  const lines = [];
  if (b.reason) lines.push(b.reason);
  else if (b.state === "draining") {
    lines.push(drained ? "drained through the API: no new requests" : "draining");
  } else if (b.state === "stopping") {
    lines.push("its container is stopping: it finishes the requests it has");
  } else if (b.state === "paused") lines.push("its container is paused");
  else if (b.state === "unhealthy") lines.push("Docker's health check says unhealthy");
  else if (b.state === "starting") lines.push("Docker's health check has not passed yet");
  if (b.health) {
    lines.push(`check: ${b.health.state}${b.health.last ? ` (${b.health.last})` : ""}`);
  }
  if (b.state === "up" && b.in_nginx === false) lines.push("not in every nginx's config yet");
  return lines.length ? lines : [NONE];
}

/** An event about this service, or one about every service (a refused config, a failure). */
function concerns(event, name) {
  const details = event.details || {};
  if (details.service === name) return true;
  if (event.kind === "refused" || event.kind === "failure") return true;
  return (details.changes || []).some(
    (change) => change.startsWith(`service ${name}:`) || change.startsWith(`service ${name} `),
  );
}

function resultText(applied, what) {
  if (applied.errors.length) return `${what}, saved; but ${applied.errors.join("; ")}`;
  const reloaded = applied.reloaded.length ? `, nginx ${applied.reloaded.join(", ")} took it` : "";
  return applied.done
    ? `${what} (version ${applied.version}${reloaded})`
    : `${what}, saved (version ${applied.version}); nginx has not finished yet`;
}

/**
 * Run one change: the button is busy meanwhile (it keeps the focus), the API's own message
 * goes beside the field it names, a 401 to the token field too. Returns the reply, or null.
 * `fields` maps the API's field name ("" for a message naming none) to [control, message].
 */
async function act(app, button, call, fields) {
  if (button.getAttribute("aria-busy") === "true") return null;
  for (const [control, message] of Object.values(fields)) {
    control.removeAttribute("aria-invalid");
    setText(message, "");
  }
  button.setAttribute("aria-busy", "true");
  try {
    const reply = await call();
    app.refresh();
    return reply;
  } catch (error) {
    if (!(error instanceof ApiFailure)) throw error;
    if (error.status === 401) {
      app.tokenError(error.message);
      setText(fields[""][1], "this change needs the API token: enter it above");
      return null;
    }
    const [control, message] = fields[error.field] || fields[""];
    control.setAttribute("aria-invalid", "true");
    setText(message, error.message);
    return null;
  } finally {
    button.removeAttribute("aria-busy");
  }
}

/** The balancing method form: filled from the service until the operator edits it. */
function methodForm(name, app) {
  const select = h(
    "select",
    { id: "method", name: "method", "aria-describedby": "method-error" },
    METHODS.map((m) => h("option", { value: m }, m)),
  );
  const key = h("input", {
    id: "key",
    name: "key",
    type: "text",
    spellcheck: "false",
    autocomplete: "off",
    placeholder: "$request_uri",
    "aria-describedby": "key-hint key-error",
  });
  const consistent = h("input", { id: "consistent", name: "consistent", type: "checkbox" });
  const two = h("input", { id: "two", name: "two", type: "checkbox" });
  const error = (field) => h("span", { id: `${field}-error`, class: "field-error", role: "alert" });
  const errors = {
    method: error("method"),
    key: error("key"),
    consistent: error("consistent"),
    two: error("two"),
    form: error("method-form"),
  };
  const apply = h("button", { type: "submit" }, "Apply method");
  const reset = h("button", { type: "button" }, "Back to the labels");
  const result = h("span", { class: "result", role: "status" });
  const hashOnly = [
    h(
      "div",
      { class: "field" },
      h("label", { for: "key" }, "Hash key"),
      key,
      h(
        "span",
        { id: "key-hint", class: "hint" },
        "nginx variables and A-Z a-z 0-9 _ . : / , = -",
      ),
      errors.key,
    ),
    h(
      "div",
      { class: "field check" },
      consistent,
      h("label", { for: "consistent" }, "Consistent hashing (ketama)"),
      errors.consistent,
    ),
  ];
  const randomOnly = [
    h(
      "div",
      { class: "field check" },
      two,
      h("label", { for: "two" }, "Pick two, send to the less loaded"),
      errors.two,
    ),
  ];
  const el = h(
    "form",
    { class: "method-form", "aria-labelledby": "method-title", novalidate: true },
    h("h2", { id: "method-title" }, "Balancing method"),
    h(
      "div",
      { class: "field" },
      h("label", { for: "method" }, "Method"),
      select,
      errors.method,
    ),
    hashOnly,
    randomOnly,
    h("div", { class: "actions" }, apply, reset, result, errors.form),
  );
  let edited = false;
  const showOptions = () => {
    for (const part of hashOnly) part.hidden = select.value !== "hash";
    for (const part of randomOnly) part.hidden = select.value !== "random";
  };
  el.addEventListener("input", () => {
    edited = true;
    showOptions();
  });
  el.addEventListener("change", showOptions);
  const fields = {
    method: [select, errors.method],
    key: [key, errors.key],
    consistent: [consistent, errors.consistent],
    two: [two, errors.two],
    "": [select, errors.form],
  };
  el.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { method: select.value };
    if (select.value === "hash") {
      body.key = key.value;
      body.consistent = consistent.checked;
    }
    if (select.value === "random") body.two = two.checked;
    const done = await act(app, apply, () => put(`${servicePath(name)}/algorithm?wait=true`, body), fields);
    if (done) {
      edited = false;
      setText(result, resultText(done.applied, `method ${methodText(done.algorithm)}`));
    }
  });
  reset.addEventListener("click", async () => {
    const done = await act(app, reset, () => del(`${servicePath(name)}/algorithm?wait=true`), fields);
    if (done) {
      edited = false;
      setText(result, resultText(done.applied, `method from the ${done.algorithm_source}`));
    }
  });

  function show(service) {
    if (edited) return;
    const algorithm = service.algorithm;
    select.value = algorithm.method;
    key.value = algorithm.key || "";
    consistent.checked = Boolean(algorithm.consistent);
    two.checked = Boolean(algorithm.two);
    showOptions();
  }

  return { el, show };
}
