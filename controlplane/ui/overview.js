// The overview: every service with its method and figures, every managed nginx with what it
// runs and the last error it gave, what is left out, and the recent events.

import { API, get } from "./api.js";
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
  syncRows,
  timeEl,
} from "./dom.js";
import { eventRows, nginxWord, table } from "./parts.js";

export function overview() {
  const services = table("services-title", [
    "Service",
    "Method",
    "Method from",
    "Serving / backends",
    "Requests",
    "Errors (1 min)",
    "p95",
    "nginx",
  ]);
  const nginx = table("nginx-title", [
    "nginx",
    "Data plane",
    "Config version",
    "Last reload or push",
    "Reloads / pushes / failures",
    "Last error (nginx -t)",
  ]);
  const excluded = table("excluded-title", ["Container", "Service", "Reason"]);
  const warnings = table("warnings-title", ["Service", "Warning"]);
  const events = table("events-title", ["Time", "Kind", "What happened"]);
  const root = h(
    "section",
    { class: "view", "aria-labelledby": "view-title" },
    h("h1", { id: "view-title", tabindex: "-1" }, "Overview"),
    h("section", {}, h("h2", { id: "services-title" }, "Services"), services.el),
    h("section", {}, h("h2", { id: "nginx-title" }, "Managed nginx"), nginx.el),
    h(
      "section",
      {},
      h("h2", { id: "excluded-title" }, "Left out"),
      excluded.el,
      h("h2", { id: "warnings-title" }, "Warnings"),
      warnings.el,
    ),
    h("section", {}, h("h2", { id: "events-title" }, "Recent events"), events.el),
  );

  async function load() {
    const [list, managed, problems, recent] = await Promise.all([
      get(`${API}/services`),
      get(`${API}/nginx`),
      get(`${API}/problems`),
      get(`${API}/events?limit=15`),
    ]);
    return { list, managed, problems, recent };
  }

  function update({ list, managed, problems, recent }) {
    syncRows(
      services.body,
      list.services,
      (s) => s.name,
      () => services.row(),
      (row, s) => {
        const [name, method, source, serving, rps, errors, p95, where] = row.cells;
        fill(name, h("a", { href: `#/service/${encodeURIComponent(s.name)}` }, s.name));
        fill(method, h("code", {}, methodText(s.algorithm)));
        fill(source, s.algorithm_source);
        const up = s.backends.filter((b) => b.state === "up").length;
        fill(
          serving,
          `${up} / ${s.backends.length}`,
          s.excluded.length ? h("span", { class: "hint" }, ` (${s.excluded.length} left out)`) : null,
        );
        fill(rps, estimate(rate(s.traffic), sampling(s)));
        fill(errors, errorRate(s.traffic));
        fill(p95, ms(s.traffic ? s.traffic.p95_ms : null));
        fill(where, nginxWord(s.nginx));
      },
      "No service: no running container has a network alias or a controlplane.service label.",
    );
    syncRows(
      nginx.body,
      managed.nginx,
      (n) => n.container,
      () => nginx.row(),
      (row, n) => {
        const [name, mode, version, last, counts, error] = row.cells;
        fill(name, n.name);
        fill(
          mode,
          n.dataplane || "not known yet",
          n.dataplane_reason ? h("div", { class: "hint" }, n.dataplane_reason) : null,
          n.stats_sample > 1
            ? h(
                "div",
                { class: "hint" },
                `traffic: 1 in ${n.stats_sample} ordinary answers reported, each counted ${n.stats_sample} times`,
              )
            : null,
        );
        fill(
          version,
          n.version === null ? NONE : String(n.version),
          " ",
          h(
            "span",
            { class: `badge ${n.current ? "ok" : "warn"}` },
            n.current ? "current" : "behind",
          ),
        );
        fill(
          last,
          n.last_reload ? h("div", {}, "reload ", timeEl(n.last_reload)) : null,
          n.last_push ? h("div", {}, "push ", timeEl(n.last_push)) : null,
          n.last_reload || n.last_push ? null : NONE,
        );
        fill(counts, `${n.reloads} / ${n.pushes} / ${n.failures}`);
        const failure = n.failure;
        fill(
          error,
          failure
            ? h(
                "div",
                {},
                h(
                  "span",
                  { class: "badge bad" },
                  `version ${failure.version} ${failure.refused ? "refused" : "not delivered"}`,
                ),
                ` after ${failure.attempts} attempt${failure.attempts === 1 ? "" : "s"}`,
                h("pre", { class: "error-text" }, failure.error),
              )
            : n.last_error
              ? h("pre", { class: "error-text" }, n.last_error)
              : "none",
        );
      },
      "No managed nginx: start one with the label controlplane.role=nginx.",
    );
    const known = new Set(list.services.map((s) => s.name));
    syncRows(
      excluded.body,
      problems.excluded,
      (e) => `${e.container}\n${e.service}\n${e.reason}`,
      () => excluded.row(),
      (row, e) => {
        const [container, service, reason] = row.cells;
        fill(container, e.container);
        fill(
          service,
          known.has(e.service)
            ? h("a", { href: `#/service/${encodeURIComponent(e.service)}` }, e.service)
            : e.service || NONE,
        );
        fill(reason, e.reason);
      },
      "Nothing is left out.",
    );
    syncRows(
      warnings.body,
      problems.warnings,
      (w) => `${w.service}\n${w.warning}`,
      () => warnings.row(),
      (row, w) => {
        fill(row.cells[0], w.service || "(all)");
        fill(row.cells[1], w.warning);
      },
      "No warning.",
    );
    eventRows(events, recent.events);
  }

  return { root, title: "Overview", load, update };
}
