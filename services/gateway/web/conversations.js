// The conversation list on the side: open one, rename it in place, delete it (a second click confirms).

import { button } from "./messages.js";

// How long a Delete button waits for its confirming second click.
const CONFIRM_MS = 4000;

export class ConversationList {
  /**
   * @param {HTMLElement} list the <ul>
   * @param {import("./store.js").ConversationStore} store
   * @param {{select: (id: string) => void, remove: (id: string) => void}} actions
   */
  constructor(list, store, actions) {
    this.list = list;
    this.store = store;
    this.actions = actions;
  }

  render() {
    const items = this.store.list().map((conversation) => this.#item(conversation));
    this.list.replaceChildren(...items);
  }

  #item(conversation) {
    const item = document.createElement("li");
    item.className = "conversation";
    const open = button(conversation.title, null, () => this.actions.select(conversation.id));
    open.className = "conversation-title";
    open.title = conversation.title;
    if (conversation.id === this.store.currentId) {
      item.classList.add("current");
      open.setAttribute("aria-current", "true");
    }
    const rename = button("✎", `Rename “${conversation.title}”`, () => this.#rename(item, conversation));
    const remove = confirmingButton("✕", `Delete “${conversation.title}”`, () =>
      this.actions.remove(conversation.id),
    );
    rename.className = remove.className = "quiet";
    rename.title = "Rename";
    remove.title = "Delete";
    item.append(open, rename, remove);
    return item;
  }

  #rename(item, conversation) {
    const field = document.createElement("input");
    field.className = "rename-field";
    field.value = conversation.title;
    field.setAttribute("aria-label", `New name for “${conversation.title}”`);
    let done = false;
    const finish = (save) => {
      if (done) return;
      done = true;
      if (save) this.store.rename(conversation.id, field.value);
      this.render();
      this.list.querySelector(".current .conversation-title")?.focus();
    };
    field.addEventListener("keydown", (event) => {
      if (event.key === "Enter") finish(true);
      if (event.key === "Escape") finish(false);
    });
    field.addEventListener("blur", () => finish(true));
    item.replaceChildren(field);
    field.focus();
    field.select();
  }
}

/** A button that acts on its second click within a few seconds; the first only asks. */
export function confirmingButton(text, label, onConfirm) {
  let armed = 0;
  const node = button(text, label, () => {
    if (armed) {
      clearTimeout(armed);
      armed = 0;
      onConfirm();
      return;
    }
    node.textContent = "Sure?";
    node.setAttribute("aria-label", `Confirm: ${label}`);
    node.classList.add("armed");
    armed = setTimeout(() => {
      armed = 0;
      node.textContent = text;
      node.setAttribute("aria-label", label);
      node.classList.remove("armed");
    }, CONFIRM_MS);
  });
  return node;
}
