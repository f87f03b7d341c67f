// Talking to the API (same origin). The token is kept in this tab's sessionStorage and sent
// as an Authorization header on changes only: the API takes no cookie, so another site
// cannot make the browser send a change (no CSRF), and closing the tab forgets the token.

const TOKEN_KEY = "controlplane.token";
export const API = "/api/v1";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** An error reply of the API: {error: {code, message, details}}, with its status. */
export class ApiFailure extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details || {};
  }

  /** The field or query parameter the API named as wrong, if any. */
  get field() {
    return this.details.field || this.details.parameter || null;
  }
}

async function send(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    if (token()) headers.Authorization = `Bearer ${token()}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (error) {
    throw new ApiFailure(0, "unreachable", `the controller does not answer (${error.message})`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // an empty or non-JSON reply: the status says enough
  }
  if (!response.ok) {
    const found = data && data.error ? data.error : {};
    throw new ApiFailure(
      response.status,
      found.code || `http_${response.status}`,
      found.message || `the controller answered ${response.status} ${response.statusText}`,
      found.details,
    );
  }
  return data;
}

export const get = (path) => send("GET", path);
export const put = (path, body) => send("PUT", path, body);
export const patch = (path, body) => send("PATCH", path, body);
export const del = (path) => send("DELETE", path);

export const servicePath = (name) => `${API}/services/${encodeURIComponent(name)}`;
