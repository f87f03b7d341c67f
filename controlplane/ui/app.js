// The dashboard's entry: hash routes (#/ and #/service/NAME, so the page works from / and
// /ui/ alike), the token field, and the poll that keeps the open view live.
//
// A view is {root, title, load(), update(data), failed(error)?}: load asks the API, update
// brings the page up to date in place (so a focused control or a value being typed survives),
// failed(error) returns true when the view shows that error itself.

import { ApiFailure, setToken, token } from "./api.js";
import { h, setText } from "./dom.js";
import { overview } from "./overview.js";
import { servicePage } from "./service.js";

/** Every 500 ms: a change shows within a second; a hidden tab asks every 5 s. */
const PERIOD_MS = 500;
const HIDDEN_PERIOD_MS = 5000;

class Dashboard {
  constructor() {
    this.main = document.getElementById("main");
    this.live = document.getElementById("live");
    this.view = null;
    this.timer = null;
    this.busy = false;
    this.again = false;
    this.tokenField();
    window.addEventListener("hashchange", () => this.route(true));
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) this.refresh();
    });
    this.route(false);
  }

  route(moved) {
    const hash = location.hash || "#/";
    const found = /^#\/service\/([^/]+)$/.exec(hash);
    let view;
    if (found) {
      let name = null;
      try {
        name = decodeURIComponent(found[1]);
      } catch {
        // a malformed escape: not a service name
      }
      view = name === null ? notFound(hash) : servicePage(name, this);
    } else {
      view = hash === "#/" || hash === "#" ? overview(this) : notFound(hash);
    }
    this.view = view;
    this.main.replaceChildren(view.root);
    document.title = `${view.title} \u00b7 controlplane`;
    if (moved) view.root.querySelector("h1")?.focus();
    this.refresh();
  }

  /** Load and show the open view now; then again after the period. One request at a time. */
  async refresh() {
    if (this.busy) {
      this.again = true;
      return;
    }
    clearTimeout(this.timer);
    this.busy = true;
    const view = this.view;
    try {
      const data = await view.load();
      if (view === this.view) {
        view.update(data);
        this.status("live", false);
      }
    } catch (error) {
      if (view === this.view) this.failed(view, error);
    } finally {
      this.busy = false;
      if (this.again) {
        this.again = false;
        this.refresh();
      } else {
        const period = document.hidden ? HIDDEN_PERIOD_MS : PERIOD_MS;
        this.timer = setTimeout(() => this.refresh(), period);
      }
    }
  }

  failed(view, error) {
    if (!(error instanceof ApiFailure)) {
      this.status(`the page failed: ${error.message}`, true);
      throw error;
    }
    if (error.status === 0) {
      this.status(`${error.message}; retrying`, true);
      return;
    }
    // a view that shows the error itself (an unknown service) is still a live page
    if (view.failed?.(error)) this.status("live", false);
    else this.status(error.message, true);
  }

  status(text, bad) {
    setText(this.live, text);
    this.live.classList.toggle("bad", bad);
  }

  /** The token for changes: entered once, kept in this tab's sessionStorage. */
  tokenField() {
    const form = document.getElementById("token-form");
    const input = document.getElementById("token");
    const state = document.getElementById("token-state");
    this.tokenError = (message) => {
      setText(document.getElementById("token-error"), message);
      input.setAttribute("aria-invalid", "true");
      input.focus();
    };
    const show = () => {
      setText(
        state,
        token()
          ? "a token is set for this tab"
          : "no token: changes work only if the controller has none",
      );
    };
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      setToken(input.value.trim());
      input.value = "";
      input.removeAttribute("aria-invalid");
      setText(document.getElementById("token-error"), "");
      show();
    });
    document.getElementById("token-forget").addEventListener("click", () => {
      setToken("");
      show();
    });
    show();
  }
}

function notFound(hash) {
  const root = h(
    "section",
    { class: "view", "aria-labelledby": "view-title" },
    h("h1", { id: "view-title", tabindex: "-1" }, "Not found"),
    h("p", {}, "The dashboard has no page ", h("code", {}, hash), ". ", h("a", { href: "#/" }, "Overview")),
  );
  return { root, title: "Not found", load: async () => null, update() {} };
}

new Dashboard();
