// Asking and answering: a question goes out with the conversation so far and the settings, the answer
// streams into its message chunk by chunk, and the stop button aborts the request (the gateway then
// cancels the generation). One answer streams at a time.

import { explain } from "./api.js";

export class Chat {
  /**
   * @param {object} parts
   * @param {import("./api.js").Api} parts.api
   * @param {import("./store.js").ConversationStore} parts.conversations
   * @param {import("./messages.js").MessageView} parts.view
   * @param {() => object} parts.options the model, the gateway's citations mode and the effective settings
   * @param {(busy: boolean) => void} parts.onBusy
   * @param {(error: Error) => void} parts.onError a request failed (the health banner and token bar listen)
   */
  constructor({ api, conversations, view, options, onBusy, onError }) {
    Object.assign(this, { api, conversations, view, options, onBusy, onError });
    this.controller = null;
    this.streaming = null; // the conversation the running answer belongs to
    this.frame = 0;
  }

  get busy() {
    return this.controller !== null;
  }

  send(text) {
    if (this.busy || !text.trim()) return false;
    const conversation = this.conversations.current() || this.conversations.create();
    conversation.messages.push({ role: "user", content: text });
    this.#answer(conversation);
    return true;
  }

  regenerate() {
    const conversation = this.conversations.current();
    if (this.busy || conversation?.messages.at(-1)?.role !== "assistant") return;
    conversation.messages.pop();
    this.#answer(conversation);
  }

  /** Replaces the last question (and drops its answer), then asks it again. */
  editLast(text) {
    const conversation = this.conversations.current();
    const last = conversation?.messages.findLastIndex((message) => message.role === "user") ?? -1;
    if (this.busy || last < 0 || !text.trim()) return;
    conversation.messages.splice(last);
    conversation.messages.push({ role: "user", content: text });
    this.#answer(conversation);
  }

  stop() {
    this.controller?.abort();
  }

  async #answer(conversation) {
    const options = this.options();
    const body = request(conversation.messages, options);
    const message = {
      role: "assistant",
      content: "",
      sources: [],
      cited: [],
      notice: "",
      indexBuild: null,
      state: "streaming",
    };
    conversation.messages.push(message);
    this.conversations.touch(conversation);
    const controller = new AbortController();
    this.controller = controller;
    this.streaming = conversation;
    this.onBusy(true);
    let finish = null;
    try {
      for await (const chunk of this.api.streamChat(body, controller.signal)) {
        finish = applyChunk(message, chunk) ?? finish;
        this.#draw(message);
      }
      if (options.citations === "markdown") message.content = withoutSourcesList(message.content);
      if (!message.content.trim()) message.state = "empty";
      else message.state = finish === "length" ? "length" : "done";
    } catch (error) {
      if (controller.signal.aborted) {
        message.state = "stopped";
      } else {
        message.state = "error";
        message.error = explain(error);
        this.onError(error);
      }
    } finally {
      cancelAnimationFrame(this.frame);
      this.frame = 0;
      this.controller = null;
      this.streaming = null;
      this.conversations.touch(conversation);
      this.onBusy(false);
    }
  }

  // Chunks arrive faster than frames: draw at most once a frame.
  #draw(message) {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.view.update(message);
    });
  }
}

/** The chat completion request for a conversation whose last message is the question. */
function request(messages, options) {
  const history = [];
  if (options.system_prompt?.trim()) history.push({ role: "system", content: options.system_prompt });
  messages.forEach((message, index) => {
    if (message.role === "user") {
      const turn = { role: "user", content: message.content };
      // The passages that came with this turn's answer go back beside it, as they came.
      const sources = messages[index + 1]?.sources;
      if (sources?.length) turn.sources = sources.map(({ id, title, text, url }) => ({ id, title, text, url }));
      history.push(turn);
    } else if (message.content) {
      history.push({ role: "assistant", content: message.content });
    }
  });
  return {
    model: options.model || undefined,
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
    temperature: options.temperature,
    top_p: options.top_p,
    top_k: options.top_k,
    max_tokens: options.max_tokens,
    seed: options.seed ?? undefined,
    retrieval: options.retrieval,
    retrieval_k: options.retrieval_k,
  };
}

// A gateway run with --citations markdown appends "Sources:" and a line per source to the answer; the page
// lists the sources itself, so it drops that tail rather than show (and send back) the list twice.
const APPENDED_SOURCES = /\n\nSources:\n(?:\[\d+\] .*(?:\n|$))+$/;

function withoutSourcesList(content) {
  return content.replace(APPENDED_SOURCES, "");
}

/** Folds one chat.completion.chunk into the message; returns its finish_reason, if it has one. */
function applyChunk(message, chunk) {
  const extra = chunk.nightcap;
  if (extra?.sources) message.sources = extra.sources;
  if (extra?.cited) message.cited = extra.cited;
  if (extra?.index_build) message.indexBuild = extra.index_build;
  if (extra?.notice) message.notice = extra.notice;
  if (chunk.usage) message.usage = chunk.usage;
  const choice = chunk.choices?.[0];
  if (choice?.delta?.content) message.content += choice.delta.content;
  return choice?.finish_reason ?? null;
}
