// Watches GET /health and says in a banner which backend is down; keeps checking, so the banner goes
// away by itself when the stack is back.

// While something is down, check often enough that recovery shows within seconds; when all is well, rarely.
const DOWN_POLL_MS = 3000;
const UP_POLL_MS = 20000;

export class HealthWatch {
  /**
   * @param {import("./api.js").Api} api
   * @param {HTMLElement} banner
   * @param {() => void} onRecover called when every backend serves again after a problem
   */
  constructor(api, banner, onRecover) {
    this.api = api;
    this.banner = banner;
    this.onRecover = onRecover;
    this.healthy = null;
    this.timer = 0;
  }

  async check() {
    let problem = "";
    try {
      const { backends } = await this.api.health();
      const down = Object.entries(backends).filter(([, state]) => state !== "SERVING");
      if (down.length === 1) problem = `The ${down[0][0]} backend is down (${down[0][1]}).`;
      if (down.length > 1) problem = `Backends down: ${down.map(([name, state]) => `${name} (${state})`).join(", ")}.`;
    } catch {
      problem = "The gateway cannot be reached.";
    }
    const recovered = this.healthy === false && !problem;
    this.healthy = !problem;
    this.#show(problem);
    if (recovered) this.onRecover();
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.check(), this.healthy ? UP_POLL_MS : DOWN_POLL_MS);
  }

  #show(problem) {
    this.banner.hidden = !problem;
    this.banner.textContent = problem
      ? `${problem} Answers fail until it is back; this page checks again every ${DOWN_POLL_MS / 1000} s.`
      : "";
  }
}
