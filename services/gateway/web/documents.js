// Your documents: drop or pick .txt / .md / .pdf / .docx / .html / .jsonl files and watch them indexed one at
// a time ("2 of 3 indexed"), list what the index holds, delete a document. The endpoints need the admin token; a
// refusal shows as the gateway's own message.

import { explain } from "./api.js";
import { confirmingButton } from "./conversations.js";

// What the gateway reads (clients/documents.py); it says why when a file of these cannot be read.
const ACCEPTED = /\.(txt|text|md|markdown|pdf|docx|html?|jsonl|parquet)$/i;

export class DocumentsPanel {
  /**
   * @param {HTMLElement} root the panel
   * @param {import("./api.js").Api} api
   * @param {(error: Error) => void} onError a request failed (the token bar listens for 401)
   */
  constructor(root, api, onError) {
    this.api = api;
    this.onError = onError;
    this.picker = root.querySelector("#document-files");
    this.dropZone = root.querySelector("#drop-zone");
    this.progress = root.querySelector("#upload-progress");
    this.bar = root.querySelector("#upload-bar");
    this.progressText = root.querySelector("#upload-text");
    this.problems = root.querySelector("#upload-errors");
    this.message = root.querySelector("#documents-message");
    this.stats = root.querySelector("#documents-stats");
    this.list = root.querySelector("#document-list");
    this.more = root.querySelector("#documents-more");
    this.more.addEventListener("click", () => this.#showMore());
    this.listing = 0;
    this.picker.addEventListener("change", () => {
      this.add([...this.picker.files]);
      this.picker.value = "";
    });
    this.dropZone.addEventListener("dragover", (event) => {
      event.preventDefault();
      this.dropZone.classList.add("dragging");
    });
    this.dropZone.addEventListener("dragleave", () => this.dropZone.classList.remove("dragging"));
    this.dropZone.addEventListener("drop", (event) => {
      event.preventDefault();
      this.dropZone.classList.remove("dragging");
      this.add([...event.dataTransfer.files]);
    });
  }

  async refresh() {
    this.listing += 1;
    this.list.replaceChildren();
    this.#say("");
    await this.#showMore();
  }

  // The gateway lists a page at a time (after the last id shown); "Show more" asks for the next.
  async #showMore() {
    const listing = this.listing;
    const shown = this.list.lastElementChild?.dataset.id || "";
    try {
      const { data, stats, has_more: more } = await this.api.listDocuments(shown);
      if (listing !== this.listing) return; // a newer refresh started meanwhile: its answer wins
      this.list.append(...data.map((entry) => this.#item(entry)));
      const held = `${count(stats.documents, "document")}, ${count(stats.passages, "passage")}`;
      this.stats.textContent = `${held} in the index.`;
      this.more.hidden = !more;
      this.more.textContent = `Show more (${this.list.childElementCount} of ${stats.documents} shown)`;
    } catch (error) {
      this.#fail(error);
      this.stats.textContent = "";
      this.more.hidden = true;
    }
  }

  /** Sends the files one request each, so progress is real and one bad file does not stop the rest. */
  async add(files) {
    if (!files.length) return;
    this.problems.replaceChildren();
    this.progress.hidden = false;
    this.bar.max = files.length;
    let indexed = 0;
    for (const [done, file] of files.entries()) {
      this.bar.value = done;
      this.progressText.textContent = `Indexing ${file.name} (${done + 1} of ${files.length})…`;
      if (!ACCEPTED.test(file.name)) {
        this.#problem(`${file.name}: only .txt, .md, .pdf, .docx, .html, .jsonl and .parquet files can be added.`);
        continue;
      }
      try {
        await this.api.addFile(file);
        indexed += 1;
      } catch (error) {
        this.onError(error);
        // A refused token refuses every file: the list's refresh below says so once.
        if (error.status === 401 || error.status === 403) break;
        // the gateway's reader names the file; its body limit (a file too large even to arrive) does not
        const problem = explain(error);
        this.#problem(problem.includes(file.name) ? problem : `${file.name}: ${problem}`);
      }
    }
    this.bar.value = files.length;
    const failed = files.length - indexed;
    this.progressText.textContent = `${indexed} of ${files.length} indexed${failed ? `, ${failed} not` : ""}.`;
    await this.refresh();
  }

  async remove(entry) {
    try {
      const report = await this.api.deleteDocument(entry.id);
      await this.refresh();
      this.#say(`Deleted ${entry.id} (${count(report.passages_removed, "passage")}).`);
    } catch (error) {
      this.#fail(error);
    }
  }

  #item(entry) {
    const item = document.createElement("li");
    item.className = "document";
    item.dataset.id = entry.id;
    const title = document.createElement("span");
    title.className = "document-title";
    title.textContent = entry.title || entry.id;
    const detail = document.createElement("small");
    detail.className = "document-detail";
    const passages = count(entry.passages, "passage");
    detail.textContent = entry.id === title.textContent ? passages : `${entry.id} · ${passages}`;
    const remove = confirmingButton("Delete", `Delete document ${entry.id}`, () => this.remove(entry));
    remove.className = "quiet";
    item.append(title, detail, remove);
    return item;
  }

  #fail(error) {
    this.#say(explain(error), true);
    this.onError(error);
  }

  #say(text, isError = false) {
    this.message.textContent = text;
    this.message.classList.toggle("error", isError);
  }

  #problem(text) {
    const item = document.createElement("li");
    item.textContent = text;
    this.problems.append(item);
  }
}

function count(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}
