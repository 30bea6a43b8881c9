// What the browser keeps: conversations and setting overrides in localStorage (they survive a reload
// and a restart), the token in sessionStorage unless the person asks to remember it.

const CONVERSATIONS_KEY = "nightcap.conversations.v1";
const CURRENT_KEY = "nightcap.current.v1";
const SETTINGS_KEY = "nightcap.settings.v1";
const TOKEN_KEY = "nightcap.token";

/**
 * A conversation: {id, title, created, updated, messages}. A message is {role: "user", content} or
 * {role: "assistant", content, sources, cited, notice, indexBuild, state, error}; state is one of
 * "streaming", "done", "length", "stopped", "empty", "error"; indexBuild is the gateway's
 * nightcap.index_build when the answer was searched while the index was still being built.
 */
export class ConversationStore {
  /** @param {() => void} onFull called when the browser refuses to store more (quota exceeded) */
  constructor(storage = localStorage, onFull = () => {}) {
    this.storage = storage;
    this.onFull = onFull;
    this.conversations = readJson(storage, CONVERSATIONS_KEY, []).map(settleInterrupted);
    this.currentId = storage.getItem(CURRENT_KEY) || this.conversations[0]?.id || null;
  }

  /** Newest first. */
  list() {
    return [...this.conversations].sort((a, b) => b.updated - a.updated);
  }

  get(id) {
    return this.conversations.find((conversation) => conversation.id === id) || null;
  }

  current() {
    return this.get(this.currentId);
  }

  create() {
    const now = Date.now();
    const conversation = { id: newId(), title: "New conversation", created: now, updated: now, messages: [] };
    this.conversations.push(conversation);
    this.select(conversation.id);
    this.save();
    return conversation;
  }

  select(id) {
    this.currentId = id;
    this.storage.setItem(CURRENT_KEY, id || "");
  }

  rename(id, title) {
    const conversation = this.get(id);
    if (!conversation || !title.trim()) return;
    conversation.title = title.trim();
    conversation.titled = true;
    this.save();
  }

  remove(id) {
    this.conversations = this.conversations.filter((conversation) => conversation.id !== id);
    if (this.currentId === id) this.select(this.list()[0]?.id || null);
    this.save();
  }

  /** Call after changing a conversation's messages: it moves to the top of the list. */
  touch(conversation) {
    conversation.updated = Date.now();
    const first = conversation.messages.find((message) => message.role === "user");
    if (!conversation.titled && first) conversation.title = titleFrom(first.content);
    this.save();
  }

  save() {
    try {
      this.storage.setItem(CONVERSATIONS_KEY, JSON.stringify(this.conversations));
    } catch {
      this.onFull(); // the page keeps working; it just cannot keep what changed
    }
  }
}

/** Only what the person changed; everything else follows the server's defaults. */
export class SettingsStore {
  constructor(storage = localStorage) {
    this.storage = storage;
    this.overrides = readJson(storage, SETTINGS_KEY, {});
  }

  set(name, value) {
    this.overrides[name] = value;
    this.storage.setItem(SETTINGS_KEY, JSON.stringify(this.overrides));
  }

  reset() {
    this.overrides = {};
    this.storage.removeItem(SETTINGS_KEY);
  }

  effective(defaults) {
    return { ...defaults, ...this.overrides };
  }
}

export const tokenStore = {
  get() {
    return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";
  },
  remembered() {
    return localStorage.getItem(TOKEN_KEY) !== null;
  },
  set(token, remember) {
    this.forget();
    (remember ? localStorage : sessionStorage).setItem(TOKEN_KEY, token);
  },
  forget() {
    sessionStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(TOKEN_KEY);
  },
};

function readJson(storage, key, fallback) {
  try {
    return JSON.parse(storage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
}

// A page closed mid-answer left a message marked streaming; after a reload it is simply stopped.
function settleInterrupted(conversation) {
  for (const message of conversation.messages) {
    if (message.state === "streaming") message.state = "stopped";
  }
  return conversation;
}

function titleFrom(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New conversation";
}

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}
