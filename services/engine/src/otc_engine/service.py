"""The engine's shell: load a deal, ask the rules, store the result and its events in one transaction."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from otc_common import subjects
from otc_common.addresses import AddressError
from otc_common.bus import emit, emitted_together
from otc_common.db import Connection, Pool
from otc_common.errors import AppError, ErrorCode
from otc_common.keys import EscrowKeyring
from otc_common.messages import (
    CancelDealParams,
    CreateDealParams,
    DealCreated,
    DealSide,
    EscrowAssigned,
    FillPartyDetailsParams,
    Party,
    PartyDetailsFilled,
    SideParams,
    Stage,
    StatusParams,
)
from otc_common.money import AmountError, bps_of, format_amount, parse_amount
from otc_common.registry import Asset, Chain, ChainKind, Registry
from otc_engine import ledger, rules, store
from otc_engine.flow import DealFacts as DealFactsType
from otc_engine.flow import Flow, load
from otc_engine.rules import Transition


def now_utc() -> datetime:
    return datetime.now(UTC)


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_matches(token: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_token(token), bytes(stored_hash))


class Engine:
    def __init__(self, pool: Pool, registry: Registry, post_close_window: timedelta = timedelta(days=7)) -> None:
        self.pool = pool
        self.registry = registry
        self.flow = Flow(registry, post_close_window)
        self.keyrings = {
            chain.id: EscrowKeyring(chain.account_xpub, chain.derivation_path) for chain in registry.chains.values()
        }

    # ----------------------------------------------------------------- helpers

    def _chain(self, chain_id: str, field: str) -> Chain:
        chain = self.registry.chains.get(chain_id)
        if chain is None:
            known = ", ".join(sorted(self.registry.chains))
            raise AppError(ErrorCode.UNKNOWN_CHAIN, f"{field}: unknown chain {chain_id!r}; known chains: {known}")
        return chain

    def _side_asset(self, side: SideParams, field: str) -> tuple[Chain, Asset, int]:
        chain = self._chain(side.chain_id, f"{field}.chainId")
        asset = chain.find_asset(side.asset)
        if asset is None:
            known = ", ".join(sorted(chain.assets))
            raise AppError(
                ErrorCode.UNKNOWN_ASSET,
                f"{field}.asset: {side.asset!r} is not traded on {chain.id}; choose {known}",
            )
        try:
            amount = parse_amount(side.amount, asset.decimals, max_base_units=asset.max_amount, symbol=asset.symbol)
        except AmountError as exc:
            raise AppError(ErrorCode.INVALID_AMOUNT, f"{field}.amount: {exc}") from None
        return chain, asset, amount

    def escrow_address(self, chain: Chain, index: int) -> str:
        keyring = self.keyrings[chain.id]
        if chain.kind is ChainKind.EVM:
            return keyring.evm_address(index)
        assert chain.hrp is not None
        return keyring.utxo_address(index, chain.hrp)

    async def _emit_deal_event(
        self, conn: Connection, deal_id: str, event: Any, detail: dict[str, Any], now: datetime
    ) -> None:
        await self.flow.emit_deal_event(conn, deal_id, event, detail, now)

    async def advance(
        self, conn: Connection, deal_id: str, now: datetime, locked: asyncpg.Record | None = None
    ) -> list[Transition]:
        """Re-evaluates a deal the caller has locked (`locked`: its row, if unchanged since)."""
        return await self.flow.advance(conn, deal_id, now, locked)

    async def advance_all(self, conn: Connection, deal_ids: Iterable[str], now: datetime) -> None:
        """Locks the deals in id order and re-evaluates each (a run of bus events)."""
        await self.flow.advance_all(conn, deal_ids, now)

    async def _locked_deal(self, conn: Connection, deal_id: str) -> asyncpg.Record:
        deal = await store.lock_deal(conn, deal_id)
        if deal is None:
            raise AppError(ErrorCode.DEAL_NOT_FOUND, f"no deal with id {deal_id!r}")
        return deal

    @staticmethod
    def _party_of(token: str, sides: dict[Party, asyncpg.Record]) -> Party | None:
        # Compare against both so the time taken does not tell which party a token belongs to.
        matches = [party for party, row in sides.items() if token_matches(token, row["token_hash"])]
        return matches[0] if matches else None

    # ----------------------------------------------------------------- commands

    async def create_deal(self, params: CreateDealParams) -> dict[str, Any]:
        alice_chain, alice_asset, alice_amount = self._side_asset(params.alice, "alice")
        bob_chain, bob_asset, bob_amount = self._side_asset(params.bob, "bob")
        if alice_chain.id == bob_chain.id and alice_asset.symbol == bob_asset.symbol:
            raise AppError(ErrorCode.UNKNOWN_ASSET, "bob.asset: both sides trade the same asset on the same chain")
        low = max(alice_chain.min_timeout_seconds, bob_chain.min_timeout_seconds)
        high = min(alice_chain.max_timeout_seconds, bob_chain.max_timeout_seconds)
        if not low <= params.timeout_seconds <= high:
            raise AppError(
                ErrorCode.INVALID_TIMEOUT, f"timeoutSeconds must be between {low} and {high} for these chains"
            )
        deal_id = secrets.token_hex(10)
        tokens = {Party.ALICE: secrets.token_urlsafe(24), Party.BOB: secrets.token_urlsafe(24)}
        name = (
            params.name.strip()
            if params.name and params.name.strip()
            else (f"{params.alice.amount} {alice_asset.symbol} ⇄ {params.bob.amount} {bob_asset.symbol}")
        )
        now = now_utc()
        async with self.pool.acquire() as conn, conn.transaction(), emitted_together(conn):
            sides = []
            for party, chain, asset, amount in (
                (Party.ALICE, alice_chain, alice_asset, alice_amount),
                (Party.BOB, bob_chain, bob_asset, bob_amount),
            ):
                index = await store.next_escrow_index(conn)
                sides.append(
                    store.NewSide(
                        party=party,
                        chain=chain.id,
                        asset=asset.symbol,
                        amount=amount,
                        commission=bps_of(amount, asset.commission_bps) + asset.fixed_fee,
                        fee_reserve=asset.fee_reserve if asset.native else 0,
                        escrow_index=index,
                        escrow_address=self.escrow_address(chain, index),
                        token_hash=hash_token(tokens[party]),
                    )
                )
            await store.insert_deal(conn, deal_id, name, params.timeout_seconds, sides)
            created = DealCreated(
                deal_id=deal_id,
                name=name,
                alice=DealSide(chain=alice_chain.id, asset=alice_asset.symbol, amount=alice_amount),
                bob=DealSide(chain=bob_chain.id, asset=bob_asset.symbol, amount=bob_amount),
                timeout_seconds=params.timeout_seconds,
            )
            await self._emit_deal_event(conn, deal_id, created, {"name": name}, now)
            for side in sides:
                await emit(
                    conn,
                    subjects.deal(deal_id),
                    EscrowAssigned(
                        deal_id=deal_id,
                        party=side.party,
                        chain=side.chain,
                        asset=side.asset,
                        address=side.escrow_address,
                        escrow_index=side.escrow_index,
                    ),
                )
        return {
            "dealId": deal_id,
            "name": name,
            "aliceToken": tokens[Party.ALICE],
            "bobToken": tokens[Party.BOB],
        }

    async def fill_party_details(self, params: FillPartyDetailsParams) -> dict[str, Any]:
        now = now_utc()
        async with self.pool.acquire() as conn, conn.transaction(), emitted_together(conn):
            deal = await self._locked_deal(conn, params.deal_id)
            sides = await store.get_sides(conn, params.deal_id)
            own = sides[params.party]
            if not token_matches(params.token, own["token_hash"]):
                raise AppError(ErrorCode.INVALID_TOKEN, f"the token is not valid for party {params.party.value}")
            if deal["stage"] != Stage.CREATED.value:
                raise AppError(
                    ErrorCode.WRONG_STAGE,
                    f"details can be filled only while the deal is CREATED; it is {deal['stage']}",
                )
            if own["filled_at"] is not None:
                raise AppError(ErrorCode.DETAILS_ALREADY_FILLED, "details were already filled and cannot be changed")
            other = sides[Party.BOB if params.party is Party.ALICE else Party.ALICE]
            send_chain = self.registry.chain(own["chain"])
            receive_chain = self.registry.chain(other["chain"])
            try:
                payback = send_chain.validate_address(params.payback_address)
            except AddressError as exc:
                raise AppError(
                    ErrorCode.INVALID_ADDRESS, f"paybackAddress: not a valid {send_chain.id} address: {exc}"
                ) from None
            try:
                recipient = receive_chain.validate_address(params.recipient_address)
            except AddressError as exc:
                raise AppError(
                    ErrorCode.INVALID_ADDRESS,
                    f"recipientAddress: not a valid {receive_chain.id} address: {exc}",
                ) from None
            await store.fill_party(conn, params.deal_id, params.party, payback, recipient, params.email, now)
            await self._emit_deal_event(
                conn,
                params.deal_id,
                PartyDetailsFilled(
                    deal_id=params.deal_id,
                    party=params.party,
                    payback_address=payback,
                    recipient_address=recipient,
                ),
                {"party": params.party.value},
                now,
            )
            if other["filled_at"] is not None:
                # Both parties' details are in: the deal moves on. (Before that nothing about a CREATED deal depends
                # on its details: no transition, no transfer, and deposits are taken up as they are seen.) Filling
                # changes the sides, not the deal's row: the one locked above is current.
                await self.advance(conn, params.deal_id, now, deal)
        return {"ok": True}

    async def cancel_deal(self, params: CancelDealParams) -> dict[str, Any]:
        now = now_utc()
        async with self.pool.acquire() as conn, conn.transaction(), emitted_together(conn):
            deal = await self._locked_deal(conn, params.deal_id)
            sides = await store.get_sides(conn, params.deal_id)
            if self._party_of(params.token, sides) is None:
                raise AppError(ErrorCode.INVALID_TOKEN, "the token is not valid for this deal")
            state = store.deal_state(deal, sides)
            try:
                transitions = rules.cancel(state, now)
            except rules.RuleViolation as exc:
                raise AppError(ErrorCode.WRONG_STAGE, str(exc)) from None
            await store.mark_cancelled(conn, params.deal_id)
            await self.flow.apply(conn, params.deal_id, transitions, now)
            transitions += await self.flow.advance(conn, params.deal_id, now)
        return {"ok": True, "stage": transitions[-1].stage.value}

    async def status(self, params: StatusParams) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            deal = await store.get_deal(conn, params.deal_id)
            if deal is None:
                raise AppError(ErrorCode.DEAL_NOT_FOUND, f"no deal with id {params.deal_id!r}")
            sides = await store.get_sides(conn, params.deal_id)
            viewer: Party | None = None
            if params.token is not None:
                viewer = self._party_of(params.token, sides)
                if viewer is None:
                    raise AppError(ErrorCode.INVALID_TOKEN, "the token is not valid for this deal")
            events = await store.events(conn, params.deal_id)
            facts = await load(conn, params.deal_id, self.registry)
        assert facts is not None
        view = self._status_view(deal, sides, events, viewer is not None, facts)
        view["viewer"] = viewer.value if viewer is not None else None
        return view

    def _status_view(
        self,
        deal: asyncpg.Record,
        sides: dict[Party, asyncpg.Record],
        events: list[asyncpg.Record],
        authorised: bool,
        facts: DealFactsType,
    ) -> dict[str, Any]:
        def party_view(row: asyncpg.Record) -> dict[str, Any]:
            asset = self.registry.chain(row["chain"]).assets[row["asset"]]
            view: dict[str, Any] = {
                "chainId": row["chain"],
                "asset": row["asset"],
                "amount": format_amount(int(row["amount"]), asset.decimals),
                "filled": row["filled_at"] is not None,
                "paybackAddress": row["payback_address"],
                "recipientAddress": row["recipient_address"],
            }
            if authorised:
                view["email"] = row["email"]
            return view

        def instructions(row: asyncpg.Record) -> dict[str, Any] | None:
            if row["filled_at"] is None:
                return None
            asset = self.registry.chain(row["chain"]).assets[row["asset"]]
            amount, commission, reserve = int(row["amount"]), int(row["commission"]), int(row["fee_reserve"])
            return {
                "chainId": row["chain"],
                "asset": row["asset"],
                "to": row["escrow_address"],
                "amount": format_amount(amount + commission + reserve, asset.decimals),
                "breakdown": {
                    "tradeAmount": format_amount(amount, asset.decimals),
                    "commission": format_amount(commission, asset.decimals),
                    "networkFeeReserve": format_amount(reserve, asset.decimals),
                },
            }

        deadline = deal["expires_at"] if deal["stage"] == Stage.COLLECTION.value else None

        def collection(party: Party) -> dict[str, Any]:
            row = sides[party]
            decimals = self.registry.chain(row["chain"]).assets[row["asset"]].decimals
            escrow = facts.escrows[party]
            required = escrow.amount + escrow.commission + escrow.fee_reserve
            return {
                "deposited": format_amount(escrow.mined_total(), decimals),
                "confirmed": format_amount(escrow.confirmed_total, decimals),
                "locked": escrow.locked_total(deadline) >= required,
                "deposits": [
                    {
                        "txid": d["txid"],
                        "index": d["idx"],
                        "amount": format_amount(int(d["amount"]), decimals),
                        "confirmations": escrow.confirmations(
                            ledger.DepositFact(amount=0, block_number=d["block_number"], block_time=None)
                        ),
                        "blockHeight": d["block_number"],
                    }
                    for d in facts.deposits
                    # Tank gas arriving in a token escrow is not the party's deposit.
                    if d["party"] == party.value and d["asset"] == row["asset"]
                ],
            }

        def transfer(row: asyncpg.Record) -> dict[str, Any]:
            asset = self.registry.chain(row["chain"]).assets[row["asset"]]
            return {
                "purpose": row["purpose"],
                "chainId": row["chain"],
                "asset": row["asset"],
                "amount": format_amount(int(row["amount"]), asset.decimals),
                "to": row["to_address"],
                "txid": row["txid"],
                "status": row["status"],
                "confirmations": row["confirmations"],
            }

        expires_at = deal["expires_at"]
        return {
            "dealId": deal["deal_id"],
            "name": deal["name"],
            "stage": deal["stage"],
            "outcome": deal["outcome"],
            "timeoutSeconds": deal["timeout_seconds"],
            "expiresAt": expires_at.isoformat() if expires_at else None,
            "remainingSeconds": (deal["remaining_ms"] // 1000) if deal["remaining_ms"] is not None else None,
            "createdAt": deal["created_at"].isoformat(),
            "alice": party_view(sides[Party.ALICE]),
            "bob": party_view(sides[Party.BOB]),
            "instructions": {
                "alice": instructions(sides[Party.ALICE]),
                "bob": instructions(sides[Party.BOB]),
            },
            "collection": {"alice": collection(Party.ALICE), "bob": collection(Party.BOB)},
            "transfers": [transfer(t) for t in facts.transfers],
            "events": [{"type": e["type"], "at": e["at"].isoformat(), "detail": _json(e["detail"])} for e in events],
        }


def _json(value: Any) -> Any:
    import msgspec

    return msgspec.json.decode(value) if isinstance(value, str | bytes) else value
