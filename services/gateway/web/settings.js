// The settings form: the sampling fields and retrieval the gateway takes, each beside the server's
// default. Only what the person changes is kept; the rest follows the server.

const FIELDS = [
  { name: "temperature", label: "Temperature", min: 0, max: 2, step: 0.05, help: "0 is greedy" },
  { name: "top_p", label: "Top-p", min: 0, max: 1, step: 0.01 },
  { name: "top_k", label: "Top-k", min: 0, step: 1, help: "0 turns it off" },
  { name: "max_tokens", label: "Max tokens", min: 1, step: 1 },
  { name: "seed", label: "Seed", min: 0, step: 1, optional: true, help: "the same seed, the same answer" },
  { name: "retrieval", label: "Retrieval: answer from the index", kind: "checkbox", needsRetrieval: true },
  { name: "retrieval_k", label: "Passages per question (k)", min: 1, max: 20, step: 1, needsRetrieval: true },
  { name: "system_prompt", label: "System prompt", kind: "textarea" },
];

export class SettingsForm {
  /**
   * @param {HTMLFormElement} form
   * @param {import("./store.js").SettingsStore} store
   * @param {() => object} defaults the server's defaults (GET /v1/nightcap/config)
   * @param {() => boolean} retrievalAvailable whether the gateway has a retrieval service behind it
   */
  constructor(form, store, defaults, retrievalAvailable) {
    this.form = form;
    this.store = store;
    this.defaults = defaults;
    this.retrievalAvailable = retrievalAvailable;
    this.fields = new Map();
    form.addEventListener("submit", (event) => event.preventDefault());
    form.addEventListener("reset", (event) => {
      event.preventDefault();
      this.store.reset();
      this.render();
    });
  }

  /** What the next request is sent with: the person's changes over the server's defaults. A chat answered
   * from the index gets the server's grounded temperature unless the person set one. */
  values() {
    const defaults = this.defaults();
    const values = this.store.effective(defaults);
    if (!this.retrievalAvailable()) values.retrieval = false;
    if (!("temperature" in this.store.overrides) && values.retrieval && defaults.grounded_temperature != null) {
      values.temperature = defaults.grounded_temperature;
    }
    return values;
  }

  render() {
    const values = this.values();
    const rows = FIELDS.map((field) => this.#row(field, values[field.name]));
    this.form.querySelector(".settings-fields").replaceChildren(...rows);
  }

  #row(field, value) {
    const row = document.createElement("div");
    row.className = `setting setting-${field.kind || "number"}`;
    const id = `setting-${field.name.replace(/_/g, "-")}`;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = field.label;
    const input = inputFor(field, value);
    input.id = id;
    input.name = field.name;
    const hint = document.createElement("small");
    hint.id = `${id}-hint`;
    hint.className = "setting-hint";
    hint.textContent = hintFor(field, this.defaults()[field.name]);
    const grounded = this.defaults().grounded_temperature;
    if (field.name === "temperature" && grounded != null && this.retrievalAvailable()) {
      hint.textContent += `; ${grounded} answering from the index`;
    }
    if (field.needsRetrieval && !this.retrievalAvailable()) {
      input.disabled = true;
      hint.textContent = "This gateway has no retrieval service behind it.";
    }
    input.setAttribute("aria-describedby", hint.id);
    const markChanged = () => {
      const changed = field.name in this.store.overrides;
      const differs = (this.store.overrides[field.name] ?? null) !== (this.defaults()[field.name] ?? null);
      row.classList.toggle("changed", changed && differs);
    };
    input.addEventListener(field.kind === "checkbox" ? "change" : "input", () => {
      if (!input.checkValidity()) return;
      this.store.set(field.name, valueOf(field, input));
      markChanged();
      if (field.name === "retrieval") this.render(); // the temperature shown follows it
    });
    markChanged();
    if (field.kind === "checkbox") row.append(input, label, hint);
    else row.append(label, input, hint);
    return row;
  }
}

function inputFor(field, value) {
  if (field.kind === "textarea") {
    const area = document.createElement("textarea");
    area.rows = 4;
    area.value = value ?? "";
    return area;
  }
  const input = document.createElement("input");
  if (field.kind === "checkbox") {
    input.type = "checkbox";
    input.checked = Boolean(value);
    return input;
  }
  input.type = "number";
  input.required = !field.optional;
  input.inputMode = field.step < 1 ? "decimal" : "numeric";
  for (const bound of ["min", "max", "step"]) if (field[bound] !== undefined) input[bound] = String(field[bound]);
  input.value = value ?? "";
  return input;
}

function valueOf(field, input) {
  if (field.kind === "checkbox") return input.checked;
  if (field.kind === "textarea") return input.value;
  return input.value === "" ? null : Number(input.value);
}

function hintFor(field, fallback) {
  let shown = fallback === "" || fallback == null ? "none" : fallback;
  if (field.kind === "checkbox") shown = fallback ? "on" : "off";
  const help = field.help ? ` (${field.help})` : "";
  return `Server default: ${shown}${help}`;
}
