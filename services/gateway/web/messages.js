// Draws a conversation: questions as plain text, answers as Markdown with their [n] markers linked to
// the sources list under them, each source's passage opening on click. Everything from the server
// goes in as text (markdown.js builds the answer the same way).

import { renderMarkdown, safeHref } from "./markdown.js";

const STATE_NOTES = {
  stopped: "Stopped.",
  length: "Stopped at the max tokens limit.",
  empty: "The model returned an empty answer: nothing to show. Try again, or rephrase the question.",
};

export class MessageView {
  /**
   * @param {HTMLElement} log the conversation's element
   * @param {{regenerate: () => void, edit: (text: string) => void, redraw: () => void}} actions
   */
  constructor(log, actions) {
    this.log = log;
    this.actions = actions;
    this.articles = new WeakMap();
    this.shown = null; // the conversation on screen
  }

  /** The whole conversation; the last question and answer get Edit and Regenerate when nothing streams. */
  show(conversation, busy) {
    const messages = conversation?.messages || [];
    const lastUser = messages.findLastIndex((message) => message.role === "user");
    const articles = messages.map((message, index) => {
      // The same element for the same message, so an opened source stays open across redraws.
      const article = this.articles.get(message) || element("article", `message ${message.role}`);
      this.articles.set(message, article);
      this.#fill(article, message, {
        editable: !busy && index === lastUser,
        regenerable: !busy && index === messages.length - 1 && message.role === "assistant",
      });
      return article;
    });
    const follow = this.#nearEnd();
    this.log.replaceChildren(...articles);
    if (!messages.length) this.log.append(emptyHint());
    // Another conversation opens at its end; the same one stays where the reader scrolled it.
    if (conversation !== this.shown || follow) this.#scrollToEnd();
    this.shown = conversation;
  }

  /** Redraws one message in place: called for every streamed chunk. */
  update(message) {
    const article = this.articles.get(message);
    if (!article) return;
    const follow = this.#nearEnd();
    this.#fill(article, message, {});
    if (follow) this.#scrollToEnd();
  }

  #scrollToEnd() {
    this.log.scrollTop = this.log.scrollHeight;
  }

  #nearEnd() {
    return this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 80;
  }

  #fill(article, message, { editable, regenerable }) {
    const streaming = message.state === "streaming";
    const opened = [...article.querySelectorAll("details[open]")].map((details) => details.dataset.index);
    article.setAttribute("aria-busy", String(streaming));
    article.dataset.state = message.state || "";
    const role = element("h2", "message-role");
    role.textContent = message.role === "user" ? "You" : "nightcap";
    const children = [role, message.role === "user" ? questionBody(message) : answerBody(message, article)];
    const note = stateNote(message);
    if (note) children.push(note);
    if (message.sources?.length) children.push(sourcesSection(message));
    const actions = element("div", "message-actions");
    if (editable) actions.append(button("Edit", "Edit your last question", () => this.#edit(article, message)));
    if (regenerable) actions.append(button("Regenerate", "Regenerate the last answer", this.actions.regenerate));
    if (actions.childElementCount) children.push(actions);
    article.replaceChildren(...children);
    for (const index of opened) article.querySelector(`details[data-index="${index}"]`)?.setAttribute("open", "");
  }

  #edit(article, message) {
    const form = element("form", "edit-form");
    const label = element("label", "visually-hidden");
    label.textContent = "Edit your question";
    const field = element("textarea", "edit-field");
    field.id = "edit-question";
    label.htmlFor = field.id;
    field.value = message.content;
    field.rows = Math.min(8, message.content.split("\n").length + 1);
    const save = element("button", "primary");
    save.type = "submit";
    save.textContent = "Send edited question";
    const cancel = button("Cancel", "Cancel editing", () => this.actions.redraw());
    form.append(label, field, save, cancel);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (field.value.trim()) this.actions.edit(field.value);
    });
    field.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
      if (event.key === "Escape") cancel.click();
    });
    article.querySelector(".message-body").replaceWith(form);
    article.querySelector(".message-actions")?.remove();
    field.focus();
  }
}

function questionBody(message) {
  const body = element("div", "message-body");
  body.textContent = message.content;
  return body;
}

