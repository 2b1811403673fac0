"""A trader's whole journey in headless Chromium, against the full EVM system on live anvil chains.

Create a deal on `/`, open both personal links, fill both address forms, fund both escrows,
and watch each page move to SWAP and CLOSED by itself (server-sent events, no reload).
Screenshots go to test-artifacts/; the page load time and the delay from an engine event
to the page showing it are printed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright

from tests.conftest import EvmChains, Stack
from tests.e2e import Deal, EvmStack, chains_env, fresh_address
from tests.support import ALICE_EVM, ALPHA_ADDRESS, BOB_EVM, RpcClient, ServiceProcess
from tests.utxo_support import UnicityDevnet

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BLOCK_SECONDS = 0.25
PHONE = ViewportSize(width=390, height=844)
PUBLIC = "https://otc.example"


@pytest.fixture
async def live_chains(work_dir: Path) -> AsyncIterator[EvmChains]:
    chains = await asyncio.to_thread(EvmChains, work_dir, BLOCK_SECONDS)
    yield chains
    chains.stop()


@pytest.fixture
async def system(
    service_env: dict[str, str],
    live_chains: EvmChains,
    unicity_devnet: UnicityDevnet,
    tmp_path: Path,
    work_dir: Path,
) -> AsyncIterator[EvmStack]:
    env = chains_env(service_env, tmp_path / "registry.toml", live_chains, unicity_devnet)
    await unicity_devnet.call("devnet.autominer", BLOCK_SECONDS)
    running = EvmStack(env, work_dir, live_chains, devnet=unicity_devnet)
    gateway = running.procs["gateway"]
    # The browser is on the gateway's own origin, which /rpc checks against the public URL.
    gateway.env["OTC_PUBLIC_BASE_URL"] = gateway.url
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs Debian's chromium")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


async def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"), full_page=True)


async def stage_of(page: Page) -> str:
    return str(await page.get_attribute("body", "data-stage"))


def shown_key(stage: str) -> str:
    """The page notes when it first showed each stage (a short stage may be gone before one looks)."""
    return f"shown{stage[0]}{stage[1:].lower()}"


async def wait_stage(page: Page, stage: str, timeout: float, stack: EvmStack) -> None:
    try:
        await page.wait_for_function(
            "key => Boolean(document.documentElement.dataset[key])", arg=shown_key(stage), timeout=timeout * 1000
        )
    except Exception:
        raise AssertionError(f"page stayed {await stage_of(page)}, expected {stage}\n{stack.logs()}") from None


async def fill_details(page: Page, payback: str, recipient: str) -> None:
    await page.fill("input[name=payback]", payback)
    await page.fill("input[name=recipient]", recipient)
    await page.wait_for_selector("[data-hint=payback][data-state=ok]")
    await page.wait_for_selector("[data-hint=recipient][data-state=ok]")
    await page.click("#details-review")
    await page.wait_for_selector("#details-confirm:not([hidden])")
    assert await page.text_content("#confirm-payback") == payback
    assert await page.text_content("#confirm-recipient") == recipient
    await page.click("#details-confirm-yes")


#: (chain, asset, amount, what the page asks to deposit) for Alice, then Bob.
PAIRS = {
    "eth-for-usdt": (("ETH", "ETH", "1.5", "1.5055 ETH"), ("POLYGON", "USDT", "4000", "4013 USDT")),
    "alpha-for-eth": (("UNICITY", "ALPHA", "20", "20.0601 ALPHA"), ("ETH", "ETH", "0.5", "0.5025 ETH")),
}


@pytest.mark.parametrize("pair", list(PAIRS))
async def test_two_traders_swap_through_the_pages(system: EvmStack, browser: Browser, pair: str) -> None:
    (a_chain, a_asset, a_amount, a_deposit), (b_chain, b_asset, b_amount, _) = PAIRS[pair]
    base = system.procs["gateway"].url
    errors: list[str] = []

    async def open_page(url: str) -> tuple[Page, float]:
        context = await browser.new_context(viewport=PHONE)
        page = await context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        started = time.perf_counter()
        await page.goto(url, wait_until="load")
        return page, time.perf_counter() - started

    # ------------------------------------------------------------------ create the deal on /
    home, _ = await open_page(f"{base}/")
    await home.select_option("select[name=alice-chain]", a_chain)
    await home.select_option("select[name=alice-asset]", a_asset)
    await home.fill("input[name=alice-amount]", a_amount)
    await home.select_option("select[name=bob-chain]", b_chain)
    await home.select_option("select[name=bob-asset]", b_asset)
    await home.fill("input[name=bob-amount]", "1.0000000000000000001")
    await home.wait_for_selector("[data-hint=bob-amount][data-state=error]")
    assert "decimal places" in str(await home.text_content("[data-hint=bob-amount]"))
    await home.fill("input[name=bob-amount]", b_amount)
    await home.wait_for_selector("[data-hint=bob-amount][data-state=ok]")
    await home.fill("input[name=timeout]", "10")
    await home.fill("input[name=name]", "browser test")
    await shot(home, f"{pair}-1-create")
    await home.click("#create-submit")
    await home.wait_for_selector("#created:not([hidden])")
    link_a = await home.input_value("#link-a")
    link_b = await home.input_value("#link-b")
    assert link_a.startswith(f"{base}/d/") and "/a/" in link_a and "/b/" in link_b
    await home.fill("form.invite[data-party=ALICE] input[name=email]", "alice@example.com")
    await home.click("form.invite[data-party=ALICE] button")
    await home.wait_for_function(
        "() => { const t = document.querySelector('form.invite[data-party=ALICE] [data-role=invite-result]')"
        ".textContent; return t && t !== 'Sending…'; }"
    )
    await shot(home, f"{pair}-2-created")

    deal_id, token_a = link_a.rsplit("/d/", 1)[1].split("/a/")
    token_b = link_b.rsplit("/b/", 1)[1]
    deal = Deal(
        system,
        {"dealId": deal_id, "aliceToken": token_a, "bobToken": token_b},
        {
            "ALICE": {"chainId": a_chain, "asset": a_asset, "amount": a_amount},
            "BOB": {"chainId": b_chain, "asset": b_asset, "amount": b_amount},
        },
    )

    # ------------------------------------------------------------------ both parties open their links
    alice, alice_load = await open_page(link_a)
    bob, bob_load = await open_page(link_b)
    await alice.wait_for_selector("#live-state[data-state=live]")
    await bob.wait_for_selector("#live-state[data-state=live]")
    for page in (alice, bob):
        # Set once; a reload would wipe it, so its survival proves the updates came without one.
        await page.evaluate("() => { window.__noReload = true; }")
    assert await stage_of(alice) == "CREATED"

    await fill_details(alice, deal.payback["ALICE"], deal.recipient["ALICE"])
    await alice.wait_for_selector("#deposit")  # pushed: the page shows its escrow address by itself
    await shot(alice, f"{pair}-3-alice-filled")
    bad = fresh_address().lower()
    await bob.fill("input[name=payback]", bad[:-1] + ("a" if bad[-1] != "a" else "b"))
    await bob.wait_for_selector("[data-hint=payback][data-state=error]")
    await fill_details(bob, deal.payback["BOB"], deal.recipient["BOB"])
    for page in (alice, bob):
        await wait_stage(page, "COLLECTION", 15, system)
        await page.wait_for_selector("[data-countdown=running]")
    await shot(bob, f"{pair}-4-bob-collection")

    escrow_on_page = (await alice.text_content("#escrow-address") or "").strip()
    assert escrow_on_page == await deal.escrow("ALICE")
    assert (await alice.text_content("#deposit-amount") or "").strip() == a_deposit
    assert await alice.locator("#deposit .qr svg").count() == 1

    # ------------------------------------------------------------------ fund both escrows
    await asyncio.gather(
        deal.deposit("ALICE", await deal.required("ALICE")), deal.deposit("BOB", await deal.required("BOB"))
    )
    for page in (alice, bob):
        await wait_stage(page, "SWAP", 90, system)
    await shot(alice, f"{pair}-5-alice-swap")
    for page in (alice, bob):
        await wait_stage(page, "CLOSED", 120, system)
        await page.wait_for_selector("#outcome[data-outcome=SWAPPED]")
        assert await page.evaluate("() => window.__noReload === true"), "the page was reloaded"
    await shot(alice, f"{pair}-6-alice-closed")
    await shot(bob, f"{pair}-6-bob-closed")
    banner = await alice.text_content("#outcome h2") or ""
    assert "SWAPPED" in banner

    # ------------------------------------------------------------------ figures
    status = await deal.status()
    delays: dict[str, list[float]] = {}
    for stage in ("COLLECTION", "SWAP", "CLOSED"):
        changed = [e for e in status["events"] if e["type"] == "deal.stage_changed" and e["detail"].get("to") == stage]
        at = datetime.fromisoformat(changed[0]["at"]).timestamp() * 1000
        for page in (alice, bob):
            shown = float(await page.evaluate("key => document.documentElement.dataset[key]", shown_key(stage)))
            delays.setdefault(stage, []).append(shown - at)
    print(f"\n{pair}: party page load: Alice {alice_load * 1000:.0f} ms, Bob {bob_load * 1000:.0f} ms")
    for stage, values in delays.items():
        print(f"engine stage change → {stage} shown on the pages: " + ", ".join(f"{v:.0f} ms" for v in values))
    assert all(v < 5000 for values in delays.values() for v in values), delays
    assert not errors, errors


@pytest.fixture
async def small_stack(service_env: dict[str, str], work_dir: Path) -> AsyncIterator[Stack]:
    """Engine and gateway only (no chains), the gateway's public URL being its own address."""
    running = Stack(service_env, work_dir)
    running.gateway.env["OTC_PUBLIC_BASE_URL"] = running.gateway.url
    await running.start()
    yield running
    await running.stop()


