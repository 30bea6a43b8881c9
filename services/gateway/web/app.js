// The page: reads the gateway's config, then wires the composer, the conversation list, the settings,
// the documents panel, the token bar and the health banner together. Each part lives in its module.

import { Api, ApiError } from "./api.js";
import { Chat } from "./chat.js";
import { ConversationList } from "./conversations.js";
import { DocumentsPanel } from "./documents.js";
import { HealthWatch } from "./health.js";
import { MessageView } from "./messages.js";
import { SettingsForm } from "./settings.js";
import { ConversationStore, SettingsStore, tokenStore } from "./store.js";

// Only until GET /v1/nightcap/config answers: the gateway's documented defaults.
const FALLBACK_DEFAULTS = {
  temperature: 0.6,
  grounded_temperature: 0,
  top_p: 1.0,
  top_k: 40,
  max_tokens: 256,
  retrieval: true,
  retrieval_k: 3,
  system_prompt: "",
};
const CONFIG_RETRY_MS = 3000;
const PANELS = ["settings", "documents"];

const $ = (selector) => document.querySelector(selector);
const input = $("#message-input");
const sendButton = $("#send-button");

const api = new Api(() => tokenStore.get());
const conversations = new ConversationStore(localStorage, () => {
  $("#storage-warning").hidden = false;
});
const settings = new SettingsStore();
let config = null;

const view = new MessageView($("#messages"), {
  regenerate: () => chat.regenerate(),
  edit: (text) => chat.editLast(text),
  redraw: () => redraw(),
});
const chat = new Chat({
  api,
  conversations,
  view,
  options: () => ({ model: config?.model, citations: config?.citations, ...settingsForm.values() }),
  onBusy: showBusy,
  onError: noticeFailure,
});
const conversationList = new ConversationList($("#conversation-list"), conversations, {
  select(id) {
    conversations.select(id);
    redraw();
    input.focus();
  },
  remove(id) {
    if (chat.streaming?.id === id) chat.stop();
    conversations.remove(id);
    redraw();
  },
});
const settingsForm = new SettingsForm($("#settings-form"), settings, defaults, hasRetrieval);
const documents = new DocumentsPanel($("#documents-panel"), api, noticeFailure);
// A gateway that started while generation was down could not name its model: ask again once it is back.
const health = new HealthWatch(api, $("#health-banner"), () => config?.model || loadConfig());

function defaults() {
  return config?.defaults || FALLBACK_DEFAULTS;
}

function hasRetrieval() {
  return config?.retrieval_available ?? true;
}

function redraw() {
  view.show(conversations.current(), chat.busy);
  conversationList.render();
}

function showBusy(busy) {
  sendButton.textContent = busy ? "Stop" : "Send";
  sendButton.classList.toggle("stop", busy);
  sendButton.setAttribute("aria-label", busy ? "Stop the answer" : "Send");
  $("#composer-status").textContent = busy ? "Answering…" : "Answer finished.";
  redraw();
  if (!busy && document.activeElement === sendButton) input.focus();
}

/** A failed request: a 401 opens the token bar; anything that smells of a backend rechecks health. */
function noticeFailure(error) {
  if (error instanceof ApiError && error.status === 401) openTokenBar("That needs a valid token.");
  if (!(error instanceof ApiError) || error.status === 0 || error.status >= 500) health.check();
}

// --- the composer: Enter sends, Shift+Enter is a new line, the same button stops a streaming answer

function ask() {
  if (chat.send(input.value)) input.value = "";
  input.focus();
}

input.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
  event.preventDefault();
  if (!chat.busy) ask();
});

$("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  if (chat.busy) chat.stop();
  else ask();
});

$("#new-conversation").addEventListener("click", () => {
  if (conversations.current()?.messages.length !== 0) conversations.create();
  redraw();
  input.focus();
});

// --- the side panels: one open at a time

function setPanel(name) {
  for (const panel of PANELS) {
    const open = panel === name;
    $(`#${panel}-panel`).hidden = !open;
    $(`#${panel}-toggle`).setAttribute("aria-expanded", String(open));
  }
  document.body.classList.toggle("panel-open", Boolean(name));
  if (name === "documents") documents.refresh();
  if (name) $(`#${name}-panel`).querySelector("input, textarea, button")?.focus();
}

for (const panel of PANELS) {
  const root = $(`#${panel}-panel`);
  $(`#${panel}-toggle`).addEventListener("click", () => setPanel(root.hidden ? panel : null));
  const close = () => {
    setPanel(null);
    $(`#${panel}-toggle`).focus();
  };
  root.querySelector(".panel-close").addEventListener("click", close);
  root.addEventListener("keydown", (event) => event.key === "Escape" && close());
}

// --- the token: for this tab only (sessionStorage) unless "Remember on this device" is ticked

function openTokenBar(reason) {
  $("#token-form").hidden = false;
  $("#token-toggle").hidden = false;
  $("#token-toggle").setAttribute("aria-expanded", "true");
  $("#token-status").textContent = reason;
  $("#token-input").focus();
}

function describeToken() {
  if (!tokenStore.get()) return "No token set.";
  return tokenStore.remembered() ? "A token is set, remembered on this device." : "A token is set for this tab.";
}

$("#token-toggle").addEventListener("click", () => {
  const form = $("#token-form");
  form.hidden = !form.hidden;
  $("#token-toggle").setAttribute("aria-expanded", String(!form.hidden));
  if (!form.hidden) {
    $("#token-status").textContent = describeToken();
    $("#token-input").focus();
  }
});

$("#token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  tokenStore.set($("#token-input").value.trim(), $("#token-remember").checked);
  $("#token-input").value = "";
  $("#token-status").textContent = describeToken();
  if (!$("#documents-panel").hidden) documents.refresh();
  input.focus();
});

$("#token-forget").addEventListener("click", () => {
  tokenStore.forget();
  $("#token-status").textContent = describeToken();
});

// --- start

let configRetry = 0;

async function loadConfig() {
  clearTimeout(configRetry);
  try {
    config = await api.config();
    $("#model-name").textContent = config.model || "model unknown: generation does not answer";
    $("#token-toggle").hidden = !config.auth_required;
    $("#token-remember").checked = tokenStore.remembered();
    if (config.auth_required && !tokenStore.get()) openTokenBar("This gateway needs a token (chat or admin).");
    settingsForm.render();
  } catch {
    $("#model-name").textContent = "model unknown: the gateway does not answer";
    configRetry = setTimeout(loadConfig, CONFIG_RETRY_MS);
  }
}

settingsForm.render();
redraw();
loadConfig();
health.check();
input.focus();
