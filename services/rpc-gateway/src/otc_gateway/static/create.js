"use strict";
// The create page: as-typed checks against the server's own rules, then otc.createDeal.

(() => {
  const form = document.getElementById("create-form");
  if (!form) return;
  const catalogue = JSON.parse(form.dataset.catalogue);
  const chains = Object.fromEntries(catalogue.map((c) => [c.chainId, c]));
  const errorBox = document.getElementById("create-error");
  const submit = document.getElementById("create-submit");
  const created = { dealId: null, tokens: {} };

  function side(name) {
    const box = form.querySelector(`[data-side="${name}"]`);
    return {
      name,
      chain: box.querySelector('[data-role="chain"]'),
      asset: box.querySelector('[data-role="asset"]'),
      amount: box.querySelector('[data-role="amount"]'),
      hint: form.querySelector(`[data-hint="${name}-amount"]`),
    };
  }
  const sides = [side("alice"), side("bob")];

  function fillAssets(s, preferIndex) {
    const chain = chains[s.chain.value];
    const previous = s.asset.value;
    s.asset.replaceChildren();
    for (const asset of chain ? chain.assets : []) {
      const option = document.createElement("option");
      option.value = asset.symbol;
      option.textContent = `${asset.symbol} (max ${asset.max})`;
      s.asset.appendChild(option);
    }
    if ([...s.asset.options].some((o) => o.value === previous)) {
      s.asset.value = previous;
    } else if (preferIndex !== undefined && s.asset.options.length > preferIndex) {
      s.asset.selectedIndex = preferIndex;
    }
  }

  async function checkAmount(s) {
    const amount = s.amount.value.trim();
    if (!amount) {
      otc.hint(s.hint, "", "");
      return false;
    }
    const asset = chains[s.chain.value] && chains[s.chain.value].assets.find((a) => a.symbol === s.asset.value);
    if (!asset) return false;
    const reply = await otc.check("/api/check/amount", { chainId: s.chain.value, asset: s.asset.value, amount });
    if (s.amount.value.trim() !== amount) return false; // a newer keystroke is being checked
    if (reply.ok) {
      otc.hint(s.hint, "ok", `${reply.amount} ${asset.symbol} · commission ${asset.commissionBps / 100}%` +
        (asset.fixedFee !== "0" ? ` + ${asset.fixedFee} ${asset.symbol}` : ""));
      return true;
    }
    otc.hint(s.hint, reply.transient ? "" : "error", reply.message);
    return false;
  }

  function timeoutSeconds() {
    const value = Number(form.elements["timeout"].value);
    const unit = Number(form.elements["timeout-unit"].value);
    return Number.isInteger(value) && value > 0 ? value * unit : NaN;
  }

  function checkTimeout() {
    const hintEl = form.querySelector('[data-hint="timeout"]');
    const selected = sides.map((s) => chains[s.chain.value]).filter(Boolean);
    const low = Math.max(...selected.map((c) => c.minTimeout));
    const high = Math.min(...selected.map((c) => c.maxTimeout));
    const seconds = timeoutSeconds();
    if (Number.isNaN(seconds)) {
      otc.hint(hintEl, "error", "enter a whole number");
      return false;
    }
    if (seconds < low || seconds > high) {
      otc.hint(hintEl, "error", `must be between ${otc.duration(low)} and ${otc.duration(high)} for these chains`);
      return false;
    }
    otc.hint(hintEl, "ok", `${otc.duration(seconds)} once both parties have entered their addresses`);
    return true;
  }

  sides.forEach((s, i) => {
    fillAssets(s, i);
    const recheck = otc.debounce(() => checkAmount(s), 250);
    s.chain.addEventListener("change", () => { fillAssets(s, 0); recheck(); checkTimeout(); });
    s.asset.addEventListener("change", recheck);
    s.amount.addEventListener("input", recheck);
  });
  form.elements["timeout"].addEventListener("input", checkTimeout);
  form.elements["timeout-unit"].addEventListener("change", checkTimeout);
  checkTimeout();

  function showServerError(message) {
    errorBox.textContent = message;
    const match = /^(?:params\.)?(alice|bob)\.amount/.exec(message);
    if (match) otc.hint(sides.find((s) => s.name === match[1]).hint, "error", message);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    errorBox.textContent = "";
    const seconds = timeoutSeconds();
    const params = {
      alice: { chainId: sides[0].chain.value, asset: sides[0].asset.value, amount: sides[0].amount.value.trim() },
      bob: { chainId: sides[1].chain.value, asset: sides[1].asset.value, amount: sides[1].amount.value.trim() },
      timeoutSeconds: Number.isNaN(seconds) ? 0 : seconds,
    };
    const name = form.elements["name"].value.trim();
    if (name) params.name = name;
    submit.disabled = true;
    const reply = await otc.rpc("otc.createDeal", params);
    submit.disabled = false;
    if (reply.error) {
      showServerError(reply.error.message);
      return;
    }
    const result = reply.result;
    created.dealId = result.dealId;
    created.tokens = { ALICE: result.aliceToken, BOB: result.bobToken };
    document.getElementById("link-a").value = result.linkA;
    document.getElementById("link-b").value = result.linkB;
    form.closest("section").hidden = true;
    const box = document.getElementById("created");
    box.hidden = false;
    box.scrollIntoView({ block: "start" });
  });

  document.querySelectorAll("form.invite").forEach((invite) => {
    invite.addEventListener("submit", async (event) => {
      event.preventDefault();
      const result = invite.querySelector('[data-role="invite-result"]');
      const email = invite.elements["email"].value.trim();
      if (!email) {
        otc.hint(result, "error", "enter an e-mail address");
        return;
      }
      const party = invite.dataset.party;
      const button = invite.querySelector("button");
      button.disabled = true;
      otc.hint(result, "", "Sending…");
      const reply = await otc.rpc("otc.sendInvite", {
        dealId: created.dealId, party, email, token: created.tokens[party],
      });
      button.disabled = false;
      if (reply.error) otc.hint(result, "error", reply.error.message);
      else otc.hint(result, "ok", `Invitation sent to ${email}.`);
    });
  });
})();
