// The console's API client. The key, when the service needs one, is asked for once, kept in this
// tab's session storage and sent as a Bearer token (never in a URL). Errors carry the service's
// JSON error body. Event streams and images are fetched (EventSource and <img src> cannot send a
// header), so everything works the same with access control on.

const KEY = "vitforge.key";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

let asking = null;

/** Asks for the key (once, however many requests were refused at the same time). */
function askKey(reason) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  document.getElementById("key-reason").textContent = reason;
  asking = new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const key = document.getElementById("key-input").value.trim();
        if (key) sessionStorage.setItem(KEY, key);
        asking = null;
        resolve();
      },
      { once: true },
    );
  });
  dialog.showModal();
  return asking;
}

async function errorOf(resp) {
  const body = await resp.json().catch(() => null);
  return new ApiError(resp.status, body?.error?.code ?? "http_" + resp.status, body?.error?.message ?? resp.statusText);
}

/** A request with the key; asks for a key on 401 and tries again. Returns the Response. */
export async function send(method, path, body, headers = {}) {
  for (let attempt = 0; ; attempt++) {
    const init = { method, headers: authHeaders(headers) };
    if (body !== undefined) {
      if (body instanceof FormData || body instanceof Blob) {
        init.body = body;
      } else {
        init.body = JSON.stringify(body);
        init.headers["content-type"] = "application/json";
      }
    }
    const resp = await fetch(path, init);
    if (resp.status === 401 && attempt < 3) {
      const e = await errorOf(resp);
      await askKey(e.code === "invalid_api_key" ? "That key was not accepted; try another." : e.message);
      continue;
    }
    if (!resp.ok) throw await errorOf(resp);
    return resp;
  }
}

export async function get(path) {
  return (await send("GET", path)).json();
}

/** A list's first `limit` items, newest first, and whether more follow (the service's Link header). */
export async function getFirst(path, limit) {
  const resp = await send("GET", `${path}${path.includes("?") ? "&" : "?"}limit=${limit}`);
  return { items: await resp.json(), more: resp.headers.has("link") };
}

export async function post(path, body) {
  const resp = await send("POST", path, body);
  return resp.status === 204 ? null : resp.json();
}

/**
 * POSTs JSON to long work that reports its progress as events when asked (`Accept`): each
 * `progress` event's data goes to `onProgress`. Resolves with the data of the last event, the
 * outcome; rejects with an `error` event's error.
 */
export async function postWatching(path, body, onProgress) {
  const resp = await send("POST", path, body, { Accept: "text/event-stream" });
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let last = null;
  try {
    for await (const e of parse(reader)) {
      if (e.event !== "progress") {
        last = e;
        break;
      }
      onProgress(e.data);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  return outcomeOf(last);
}

/** The data of an event stream's outcome (its last event); an `error` event's error is thrown. */
function outcomeOf(last) {
  if (last?.event === "error") throw new ApiError(last.data.status, last.data.error?.code, last.data.error?.message);
  if (!last) throw new ApiError(0, "network", "the service's answer ended before its outcome");
  return last.data;
}

export async function del(path) {
  await send("DELETE", path);
}

/** An object URL for a binary resource (a thumbnail, a download). */
export async function objectUrl(path) {
  return URL.createObjectURL(await (await send("GET", path)).blob());
}

/**
 * Uploads a form with progress (fetch cannot report upload progress): `onProgress` gets the share
 * sent. The service's progress while it checks the upload comes as events on the same answer
 * (asked for by `Accept`), each passed to `onStage`. Resolves with the JSON (the dataset).
 */
export function upload(path, form, onProgress, onStage = () => {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.setRequestHeader("Accept", "text/event-stream");
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new ApiError(0, "network", "the upload did not reach the service"));
    // A refusal before the check (a missing file, a key) is a plain JSON answer, not a stream.
    const streamed = () => (xhr.getResponseHeader("Content-Type") ?? "").startsWith("text/event-stream");
    let read = 0; // characters of the stream already parsed
    let outcome = null; // the last event: `dataset` or `error`
    const readEvents = () => {
      if (!streamed()) return;
      const { events, rest } = splitEvents(xhr.responseText.slice(read));
      read = xhr.responseText.length - rest.length;
      for (const e of events) {
        if (e.event === "progress") onStage(e.data);
        else outcome = e;
      }
    };
    xhr.onprogress = readEvents;
    xhr.onload = async () => {
      if (streamed()) {
        readEvents();
        try {
          resolve(outcomeOf(outcome));
        } catch (e) {
          reject(e);
        }
        return;
      }
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        /* not JSON */
      }
      if (xhr.status === 401) {
        await askKey(body?.error?.message ?? "This service needs an API key.");
        upload(path, form, onProgress, onStage).then(resolve, reject);
      } else if (xhr.status >= 200 && xhr.status < 300) {
        resolve(body);
      } else {
        reject(new ApiError(xhr.status, body?.error?.code ?? "http_" + xhr.status, body?.error?.message ?? xhr.statusText));
      }
    };
    xhr.send(form);
  });
}

/** Server-Sent Events read with fetch: yields {event, data} until the stream ends. */
export async function* events(path) {
  const resp = await send("GET", path);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  // However the caller stops reading (a break, an exception), the connection is closed.
  try {
    yield* parse(reader);
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** The events of an SSE stream's reader. */
async function* parse(reader) {
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const { events, rest } = splitEvents(buffer + value);
    buffer = rest;
    yield* events;
  }
}

/** The whole events ({event, data}) at the start of SSE text, and the unfinished rest. */
function splitEvents(text) {
  const events = [];
  let end;
  while ((end = text.indexOf("\n\n")) >= 0) {
    const block = text.slice(0, end);
    text = text.slice(end + 2);
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trim());
    }
    if (data.length) events.push({ event, data: JSON.parse(data.join("\n")) });
  }
  return { events, rest: text };
}
