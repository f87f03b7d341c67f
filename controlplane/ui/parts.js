// Pieces both views use: an accessible table, the nginx summary of a service, the events.

import { NONE, fill, h, syncRows, timeEl } from "./dom.js";

/**
 * A table labelled by the heading `labelId`, with column headers; `row()` makes an empty
 * row whose first cell is the row's header. Wrapped so a wide table scrolls by keyboard too.
 */
export function table(labelId, headers) {
  const body = h("tbody");
  const el = h(
    "div",
    { class: "table-wrap", role: "region", "aria-labelledby": labelId, tabindex: "0" },
    h(
      "table",
      { "aria-labelledby": labelId },
      h("thead", {}, h("tr", {}, headers.map((text) => h("th", { scope: "col" }, text)))),
      body,
    ),
  );
  const row = () =>
    h(
      "tr",
      {},
      headers.map((_, i) => (i === 0 ? h("th", { scope: "row" }) : h("td"))),
    );
  return { el, body, row };
}

/** Whether each managed nginx sends the service's requests where the controller wants. */
export function nginxWord(list) {
  if (!list.length) return h("span", { class: "hint" }, "no managed nginx");
  const refused = list.filter((n) => n.failure);
  const behind = list.filter((n) => n.in_sync === false);
  const unknown = list.filter((n) => n.in_sync === null);
  if (refused.length) {
    return h("span", { class: "badge bad" }, `refused by ${refused.map((n) => n.name).join(", ")}`);
  }
  if (behind.length) {
    return h("span", { class: "badge warn" }, `behind: ${behind.map((n) => n.name).join(", ")}`);
  }
  if (unknown.length) return h("span", { class: "badge" }, "not known yet");
  return h("span", { class: "badge ok" }, "in sync");
}

export function eventRows(events, list) {
  syncRows(
    events.body,
    list,
    (e) => `${e.time}\n${e.kind}\n${e.summary}`,
    () => events.row(),
    (row, e) => {
      const [time, kind, summary] = row.cells;
      fill(time, timeEl(e.time));
      fill(kind, h("span", { class: `badge kind-${e.kind}` }, e.kind));
      fill(summary, e.summary || NONE);
    },
    "No event yet.",
  );
}
