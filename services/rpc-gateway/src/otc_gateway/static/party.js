"use strict";
// A party's page: live updates pushed over server-sent events, the address form, cancel.

(() => {
  const match = /^\/d\/([A-Za-z0-9_-]+)\/([ab])\/([A-Za-z0-9_-]+)\/?$/.exec(location.pathname);
  if (!match) return;
  const [, dealId, sideKey, token] = match;
  const party = sideKey === "a" ? "ALICE" : "BOB";
  const live = document.getElementById("live");
  const liveState = document.getElementById("live-state");
  const root = document.documentElement;

  // ------------------------------------------------------------------ countdown
  let clockBase = performance.now();

  function tick() {
    const el = live.querySelector('[data-countdown="running"]');
    if (!el) return;
    const left = Number(el.dataset.seconds) - (performance.now() - clockBase) / 1000;
    const clock = el.querySelector(".clock");
    if (clock) clock.textContent = otc.duration(left);
  }
  setInterval(tick, 1000);

  // ------------------------------------------------------------------ live updates
  let source = null;
  let lastId = "";
  let cancelOpen = false;

  function setState(state, text) {
    liveState.dataset.state = state;
    liveState.textContent = text;
  }

  function apply(view) {
    live.innerHTML = view.html; // rendered by the server from the same template as the page
    clockBase = performance.now();
    document.body.dataset.stage = view.stage;
    if (!view.showForm) {
      // Filled (details are immutable) or the deal moved on: the address form has no use any more.
      const details = document.getElementById("details");
      if (details) details.remove();
    }
    if (cancelOpen) openCancel(true);
    // When each stage first showed, for anyone measuring how fast updates arrive.
    const shown = `shown${view.stage.charAt(0)}${view.stage.slice(1).toLowerCase()}`;
    if (!root.dataset[shown]) root.dataset[shown] = String(Date.now());
    root.dataset.viewSeq = String(view.seq);
    root.dataset.viewShownAt = String(Date.now());
    root.dataset.viewEventAt = view.eventAt || "";
  }

  function connect() {
    const base = `${location.pathname.replace(/\/$/, "")}/events`;
    // A fresh EventSource cannot send Last-Event-ID itself: hand it over in the query.
    source = new EventSource(lastId ? `${base}?lastEventId=${encodeURIComponent(lastId)}` : base);
    source.addEventListener("open", () => setState("live", "Live: this page updates by itself."));
    source.addEventListener("view", (event) => {
      if (event.lastEventId) lastId = event.lastEventId;
      apply(JSON.parse(event.data));
      setState("live", "Live: this page updates by itself.");
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // The server refused (busy, restarting): try again ourselves, resuming where we were.
        setState("reconnecting", "Reconnecting…");
        source.close();
        setTimeout(connect, 3000);
      } else {
        setState("reconnecting", "Connection lost; reconnecting…");
      }
    });
  }
  connect();

  // ------------------------------------------------------------------ cancel
  function openCancel(open) {
    cancelOpen = open;
    const box = live.querySelector('[data-role="cancel-confirm"]');
    const trigger = live.querySelector('[data-action="cancel"]');
    if (box) box.hidden = !open;
    if (trigger) trigger.hidden = open;
  }

  live.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const action = button.dataset.action;
    if (action === "cancel") openCancel(true);
    if (action === "cancel-no") openCancel(false);
    if (action === "cancel-yes") {
      const errorEl = live.querySelector('[data-role="cancel-error"]');
      button.disabled = true;
      const reply = await otc.rpc("otc.cancelDeal", { dealId, token });
      button.disabled = false;
      if (reply.error) {
        if (errorEl) errorEl.textContent = reply.error.message;
      } else {
        openCancel(false);
        if (errorEl) errorEl.textContent = "The deal is cancelled.";
      }
    }
  });

  // ------------------------------------------------------------------ address form
  const form = document.getElementById("details-form");
  if (!form) return;
  const review = document.getElementById("details-review");
  const confirmBox = document.getElementById("details-confirm");
  const errorBox = document.getElementById("details-error");
  const fields = {
    payback: { chain: form.dataset.sendChain, input: form.elements["payback"], canonical: null },
    recipient: { chain: form.dataset.receiveChain, input: form.elements["recipient"], canonical: null },
  };

  function emailOk() {
    const email = form.elements["email"].value.trim();
    return !email || /^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$/.test(email);
  }

  function updateReview() {
    review.disabled = !(fields.payback.canonical && fields.recipient.canonical && emailOk());
  }

  Object.entries(fields).forEach(([name, field]) => {
    const hintEl = form.querySelector(`[data-hint="${name}"]`);
    const run = otc.debounce(async () => {
      const typed = field.input.value.trim();
      field.canonical = null;
      updateReview();
      if (!typed) {
        otc.hint(hintEl, "", "");
        return;
      }
      const reply = await otc.check("/api/check/address", { chainId: field.chain, address: typed });
      if (field.input.value.trim() !== typed) return;
      if (reply.ok) {
        field.canonical = reply.address;
        otc.hint(hintEl, "ok", reply.address === typed ? "valid address" : `valid: ${reply.address}`);
      } else {
        otc.hint(hintEl, reply.transient ? "" : "error", reply.message);
      }
      updateReview();
    }, 250);
    field.input.addEventListener("input", () => { field.canonical = null; updateReview(); run(); });
  });
  form.elements["email"].addEventListener("input", updateReview);

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (review.disabled) return;
    document.getElementById("confirm-payback").textContent = fields.payback.canonical;
    document.getElementById("confirm-recipient").textContent = fields.recipient.canonical;
    document.getElementById("confirm-email").textContent = form.elements["email"].value.trim() || "none";
    form.hidden = true;
    confirmBox.hidden = false;
    errorBox.textContent = "";
  });

  document.getElementById("details-confirm-edit").addEventListener("click", () => {
    confirmBox.hidden = true;
    form.hidden = false;
  });

  document.getElementById("details-confirm-yes").addEventListener("click", async (event) => {
    const button = event.currentTarget;
    const params = {
      dealId, party, token,
      paybackAddress: fields.payback.canonical,
      recipientAddress: fields.recipient.canonical,
    };
    const email = form.elements["email"].value.trim();
    if (email) params.email = email;
    button.disabled = true;
    const reply = await otc.rpc("otc.fillPartyDetails", params);
    button.disabled = false;
    if (reply.error) {
      errorBox.textContent = reply.error.message;
      confirmBox.hidden = true;
      form.hidden = false;
      return;
    }
    const details = document.getElementById("details");
    if (details) {
      details.replaceChildren();
      const saved = document.createElement("p");
      saved.className = "saved";
      saved.textContent = "Your addresses are saved. Your deposit address appears below.";
      details.appendChild(saved);
    }
  });
})();
