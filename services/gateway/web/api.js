// The gateway's public HTTP API, and nothing else: JSON calls, the streamed chat answer read as
// server-sent events, and the one place an error becomes a sentence a person can act on.

// The gateway pings idle streams every few seconds, so this long a silence means the connection is gone.
const STREAM_IDLE_MS = 60_000;

export class ApiError extends Error {
  constructor(status, error = {}, retryAfter = null) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || "";
    this.code = error.code || null;
    this.param = error.param || null;
    this.retryAfter = retryAfter;
  }
}

export class Api {
  /** @param {() => string} token the bearer token to send, "" for none */
  constructor(token) {
    this.token = token;
  }

  config() {
    return this.#json("GET", "/v1/nightcap/config");
  }

  /** The health body on 200 and 503 alike: {status, backends: {name: state}}. */
  async health() {
    const response = await fetch("/health", { cache: "no-store" });
    const body = await response.json().catch(() => null);
    if (!body || !body.backends) throw await errorOf(response);
    return body;
  }

  /** One page of the index's documents, in id order, starting after the id `after`. */
  listDocuments(after = "") {
    return this.#json("GET", `/v1/documents${after ? `?after=${encodeURIComponent(after)}` : ""}`);
  }

  /** Sends one file's bytes as base64, so a PDF or Word file arrives as it is on disk. */
  async addFile(file) {
    const content = await base64Of(file);
    return this.#json("POST", "/v1/documents", { files: [{ name: file.name, content, encoding: "base64" }] });
  }

  deleteDocument(id) {
    return this.#json("DELETE", `/v1/documents/${encodeURIComponent(id)}`);
  }

  /**
   * POSTs a streamed chat completion and yields each chunk's parsed JSON until `data: [DONE]`.
   * An error chunk sent after the stream started is thrown as an ApiError; so is a stream that ends
   * without [DONE] (the connection was cut).
   */
  async *streamChat(body, signal) {
    const watchdog = new AbortController();
    const abort = () => watchdog.abort(signal.reason);
    signal.addEventListener("abort", abort, { once: true });
    let timer = 0;
    const restartTimer = () => {
      clearTimeout(timer);
      timer = setTimeout(() => watchdog.abort(new StreamIdle()), STREAM_IDLE_MS);
    };
    restartTimer();
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: this.#headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(body),
        signal: watchdog.signal,
      });
      if (!response.ok) throw await errorOf(response);
      for await (const data of serverSentData(response.body, restartTimer)) {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, chunk.error);
        yield chunk;
      }
      throw new ApiError(0, { message: "The connection closed before the answer was complete.", type: "stream_cut" });
    } catch (error) {
      if (watchdog.signal.aborted) throw watchdog.signal.reason;
      throw error;
    } finally {
      clearTimeout(timer);
      signal.removeEventListener("abort", abort);
    }
  }

  async #json(method, path, body) {
    const headers = this.#headers(body === undefined ? {} : { "Content-Type": "application/json" });
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  #headers(extra) {
    const token = this.token();
    return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
  }
}

export class StreamIdle extends Error {
  constructor() {
    super(`No word from the server for ${STREAM_IDLE_MS / 1000} s: the connection looks lost.`);
  }
}

async function errorOf(response) {
  const body = await response.json().catch(() => null);
  const retryAfter = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  return new ApiError(response.status, body?.error, Number.isFinite(retryAfter) ? retryAfter : null);
}

/**
 * The `data:` payloads of a text/event-stream body, one string per event. Comment lines (`: ping`)
 * are dropped; `onBytes` is called whenever anything arrives, pings included.
 */
export async function* serverSentData(body, onBytes = () => {}) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      onBytes();
      buffered += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffered.indexOf("\n\n")) !== -1) {
        const event = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        const data = dataOf(event);
        if (data !== null) yield data;
      }
    }
    const data = dataOf(buffered);
    if (data !== null) yield data;
  } finally {
    reader.releaseLock();
  }
}

function dataOf(event) {
  const lines = event
    .split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5));
  return lines.length ? lines.join("\n") : null;
}

/** What a person reads when a call failed: what happened and what to do about it. */
export function explain(error) {
  if (error instanceof StreamIdle) return error.message;
  if (error instanceof SyntaxError) return `The gateway sent a chunk that is not JSON (${error.message}).`;
  if (!(error instanceof ApiError)) return "The gateway cannot be reached. Is the stack running (make up)?";
  const message = error.message;
  switch (error.status) {
    case 401:
      return `A valid token is needed: ${message}`;
    case 403:
      return `This token's role may not do that: ${message}`;
    case 413:
      return `Too large for the gateway: ${message}`;
    case 429: {
      const wait = error.retryAfter ? ` in ${error.retryAfter} s` : " in a moment";
      return `The server is busy: try again${wait}. (${message})`;
    }
    case 503:
      return `A backend is down: ${message}`;
    case 504:
      return `The answer ran past its deadline: ${message}`;
    default:
      return message;
  }
}

/** A file's bytes as base64, read by the browser (a data: URL, less its header). */
function base64Of(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).slice(String(reader.result).indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
