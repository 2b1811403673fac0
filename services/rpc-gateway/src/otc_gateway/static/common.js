"use strict";
// Shared by the pages: JSON-RPC calls, as-typed checks, copy buttons.

const otc = (() => {
  let nextId = 1;

  async function rpc(method, params) {
    let response;
    try {
      response = await fetch("/rpc", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ jsonrpc: "2.0", id: nextId++, method, params }),
        credentials: "same-origin",
        cache: "no-store",
        referrerPolicy: "no-referrer",
      });
    } catch (err) {
      return { error: { message: "The server could not be reached. Check your connection and try again." } };
    }
    try {
      const reply = await response.json();
      if (reply && (reply.result !== undefined || reply.error)) return reply;
    } catch (err) {
      // fall through
    }
    return { error: { message: `Unexpected answer from the server (HTTP ${response.status}). Please try again.` } };
  }

  async function check(path, query) {
    const url = `${path}?${new URLSearchParams(query).toString()}`;
    try {
      const response = await fetch(url, { cache: "no-store", referrerPolicy: "no-referrer" });
      const body = await response.json();
      if (body.error) return { ok: false, message: body.error.message, transient: true };
      return body;
    } catch (err) {
      return { ok: false, message: "could not check right now", transient: true };
    }
  }

  function debounce(fn, ms) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  function hint(el, state, text) {
    if (!el) return;
    el.textContent = text || "";
    el.dataset.state = state || "";
  }

  async function copy(text, button) {
    let done = false;
    try {
      await navigator.clipboard.writeText(text);
      done = true;
    } catch (err) {
      const area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "offscreen";
      document.body.appendChild(area);
      area.select();
      try {
        done = document.execCommand("copy");
      } catch (e) {
        done = false;
      }
      area.remove();
    }
    if (button) {
      const label = button.dataset.label || button.textContent;
      button.dataset.label = label;
      button.textContent = done ? "Copied" : "Select and copy by hand";
      setTimeout(() => { button.textContent = label; }, 1500);
    }
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest("button.copy");
    if (!button) return;
    event.preventDefault();
    if (button.dataset.copyText !== undefined) {
      copy(button.dataset.copyText, button);
    } else if (button.dataset.copyFrom) {
      const source = document.getElementById(button.dataset.copyFrom);
      if (source) copy(source.value || source.textContent, button);
    }
  });

  function duration(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    const days = Math.floor(seconds / 86400);
    const hours = Math.floor((seconds % 86400) / 3600);
    const minutes = Math.floor((seconds % 3600) / 60);
    const secs = seconds % 60;
    const pad = (n) => String(n).padStart(2, "0");
    const clock = `${pad(hours)}:${pad(minutes)}:${pad(secs)}`;
    return days ? `${days}d ${clock}` : clock;
  }

  return { rpc, check, debounce, hint, copy, duration };
})();