function answerBody(message, article) {
  const body = element("div", "message-body");
  if (message.content) {
    body.append(renderMarkdown(message.content, { citation: (n) => citationButton(message, n, article) }));
  } else if (message.state === "streaming") {
    const waiting = element("p", "waiting");
    waiting.textContent = "Waiting for the first token…";
    body.append(waiting);
  }
  return body;
}

function citationButton(message, number, article) {
  const source = message.sources?.find((candidate) => candidate.index === number);
  if (!source) return null;
  const label = `Source ${number}: ${source.page ? pageOf(source) : source.title || source.id}`;
  const cite = button(`[${number}]`, label, () => openSource(article, number));
  cite.className = "cite";
  return cite;
}

function openSource(article, number) {
  const details = article.querySelector(`details[data-index="${number}"]`);
  if (!details) return;
  details.open = true;
  details.querySelector("summary").focus();
  details.scrollIntoView({ block: "nearest" });
}

function stateNote(message) {
  const failed = message.state === "error";
  const text = failed ? message.error : STATE_NOTES[message.state];
  const build = !failed && message.indexBuild ? message.indexBuild.notice : "";
  // The orchestrator may tell the build in its notice too: say it once.
  const repeated = build && message.notice?.includes(buildProgress(message.indexBuild));
  const notice = message.notice && !failed && !repeated ? message.notice : "";
  if (!text && !build && !notice) return null;
  const note = element("p", `message-state ${failed ? "error" : ""}`);
  note.setAttribute("role", failed ? "alert" : "status");
  note.textContent = [text, ...[build, notice].filter(Boolean).map(sentence)].filter(Boolean).join(" ");
  return note;
}

/** "4,000 of 10,033 documents", as the gateway's index_build.notice and the orchestrator word it. */
function buildProgress(build) {
  const count = (n) => Number(n ?? 0).toLocaleString("en-US");
  return `${count(build.documents_done)} of ${count(build.documents_total)} documents`;
}

/** A server's note ("the index is still building: ...") as a sentence beside the page's own. */
function sentence(text) {
  const capital = text.charAt(0).toUpperCase() + text.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

function sourcesSection(message) {
  const section = element("section", "sources");
  const heading = element("h3", "sources-heading");
  heading.textContent = message.sources.length === 1 ? "1 source" : `${message.sources.length} sources`;
  section.setAttribute("aria-label", "Sources");
  const list = element("ol", "source-list");
  for (const source of message.sources) {
    const cited = message.cited?.includes(source.index);
    const details = element("details", cited ? "source cited" : "source");
    details.dataset.index = String(source.index);
    const summary = element("summary");
    summary.append(
      span("source-index", `[${source.index}]`),
      span("source-title", source.title || source.id),
    );
    if (source.page) summary.append(span("source-page", pageOf(source)));
    summary.append(span("source-score", `score ${Number(source.score ?? 0).toFixed(2)}`));
    if (cited) summary.append(span("source-cited", "cited"));
    if (source.snippet) summary.append(span("source-snippet", source.snippet));
    const passage = element("p", "source-passage");
    passage.textContent = source.text || source.snippet || "";
    details.append(summary, passage);
    const href = safeHref(source.url || "");
    if (href) {
      const link = element("a", "source-link");
      link.href = href;
      link.rel = "noopener noreferrer";
      link.target = "_blank";
      link.textContent = href;
      details.append(link);
    }
    const item = element("li");
    item.append(details);
    list.append(item);
  }
  section.append(heading, list);
  return section;
}

/** "report.pdf, p. 3": the file a PDF passage came from (its path's last part) and its page. */
function pageOf(source) {
  const file = (source.url || "").split(/[\\/]/).pop() || source.title || source.id;
  return `${file}, p. ${source.page}`;
}

function emptyHint() {
  const hint = element("p", "empty-hint");
  hint.textContent = "Ask anything. Answers can cite the passages they used: open a source to read it.";
  return hint;
}

export function button(text, label, onClick) {
  const node = element("button");
  node.type = "button";
  node.textContent = text;
  if (label && label !== text) node.setAttribute("aria-label", label);
  node.addEventListener("click", onClick);
  return node;
}

function span(className, text) {
  const node = element("span", className);
  node.textContent = text;
  return node;
}

function element(name, className = "") {
  const node = document.createElement(name);
  if (className) node.className = className;
  return node;
}