async def test_page_survives_a_restart_and_cancels(small_stack: Stack, browser: Browser, work_dir: Path) -> None:
    rpc = small_stack.rpc
    created = await rpc.result(
        "otc.createDeal",
        {
            "alice": {"chainId": "ETH", "asset": "ETH", "amount": "2"},
            "bob": {"chainId": "UNICITY", "asset": "ALPHA", "amount": "100"},
            "timeoutSeconds": 3600,
        },
    )
    other_gateway = ServiceProcess(
        "gateway-other", ["-m", "otc_gateway"], {**small_stack.env, "OTC_PUBLIC_BASE_URL": PUBLIC}, work_dir
    )
    await other_gateway.start()
    try:
        context = await browser.new_context(viewport=PHONE)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(f"{small_stack.gateway.url}/d/{created['dealId']}/a/{created['aliceToken']}")
        await page.wait_for_selector("#live-state[data-state=live]")
        await page.evaluate("() => { window.__noReload = true; }")

        # The address form checks as typed and asks for confirmation before anything is locked.
        await page.fill("input[name=payback]", ALICE_EVM.lower())
        await page.wait_for_selector("[data-hint=payback][data-state=error]")
        assert "checksum" in str(await page.text_content("[data-hint=payback]"))
        await page.fill("input[name=recipient]", ALICE_EVM)  # an EVM address where a UNICITY one belongs
        await page.wait_for_selector("[data-hint=recipient][data-state=error]")
        assert await page.is_disabled("#details-review")

        # The gateway dies; while the page is cut off, the other party acts through another gateway.
        small_stack.gateway.kill()
        await page.wait_for_selector("#live-state[data-state=reconnecting]")
        await RpcClient(other_gateway.url).result(
            "otc.fillPartyDetails",
            {
                "dealId": created["dealId"],
                "party": "BOB",
                "token": created["bobToken"],
                "paybackAddress": ALPHA_ADDRESS,
                "recipientAddress": BOB_EVM,
            },
        )
        await small_stack.gateway.start()
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#progress .side[data-party=BOB] .muted')]"
            ".every(e => !e.textContent.includes('not entered'))",
            timeout=15_000,
        )
        await page.wait_for_selector("#live-state[data-state=live]")
        await shot(page, "7-after-restart")

        # Cancel, with its confirmation step; the outcome is pushed back to the page.
        await page.click("[data-action=cancel]")
        await page.wait_for_selector("[data-role=cancel-confirm]:not([hidden])")
        await page.click("[data-action=cancel-yes]")
        await page.wait_for_selector("#outcome[data-outcome=CANCELLED]", timeout=15_000)
        assert await page.query_selector("#details") is None  # nothing left to fill in
        assert await page.evaluate("() => window.__noReload === true"), "the page was reloaded"
        assert "CANCELLED" in str(await page.text_content("#outcome h2"))
        await shot(page, "8-cancelled")
        assert not errors, errors
        await context.close()
    finally:
        await other_gateway.stop()
