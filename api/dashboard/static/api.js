// The one place that talks to the server: the public /v1 API with the signed-in key, exactly as any
// script would. Errors arrive in OpenAI's envelope and are thrown as ApiError (message, param, code).

const KEY = "ftjobs.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    const error = body?.error ?? {};
    super(error.message ?? `The server answered HTTP ${status}.`);
    this.status = status;
    this.param = error.param ?? null;
    this.code = error.code ?? null;
  }
}

// sessionStorage: the key lasts as long as the tab and is never written to disk by the page.
export const session = {
  key: () => sessionStorage.getItem(KEY),
  signIn: (key) => sessionStorage.setItem(KEY, key),
  signOut: () => sessionStorage.removeItem(KEY),
};

// `key`: a key being tried at sign-in, rather than the signed-in one a 401 signs out.
async function request(path, { method = "GET", json, form, signal, key } = {}) {
  const headers = { Authorization: `Bearer ${key ?? session.key()}` };
  let body = form;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const response = await fetch(`/v1${path}`, { method, headers, body, signal });
  if (!response.ok) {
    const error = new ApiError(response.status, await response.json().catch(() => null));
    if (response.status === 401 && !key) {
      session.signOut();
      location.hash = "#/signin";
    }
    throw error;
  }
  return response;
}

export const get = async (path, options) => (await request(path, options)).json();
export const post = async (path, json) => (await request(path, { method: "POST", json })).json();

export function query(params) {
  const search = new URLSearchParams(Object.entries(params).filter(([, v]) => v != null && v !== ""));
  return search.size ? `?${search}` : "";
}

/** Model ids may hold `/` (`org/name` bases): keep it, escape the rest. */
export const modelPath = (id) => `/models/${id.split("/").map(encodeURIComponent).join("/")}`;

export async function uploadFile(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file);
  return (await request("/files", { method: "POST", form })).json();
}

/** Fetch with the key (a plain link could not send it) and hand the bytes to the browser as a download. */
export async function download(path) {
  const response = await request(path);
  const disposition = response.headers.get("content-disposition") ?? "";
  const name = /filename="([^"]+)"/.exec(disposition)?.[1] ?? path.split("/").pop();
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: name });
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** POST /chat/completions with stream: true, yielding each chunk of OpenAI's server-sent events. */
export async function* streamChat(body, signal) {
  const response = await request("/chat/completions", {
    method: "POST",
    json: { ...body, stream: true },
    signal,
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(response.status, chunk); // after the status line, errors ride in the stream
      yield chunk;
    }
  }
}

/** The API's own OpenAPI schema: the create form builds its hyperparameter fields from it. */
export async function openapi() {
  const response = await fetch("/openapi.json");
  return response.json();
}
