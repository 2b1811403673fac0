"""The shell around the rules: bus handlers, one worker per sending address, and a periodic sweep.

Handlers only record (a command, a deal's addresses, where a transaction stands) inside the inbox
transaction and, once it has committed, wake the worker of the sender concerned. A worker does a
sender's work one step at a time, so a sender's transfers are signed in arrival order and its
nonces follow each other; different senders' workers run side by side.

Signing: check a sender's queued transfers against their deals, read the chain, then in one
transaction lock the sender, take its next nonces, sign, store the candidates and the
TransferSubmitted events; only after the commit are the stored bytes broadcast. A transaction its
watcher reports at the threshold is confirmed by the consumer run that gets the report, once the
node (or Electrum server) shows it there too; everything else after broadcast (re-broadcasts, fee
bumps, reorged or disputed confirmations) is the worker's, from the stored candidates and what the
chain shows. UTXO chains have no nonces: their workers hand both steps to `utxo_flow`, which
reserves escrow outputs instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from otc_common import metrics as common_metrics
from otc_common import subjects
from otc_common.addresses import AddressError, evm_checksum_address, validate_utxo_address
from otc_common.bus import Bus, ConsumerRunner, emit, emitted_together
from otc_common.db import DATABASE_TRANSIENT, Connection, Pool
from otc_common.electrum import ElectrumClient, ElectrumTimeout, ElectrumUnavailable
from otc_common.keys import EscrowKeyring
from otc_common.messages import (
    AlertRaised,
    Envelope,
    EscrowAssigned,
    Message,
    Party,
    PartyDetailsFilled,
    PayoutCommand,
    TransferConfirmed,
    TransferFailed,
    TransferProgress,
    TransferSubmitted,
    TxConfirmation,
    stable_event_id,
)
from otc_common.registry import Chain, ChainKind, Registry
from otc_common.runtime import Loop, Service
from otc_common.settings import ConfigError
from otc_common.signing_keys import Seed
from otc_common.subjects import ConsumerSpec
from otc_queue import metrics, rules, store, utxo_store
from otc_queue.backend import ChainBackend, Sent, Signed
from otc_queue.evm import EvmBackend
from otc_queue.rpc import JsonRpc, RpcError, RpcUnavailable
from otc_queue.rules import Allowed, ChainFacts, Missing, PartyFact, Refused, TransferOrder, Wait
from otc_queue.settings import QueueSettings
from otc_queue.store import InFlight, StoredCandidate
from otc_queue.utxo import UtxoBackend
from otc_queue.utxo_flow import UtxoPayouts

log = logging.getLogger("otc.queue")

SOURCE = "queue-processor"


# Commands and confirmations of different chains touch different rows: one consumer per chain lets
# a busy chain's backlog wait on the database without holding up the others.
def commands_spec(chain: str) -> ConsumerSpec:
    return ConsumerSpec(
        durable=f"queue-processor-commands-{chain}", stream="QUEUE", filter_subjects=[subjects.queue_command(chain)]
    )


def confirmations_spec(chain: str) -> ConsumerSpec:
    return ConsumerSpec(
        durable=f"queue-processor-chain-{chain}",
        stream="CHAIN",
        filter_subjects=[subjects.chain_event(chain, "confirmation")],
    )


DEALS = ConsumerSpec(
    durable="queue-processor-deals",
    stream="DEALS",
    filter_subjects=[subjects.ALL_DEALS],
    types=frozenset({EscrowAssigned.TYPE, PartyDetailsFilled.TYPE}),
)

#: Without news from its chain, a sender's transactions in flight are looked at every this many sweeps.
IN_FLIGHT_RECHECK_SWEEPS = 5
#: Failures a worker waits out: the sweep wakes it again.
TRANSIENT: tuple[type[Exception], ...] = (RpcUnavailable, RpcError, *DATABASE_TRANSIENT)
#: A node or Electrum server that gave no usable answer.
UNREACHABLE: tuple[type[Exception], ...] = (RpcUnavailable, RpcError, ElectrumUnavailable, ElectrumTimeout)

#: Queued transfers a sender's worker reads at once.
QUEUED_READ = 8
#: Deals whose facts are kept in memory (they are immutable once complete).
DEAL_CACHE_SIZE = 10_000

SenderKey = tuple[str, str]


class RunNotes:
    """What one consumer run noted: the senders to wake once it has committed, and rows read for the whole run."""

    def __init__(self) -> None:
        self.wakes: list[tuple[SenderKey, bool, bool]] = []
        #: The candidate each transaction id of the run belongs to, by (chain, txid); None: not one of ours.
        self.owners: dict[SenderKey, asyncpg.Record | None] = {}
        #: The deals the run's deal events are about: their senders with queued transfers are woken after the commit.
        self.deals: set[str] = set()
        #: The run's commands, with when each was sent, stored together when the run ends.
        self.commands: list[tuple[PayoutCommand, datetime]] = []
        #: Where transfers stand below the threshold (the latest report of the run each), written at its end.
        self.standings: dict[str, tuple[store.Standing, str, str, str | None]] = {}
        #: The blocks candidates were seen mined in, by chain and txid, written at the run's end.
        self.mined: dict[str, dict[str, tuple[int, str | None]]] = {}
        #: Per chain, the node's tip and the receipts of the run's transactions reported at the threshold, read once
        #: for the run; a chain whose node could not be read is left out.
        self.at_node: dict[str, tuple[int, dict[str, rules.Receipt]]] = {}
        #: For UTXO chains: per chain, the server's tip and the heights of the transactions in the histories of the
        #: escrows whose one-transaction transfers the run's reports put at the threshold.
        self.at_server: dict[str, tuple[int, dict[str, int]]] = {}
        #: Transfers the node or server shows at the threshold, recorded as done at the run's end: (owner row,
        #: outcome) by transfer id.
        self.confirmed: dict[str, tuple[asyncpg.Record, store.Outcome]] = {}
        #: The run's escrows and parties' details, stored together when the run ends.
        self.escrows: list[EscrowAssigned] = []
        self.parties: list[PartyDetailsFilled] = []

    def wake(self, key: SenderKey, *, sign: bool = False, check: bool = False) -> None:
        self.wakes.append((key, sign, check))

    def clear(self) -> None:
        self.wakes.clear()
        self.owners.clear()
        self.deals.clear()
        self.commands.clear()
        self.standings.clear()
        self.mined.clear()
        self.at_node.clear()
        self.confirmed.clear()
        self.at_server.clear()
        self.escrows.clear()
        self.parties.clear()


TouchingHandler = Callable[[Connection, Envelope, Message, RunNotes], Awaitable[None]]
RunPreparer = Callable[[Connection, Sequence[tuple[Envelope, Message]], RunNotes], Awaitable[None]]
RunFinisher = Callable[[Connection, RunNotes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RunSteps:
    """A consumer's handler and, around it, what is done once per run of events: `prepare` reads what the run's
    new events need with a statement or two before they are handled (it must not write: a run may leave some of
    them to the next), `finish` writes what the handler noted before the run commits. On the queue processor's
    busy event loop every round trip costs a turn of the loop, so a consumer that makes one per event falls
    behind."""

    handle: TouchingHandler
    prepare: RunPreparer | None = None
    finish: RunFinisher | None = None


def canonical_address(chain: Chain, text: str) -> str | None:
    """One spelling per address, so a sender is one worker and one nonce row whatever the case."""
    try:
        if chain.kind is ChainKind.EVM:
            return evm_checksum_address(text)
        assert chain.hrp is not None
        return validate_utxo_address(text.lower(), chain.hrp)
    except (ValueError, AddressError):
        return None


class WakingRunner(ConsumerRunner):
    """A consumer whose handler notes the senders it touched; they are woken after the commit."""

    def __init__(self, bus: Bus, pool: Pool, spec: ConsumerSpec, steps: RunSteps, processor: Processor):
        self._notes = RunNotes()
        self._steps = steps

        async def run(conn: Connection, envelope: Envelope, message: Message) -> None:
            await steps.handle(conn, envelope, message, self._notes)

        super().__init__(bus, pool, spec, run)
        self._processor = processor

    def before_transaction(self) -> None:
        self._notes.clear()

    async def before_handling(self, conn: Connection, fresh: Sequence[tuple[Envelope, Message]]) -> None:
        if self._steps.prepare is not None:
            await self._steps.prepare(conn, fresh, self._notes)

    async def before_commit(self, conn: Connection) -> None:
        if self._steps.finish is not None:
            await self._steps.finish(conn, self._notes)

    def after_transaction(self) -> None:
        for (chain, sender), sign, check in self._notes.wakes:
            self._processor.wake(chain, sender, sign=sign, check=check)
        if self._notes.deals:
            self._processor.wake_senders_of(self._notes.deals)
        self._notes.clear()


class Worker:
    """A sender's work, one step at a time: look after what is in flight, sign what is queued."""

    def __init__(self, processor: Processor, chain: str, sender: str) -> None:
        self.processor = processor
        self.chain = chain
        self.sender = sender
        self.sign_due = False
        self.check_due = False
        self.task: asyncio.Task[None] | None = None

    def poke(self, *, sign: bool, check: bool) -> None:
        self.sign_due |= sign
        self.check_due |= check
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.run(), name=f"sender:{self.chain}:{self.sender}")

    async def run(self) -> None:
        try:
            while (self.sign_due or self.check_due) and not self.processor.stopping:
                # What is already signed goes first: after a restart, its stored bytes reach the node
                # before anything signed at a higher nonce.
                async with self.processor.sender_slots:
                    if self.check_due:
                        self.check_due = False
                        self.processor.looked_at[(self.chain, self.sender)] = time.monotonic()
                        await self.processor.reconcile(self)
                    else:
                        self.sign_due = False
                        await self.processor.sign_queued(self)
        except TRANSIENT as exc:
            # The sweep wakes this sender again, at its next round rather than after the in-flight recheck interval;
            # nothing is lost, the database holds the state.
            self.processor.looked_at.pop((self.chain, self.sender), None)
            log.warning(
                "sender work interrupted: %s",
                exc,
                extra={"chain": self.chain, "sender": self.sender, "error": type(exc).__name__},
            )
            self.sign_due = self.check_due = False
        except Exception:
            log.exception("sender work failed", extra={"chain": self.chain, "sender": self.sender})
            self.sign_due = self.check_due = False
        finally:
            if not (self.sign_due or self.check_due):
                self.processor.retire(self)


class Processor:
    def __init__(self, service: Service, settings: QueueSettings, seed: Seed) -> None:
        self.service = service
        self.settings = settings
        self._seed = seed
        self.backends: dict[str, ChainBackend] = {}
        #: UTXO chains sign and follow their multi-transaction transfers in their own flow.
        self.utxo: dict[str, UtxoPayouts] = {}
        self.facts: dict[str, ChainFacts] = {}
        self.workers: dict[SenderKey, Worker] = {}
        #: Post-commit wake-ups in flight (kept referenced until done).
        self._background: set[asyncio.Task[None]] = set()
        #: Senders whose work runs at once. With a thousand, every round trip of a transaction waited for a turn of
        #: an event loop shared by a thousand workers, so transactions held their connection for seconds (p90 1.3-3 s)
        #: and the others waited for it; at 50 (twice the senders' pool) the p90 is 0.2 s. 1,000 deals: 66 s at 50,
        #: 70 s at 100, 72-76 s at 1,000.
        self.sender_slots = asyncio.Semaphore(settings.concurrent_senders)
        #: When each sender's transactions in flight were last looked at (monotonic seconds).
        self.looked_at: dict[SenderKey, float] = {}
        self.recheck_seconds = IN_FLIGHT_RECHECK_SWEEPS * settings.poll_seconds
        self._waiting: dict[str, str] = {}
        self._alerted: set[str] = set()
        self._nonce_taken_since: dict[str, float] = {}
        self._last_send: dict[str, Sent] = {}
        self.stopping = False
        self._deals: OrderedDict[SenderKey, tuple[rules.EscrowFact, dict[Party, PartyFact]]] = OrderedDict()
        self._senders_db: Pool | None = None

    @property
    def pool(self) -> Pool:
        """The sending workers' and the sweep's connections. The consumers have the service's own: a busy sender
        pool once kept each consumer run waiting a quarter of a second for a connection, and commands and
        confirmations fell ten seconds behind."""
        assert self._senders_db is not None, "processor not started"
        return self._senders_db

    @property
    def registry(self) -> Registry:
        assert self.service.registry is not None
        return self.service.registry

    # ----------------------------------------------------------------- start-up

    async def start(self) -> None:
        self._senders_db = await self.service.open_pool(self.settings.sender_db_pool_size)
        for chain in self.registry.chains.values():
            self.facts[chain.id] = ChainFacts(
                id=chain.id,
                operator_address=chain.operator_address,
                tank_address=chain.tank_address,
                native_asset=chain.native_asset.symbol,
                assets=frozenset(chain.assets),
            )
            if chain.kind is ChainKind.EVM:
                assert chain.rpc is not None
                backend = EvmBackend(chain, self._seed, JsonRpc(chain.id, chain.rpc, self.settings.rpc_timeout_seconds))
                # The seed must be the one behind the registry's xpub, or every escrow check would fail.
                expected = EscrowKeyring(chain.account_xpub, chain.derivation_path).evm_address(0)
                if backend.escrow_address(0) != expected:
                    raise ConfigError(f"OTC_SEED does not match the account_xpub of chain {chain.id}")
                self.backends[chain.id] = backend
            elif chain.kind is ChainKind.UTXO:
                self.utxo[chain.id] = await self._utxo_payouts(chain)
        consumers: list[tuple[ConsumerSpec, RunSteps]] = [
            (DEALS, RunSteps(self.on_deal, finish=self.record_deal_facts))
        ]
        for chain_id in sorted(self.registry.chains):
            consumers.append((commands_spec(chain_id), RunSteps(self.on_command, finish=self.record_commands)))
            consumers.append(
                (
                    confirmations_spec(chain_id),
                    RunSteps(self.on_confirmation, self.read_owners, self.record_standings),
                )
            )
        for spec, steps in consumers:
            await self.service.nats.provision_consumer(spec)
            self.service.consumers.append(WakingRunner(self.service.nats, self.service.db, spec, steps, self))
        log.info("signing for chains", extra={"chains": sorted([*self.backends, *self.utxo])})

    async def _utxo_payouts(self, chain: Chain) -> UtxoPayouts:
        assert chain.electrum is not None and chain.hrp is not None
        chain_id = chain.id

        def count(method: str) -> None:
            metrics.RPC_CALLS.labels(chain_id, method).inc()

        client = ElectrumClient(
            chain.electrum,
            client_name="otc-queue-processor",
            request_timeout=self.settings.rpc_timeout_seconds,
            on_request=count,
        )
        backend = UtxoBackend(chain, self._seed, client, self.settings)
        # The seed must be the one behind the registry's xpub, or every escrow check would fail.
        expected = EscrowKeyring(chain.account_xpub, chain.derivation_path).utxo_address(0, chain.hrp)
        if backend.escrow_address(0) != expected:
            raise ConfigError(f"OTC_SEED does not match the account_xpub of chain {chain.id}")
        # Connects in the background (and reconnects forever): a server that is down delays its
        # chain's payouts, not the start of the others.
        await client.start()
        return UtxoPayouts(self, backend)

    async def sweep(self, loop: Loop) -> None:
        """Wakes every sender with work: retries waiting transfers, checks in-flight ones (and, at
        start-up, re-broadcasts whatever was stored but not mined)."""
        try:
            while not self.stopping:
                loop.beat()
                try:
                    work = await store.senders_with_work(self.pool)
                    now = time.monotonic()
                    for item in work:
                        key = (item.chain, item.sender)
                        if key in self.workers:
                            # Its worker is at it: it signs whatever is queued before it stops. (Waking it again would
                            # only cost it another look at the database.)
                            continue
                        # Transactions in flight are looked at when their chain has news (a confirmation
                        # event); the sweep only makes up for news that never came.
                        check = item.in_flight and now - self.looked_at.get(key, 0.0) >= self.recheck_seconds
                        if item.queued or check:
                            self.wake(item.chain, item.sender, sign=item.queued, check=check)
                    current = {(item.chain, item.sender) for item in work}
                    for key in [key for key in self.looked_at if key not in current]:
                        del self.looked_at[key]
                    ages = await store.oldest_open(self.pool)
                    for chain_id in self.facts:
                        metrics.OLDEST_UNCONFIRMED.labels(chain_id).set(ages.get(chain_id, 0.0))
                except TRANSIENT as exc:
                    log.warning("sweep failed: %s", exc)
                await asyncio.sleep(self.settings.poll_seconds)
        finally:
            for backend in self.backends.values():
                await backend.close()
            for payouts in self.utxo.values():
                await payouts.close()

    def stop(self) -> None:
        """On SIGTERM: no new steps; a step under way finishes or is cut off, the database decides which."""
        self.stopping = True

    def wake(self, chain: str, sender: str, *, sign: bool, check: bool) -> None:
        if self.stopping:
            return
        key = (chain, sender)
        worker = self.workers.get(key)
        if worker is None:
            worker = self.workers[key] = Worker(self, chain, sender)
        worker.poke(sign=sign, check=check)

    def wake_senders_of(self, deal_ids: set[str]) -> None:
        """Once a run of deal events has committed, wakes the senders with queued transfers of those deals: a command
        that arrived before its deal's facts waits for them. Read after the commit, so that no command is missed: one
        stored after this read wakes its own sender, which then finds the facts."""
        task = asyncio.create_task(self._wake_senders_of(sorted(deal_ids)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _wake_senders_of(self, deal_ids: list[str]) -> None:
        try:
            found = await store.open_senders_of_deals(self.pool, deal_ids)
        except TRANSIENT as exc:
            log.warning("senders waiting for deal facts left to the sweep: %s", exc)
            return
        for senders in found.values():
            for chain, sender in senders:
                self.wake(chain, sender, sign=True, check=False)

    def retire(self, worker: Worker) -> None:
        if self.workers.get((worker.chain, worker.sender)) is worker:
            del self.workers[(worker.chain, worker.sender)]

    # ----------------------------------------------------------------- alerts and notes

    async def _alert_in(
        self, conn: Connection, kind: str, detail: str, chain: str | None = None, deal_id: str | None = None
    ) -> None:
        """An alert published with the state change that caused it."""
        common_metrics.ALERTS.labels(SOURCE, kind).inc()
        log.error("alert %s: %s", kind, detail, extra={"chain": chain, "deal_id": deal_id})
        await emit(
            conn,
            subjects.alert(SOURCE),
            AlertRaised(source=SOURCE, kind=kind, detail=detail, chain=chain, deal_id=deal_id),
        )

    async def _alert_once(self, key: str, kind: str, detail: str, chain: str, deal_id: str | None = None) -> None:
        if key in self._alerted:
            return
        self._alerted.add(key)
        await self.service.nats.raise_alert(kind, detail, chain=chain, deal_id=deal_id)

    async def _waits(self, row: asyncpg.Record, reason: str) -> None:
        """A transfer that cannot be signed yet: logged when the reason changes, alerted if it lasts."""
        transfer_id = row["transfer_id"]
        if self._waiting.get(transfer_id) != reason:
            self._waiting[transfer_id] = reason
            log.info(
                "waiting: %s",
                reason,
                extra={"transfer_id": transfer_id, "deal_id": row["deal_id"], "chain": row["chain"]},
            )
        waited = time.time() - row["received_at"].timestamp()
        if waited > self.settings.stuck_alert_seconds:
            await self._alert_once(
                f"stuck:{transfer_id}",
                "transfer_waiting",
                f"{transfer_id} has waited {waited:.0f}s: {reason}",
                row["chain"],
                row["deal_id"],
            )

    # ----------------------------------------------------------------- bus handlers

    def _command_of(self, message: PayoutCommand) -> tuple[Chain | None, str | None, PayoutCommand]:
        """The command's chain and sending address (None if unknown or malformed), and the command with that
        address spelled canonically."""
        chain = self.registry.chains.get(message.chain)
        sender = canonical_address(chain, message.escrow_address) if chain is not None else None
        return chain, sender, message if sender is None else _with_sender(message, sender)

    async def on_command(self, conn: Connection, envelope: Envelope, message: Message, notes: RunNotes) -> None:
        if isinstance(message, PayoutCommand):
            notes.commands.append((message, envelope.occurred_at))

    async def record_commands(self, conn: Connection, notes: RunNotes) -> None:
        """Stores a run's commands with one statement, then takes up the new ones: each is refused, or its sender
        is woken after the commit. (Done when the run ends, so only the events the run handles take effect.)"""
        if not notes.commands:
            return
        received = datetime.now(UTC)
        commands = [(message, commanded, *self._command_of(message)) for message, commanded in notes.commands]
        new = await store.add_transfers(conn, [(cmd, commanded, received) for _, commanded, _, _, cmd in commands])
        for message, _, chain, sender, cmd in commands:
            if message.transfer_id not in new:
                existing = await store.transfer(conn, message.transfer_id)
                if existing is not None and store.order_of(existing) != _order(cmd):
                    await self._alert_in(
                        conn,
                        "conflicting_command",
                        f"{message.transfer_id} commanded again with different terms; the first stands",
                        message.chain,
                        message.deal_id,
                    )
                continue
            new.discard(message.transfer_id)  # a second command with the id later in the run is not new
            log.info(
                "command received",
                extra={
                    "transfer_id": message.transfer_id,
                    "deal_id": message.deal_id,
                    "chain": message.chain,
                    "purpose": message.purpose.value,
                    "amount": message.amount,
                },
            )
            if chain is None or sender is None:
                why = "unknown chain" if chain is None else "malformed escrow address"
                await self._refuse_in(conn, _order(cmd), f"{why}: {message.chain} {message.escrow_address}")
                continue
            notes.wake((chain.id, sender), sign=True)

    async def on_confirmation(self, conn: Connection, envelope: Envelope, message: Message, notes: RunNotes) -> None:
        if not isinstance(message, TxConfirmation):
            return
        txid = message.txid.lower()
        kind = utxo_store if message.chain in self.utxo else store
        key = (message.chain, txid)
        owner = notes.owners[key] if key in notes.owners else await kind.candidate_owner(conn, message.chain, txid)
        if owner is None or owner["status"] != "SIGNED":
            return
        backend = self.backends.get(message.chain)
        payouts = self.utxo.get(message.chain)
        known = self.registry.chains.get(message.chain)
        threshold = known.confirmations if known is not None else 0
        # A transfer of one transaction stands where its transaction does; one of several UTXO transactions stands
        # where its least confirmed one does, which its worker's look tells.
        reported = backend is not None or (payouts is not None and owner["legs"] == 1)
        progress = (
            reported and message.success and 0 < message.confirmations < threshold and message.block_number is not None
        )
        if progress:
            # On its way to the threshold the watcher's count is the progress, written when the run ends. Reported at
            # the threshold, it is done once the node or the Electrum server shows it there too; reported unmined, or
            # at the threshold the server does not show yet, the sender's worker looks.
            assert message.block_number is not None
            self.looked_at[(message.chain, owner["escrow_address"])] = time.monotonic()
            standing = store.Standing(owner["transfer_id"], txid, message.block_number, message.confirmations)
            notes.standings[owner["transfer_id"]] = (standing, owner["deal_id"], message.chain, message.block_hash)
        noted = (owner["mined_block"], owner["mined_hash"]) == (message.block_number, message.block_hash)
        if message.confirmations > 0 and message.block_number is not None and not noted:
            # Remembered (once per block) so that, should a reorg unmine it, these same bytes go out again.
            notes.mined.setdefault(message.chain, {})[txid] = (message.block_number, message.block_hash)
        if progress:
            return
        at_server = notes.at_server.get(message.chain)
        height = at_server[1].get(txid, 0) if at_server is not None else 0
        if reported and at_server is not None and height > 0 and at_server[0] - height + 1 >= threshold:
            # The Electrum server agrees that it is at the threshold: done here, without the worker's look.
            notes.confirmed[owner["transfer_id"]] = (
                owner,
                store.Outcome(
                    transfer_id=owner["transfer_id"],
                    txid=txid,
                    block_number=height,
                    confirmations=at_server[0] - height + 1,
                    amount_sent=int(owner["to_value"]),
                    fee_paid=int(owner["fee"]),
                    success=True,
                    reason=None,
                ),
            )
            return
        at_node = notes.at_node.get(message.chain)
        receipt = at_node[1].get(txid) if at_node is not None else None
        if backend is not None and at_node is not None and receipt is not None:
            confirmations = at_node[0] - receipt.block_number + 1
            if confirmations >= backend.chain.confirmations:
                # The node agrees that it is at the threshold: done here, without a look of the sender's worker.
                native = backend.is_native(owner["asset"])
                notes.confirmed[owner["transfer_id"]] = (
                    owner,
                    store.Outcome(
                        transfer_id=owner["transfer_id"],
                        txid=receipt.txid,
                        block_number=receipt.block_number,
                        confirmations=confirmations,
                        amount_sent=(int(owner["value"]) if native else int(owner["amount"])) if receipt.success else 0,
                        fee_paid=receipt.fee,
                        success=receipt.success,
                        reason=None if receipt.success else reverted(receipt),
                    ),
                )
                return
        notes.wake((message.chain, owner["escrow_address"]), check=True)

    async def record_standings(self, conn: Connection, notes: RunNotes) -> None:
        """Writes what a run of confirmations noted: transfers' standings (each change reported once), then the
        blocks candidates were mined in, then the transfers done. The transfer rows are locked first, in id order and
        all at once, then the candidate rows, as the workers take them, so that a run never deadlocks with a worker."""
        if notes.standings or notes.confirmed:
            await store.lock_transfers(conn, [*notes.standings, *notes.confirmed])
        if notes.standings:
            standings = [standing for standing, _, _, _ in notes.standings.values()]
            changed = await store.set_standings(conn, standings, locked=True)
            for transfer_id in sorted(changed):
                standing, deal_id, chain, block_hash = notes.standings[transfer_id]
                await emit(
                    conn,
                    subjects.queue_result(chain),
                    TransferProgress(
                        transfer_id=transfer_id,
                        deal_id=deal_id,
                        chain=chain,
                        txid=standing.txid,
                        confirmations=standing.confirmations,
                    ),
                    event_id=stable_event_id(
                        "queue", "progress", transfer_id, standing.txid, block_hash, standing.confirmations
                    ),
                )
        for chain, mined in notes.mined.items():
            await (utxo_store if chain in self.utxo else store).note_mined_many(conn, mined)
        if notes.confirmed:
            await self._confirm_reported(conn, notes)

    async def _confirm_reported(self, conn: Connection, notes: RunNotes) -> None:
        confirmed = sorted(notes.confirmed.items())
        done = await store.confirm_many(conn, [outcome for _, (_, outcome) in confirmed], locked=True)
        for transfer_id, (owner, outcome) in confirmed:
            if transfer_id not in done:
                continue
            await self._report_outcome(conn, outcome, owner["deal_id"], owner["chain"])
            payouts = self.utxo.get(owner["chain"])
            if payouts is not None:
                payouts.forget([outcome.txid])
            self._finished(outcome, owner["deal_id"], owner["chain"], owner["signed_at"], [outcome.txid])

    async def read_owners(self, conn: Connection, fresh: Sequence[tuple[Envelope, Message]], notes: RunNotes) -> None:
        """The candidates a run's confirmations are about, one statement per chain instead of one per event. (A
        transaction is stored before it is broadcast, so one the watcher saw mined is here if it is ours.)"""
        by_chain: dict[str, set[str]] = {}
        for _, message in fresh:
            if isinstance(message, TxConfirmation):
                by_chain.setdefault(message.chain, set()).add(message.txid.lower())
        for chain, txids in by_chain.items():
            kind = utxo_store if chain in self.utxo else store
            found = await kind.candidate_owners(conn, chain, sorted(txids))
            for txid in txids:
                notes.owners[(chain, txid)] = found.get(txid)
        await self._read_at_node(fresh, notes)

    async def _read_at_node(self, fresh: Sequence[tuple[Envelope, Message]], notes: RunNotes) -> None:
        """The node's receipts of the run's signed EVM transactions reported at the threshold, one request per chain:
        each is then confirmed by the run itself. Without an answer, their senders' workers look at the node instead."""
        by_chain: dict[str, set[str]] = {}
        for _, message in fresh:
            if not isinstance(message, TxConfirmation) or message.chain not in self.backends:
                continue
            owner = notes.owners.get((message.chain, message.txid.lower()))
            at_threshold = message.confirmations >= self.backends[message.chain].chain.confirmations
            if at_threshold and owner is not None and owner["status"] == "SIGNED":
                by_chain.setdefault(message.chain, set()).add(message.txid.lower())
        for chain, txids in by_chain.items():
            try:
                notes.at_node[chain] = await self.backends[chain].receipts(sorted(txids))
            except UNREACHABLE as exc:
                log.warning("confirmations left to the senders' looks: %s", exc, extra={"chain": chain})
        escrows: dict[str, set[str]] = {}
        for _, message in fresh:
            if not isinstance(message, TxConfirmation) or message.chain not in self.utxo:
                continue
            owner = notes.owners.get((message.chain, message.txid.lower()))
            at_threshold = message.confirmations >= self.utxo[message.chain].chain.confirmations
            if at_threshold and owner is not None and owner["status"] == "SIGNED" and owner["legs"] == 1:
                escrows.setdefault(message.chain, set()).add(owner["escrow_address"])
        for chain, addresses in escrows.items():
            try:
                notes.at_server[chain] = await self.utxo[chain].backend.look_many(sorted(addresses))
            except UNREACHABLE as exc:
                log.warning("confirmations left to the senders' looks: %s", exc, extra={"chain": chain})

    async def on_deal(self, conn: Connection, envelope: Envelope, message: Message, notes: RunNotes) -> None:
        if isinstance(message, EscrowAssigned):
            chain = self.registry.chains.get(message.chain)
            address = canonical_address(chain, message.address) if chain is not None else None
            if address is None:
                log.warning("escrow on an unknown chain or malformed: ignored", extra={"deal_id": message.deal_id})
                return
            # Derives the key now, so that the payout does not wait for it.
            backend = self.backends.get(message.chain)
            if backend is not None:
                backend.escrow_address(message.escrow_index)
            payouts = self.utxo.get(message.chain)
            if payouts is not None:
                payouts.backend.escrow_address(message.escrow_index)
            notes.escrows.append(_with_address(message, address))
        elif isinstance(message, PartyDetailsFilled):
            notes.parties.append(message)
        else:
            return
        notes.deals.add(message.deal_id)

    async def record_deal_facts(self, conn: Connection, notes: RunNotes) -> None:
        """Stores a run's escrows and parties' details, a statement for each kind (the first version of each stands;
        a different later one is alerted, never stored), before the senders they unblock are woken."""
        if notes.escrows:
            for msg, _ in await store.add_escrows(conn, notes.escrows):
                await self._alert_in(
                    conn,
                    "conflicting_deal_event",
                    f"escrow {msg.address} announced again with different terms; the first stands",
                    msg.chain,
                    msg.deal_id,
                )
        if notes.parties:
            for party_msg, _ in await store.add_parties(conn, notes.parties):
                await self._alert_in(
                    conn,
                    "conflicting_deal_event",
                    f"{party_msg.party.value} details announced again with different addresses; the first stand",
                    deal_id=party_msg.deal_id,
                )

    # ----------------------------------------------------------------- signing

    async def sign_queued(self, worker: Worker) -> None:
        payouts = self.utxo.get(worker.chain)
        if payouts is not None:
            await payouts.sign_queued(worker)
            return
        backend = self.backends.get(worker.chain)
        while True:
            # Several at a time: an escrow's payout and commission are commanded together and go out together.
            # (One commanded meanwhile wakes the worker again.)
            rows = await store.queued(self.pool, worker.chain, worker.sender, QUEUED_READ)
            if not rows:
                return
            if backend is None:
                await self._waits(rows[0], f"no signer for {worker.chain} in this build")
                return
            if not await self._sign_run(backend, rows, worker):
                return
            if len(rows) < QUEUED_READ:
                return

    async def _sign_run(self, backend: ChainBackend, rows: Sequence[asyncpg.Record], worker: Worker) -> bool:
        """Signs and broadcasts a sender's queued transfers in arrival order, with one read of the chain, one
        transaction and one broadcast request for all of them; False when one has to wait (and those after it)."""
        started = time.time()
        chain = backend.chain
        checked: list[tuple[asyncpg.Record, TransferOrder]] = []
        blocked = False
        for row in rows:
            order = store.order_of(row)
            escrow, parties = await self._deal_facts(chain.id, order.escrow_address)
            verdict = rules.check_transfer(
                order, backend.escrow_address(order.escrow_index), escrow, parties, self.facts[chain.id]
            )
            if isinstance(verdict, Allowed) and canonical_address(chain, order.to) is None:
                verdict = Refused(f"{order.to} is not a valid address on {chain.id}")
            if isinstance(verdict, Missing):
                await self._waits(row, verdict.reason)
                blocked = True
                break
            if isinstance(verdict, Refused):
                async with self.pool.acquire() as conn, conn.transaction():
                    await self._refuse_in(conn, order, verdict.reason)
                continue
            checked.append((row, order))
        if not checked:
            return not blocked
        checked_at = time.time()
        readings = await backend.read_many([order for _, order in checked], estimate=True)
        ready: list[tuple[asyncpg.Record, TransferOrder, Any]] = []
        for (row, order), reading in zip(checked, readings, strict=True):
            if isinstance(reading, Wait):
                await self._waits(row, reading.reason)
                blocked = True
                break
            ready.append((row, order, reading))
        if not ready:
            return False
        read_at = time.time()
        sender = ready[0][1].escrow_address
        run: list[tuple[asyncpg.Record, TransferOrder, Signed, int]] = []
        async with self.pool.acquire() as conn, conn.transaction(), emitted_together(conn):
            next_nonce = await store.lock_sender(conn, chain.id, sender)
            statuses, flows = await store.lock_for_signing(conn, chain.id, sender, [o.transfer_id for _, o, _ in ready])
            for row, order, reading in ready:
                if statuses.get(order.transfer_id) != "QUEUED":
                    continue
                signed = backend.sign_first(order, reading, [flow.against(order.asset) for flow in flows], next_nonce)
                if isinstance(signed, Wait):
                    await self._waits(row, signed.reason)
                    blocked = True
                    break
                if isinstance(signed, Refused):
                    await self._fail_in(conn, order, signed.reason, alert=False)
                    continue
                run.append((row, order, signed, next_nonce))
                # What this one takes out is there for the next one to see, as if it had been stored already.
                native_out = signed.plan.value + signed.plan.gas_limit * signed.plan.max_fee
                flows.append(store.Flow(nonce=signed.nonce, asset=order.asset, amount=order.amount, native=native_out))
                next_nonce = signed.nonce + 1
            if run:
                await store.record_signed(
                    conn,
                    chain.id,
                    sender,
                    [store.SignedRow(o.transfer_id, s.nonce, s.txid, s.raw, s.plan) for _, o, s, _ in run],
                    datetime.now(UTC),
                )
            for _, order, signed, _ in run:
                await emit(
                    conn,
                    subjects.queue_result(chain.id),
                    TransferSubmitted(
                        transfer_id=order.transfer_id,
                        deal_id=order.deal_id,
                        chain=chain.id,
                        txid=signed.txid,
                        candidates=[signed.txid],
                    ),
                    event_id=stable_event_id("queue", "submitted", order.transfer_id, 0),
                )
        if not run:
            return not blocked
        stored_at = time.time()
        for _, order, _, _ in run:
            self._waiting.pop(order.transfer_id, None)
        if self.settings.test_crash_after_sign:
            os.kill(os.getpid(), signal.SIGKILL)
        outcomes = await backend.send_many([signed.raw for _, _, signed, _ in run])
        sent_at = time.time()
        for (row, order, signed, expected_nonce), (outcome, words) in zip(run, outcomes, strict=True):
            self._sent(row, order, signed, outcome, words, (started, checked_at, read_at, stored_at, sent_at))
            if signed.nonce != expected_nonce:
                await self._alert_once(
                    f"nonce:{chain.id}:{sender}:{expected_nonce}",
                    "foreign_transaction",
                    f"escrow {sender} on {chain.id} used nonces {expected_nonce}..{signed.nonce - 1} "
                    "in transactions this queue never signed",
                    chain.id,
                    order.deal_id,
                )
            if outcome not in (Sent.ACCEPTED, Sent.KNOWN):
                log.warning(
                    "broadcast not accepted: %s",
                    words,
                    extra={"transfer_id": order.transfer_id, "chain": chain.id, "txid": signed.txid},
                )
                worker.check_due = True
        return not blocked

    def _sent(
        self,
        row: asyncpg.Record,
        order: TransferOrder,
        signed: Signed,
        outcome: Sent,
        words: str,
        times: tuple[float, float, float, float, float],
    ) -> None:
        started, checked, read, stored, sent = times
        since_command = sent - row["received_at"].timestamp()
        metrics.COMMAND_TO_BROADCAST.labels(order.chain).observe(since_command)
        metrics.SUBMITTED.labels(order.chain).inc()
        log.info(
            "broadcast",
            extra={
                "transfer_id": order.transfer_id,
                "deal_id": order.deal_id,
                "chain": order.chain,
                "txid": signed.txid,
                "nonce": signed.nonce,
                "outcome": outcome.value,
                "command_to_broadcast_ms": round(since_command * 1000, 2),
                "event_to_broadcast_ms": round((sent - row["commanded_at"].timestamp()) * 1000, 2),
                "stages_ms": {
                    "waited": round((started - row["received_at"].timestamp()) * 1000, 2),
                    "check": round((checked - started) * 1000, 2),
                    "read": round((read - checked) * 1000, 2),
                    "store": round((stored - read) * 1000, 2),
                    "send": round((sent - stored) * 1000, 2),
                },
            },
        )

    async def _deal_facts(self, chain: str, address: str) -> tuple[rules.EscrowFact | None, dict[Party, PartyFact]]:
        """The deal facts of an escrow; kept in memory once complete, since they never change after."""
        key = (chain, address)
        cached = self._deals.get(key)
        if cached is not None:
            self._deals.move_to_end(key)
            return cached
        escrow, parties = await store.deal_facts(self.pool, chain, address)
        if escrow is not None and all(
            p in parties and parties[p].payback_address and parties[p].recipient_address for p in Party
        ):
            self._deals[key] = (escrow, parties)
            if len(self._deals) > DEAL_CACHE_SIZE:
                self._deals.popitem(last=False)
        return escrow, parties

    async def _refuse_in(self, conn: Connection, order: TransferOrder, reason: str) -> None:
        await self._fail_in(conn, order, reason, alert=True)

    async def _fail_in(self, conn: Connection, order: TransferOrder, reason: str, *, alert: bool) -> None:
        """A refused command: never signed, never retried (a dust return is refused without an alert)."""
        if not await store.fail(conn, order.transfer_id, reason, "QUEUED"):
            return
        await emit(
            conn,
            subjects.queue_result(order.chain),
            TransferFailed(
                transfer_id=order.transfer_id, deal_id=order.deal_id, chain=order.chain, reason=reason, retryable=False
            ),
            event_id=stable_event_id("queue", "failed", order.transfer_id),
        )
        if alert:
            await self._alert_in(conn, "payout_refused", f"{order.transfer_id}: {reason}", order.chain, order.deal_id)
        else:
            log.info("not sent: %s", reason, extra={"transfer_id": order.transfer_id, "chain": order.chain})
        metrics.FAILED.labels(order.chain, "false").inc()
        self._waiting.pop(order.transfer_id, None)

    # ----------------------------------------------------------------- after broadcast

    async def reconcile(self, worker: Worker) -> None:
        payouts = self.utxo.get(worker.chain)
        if payouts is not None:
            await payouts.reconcile(worker)
            return
        backend = self.backends.get(worker.chain)
        if backend is None:
            return
        flights = await store.in_flight(self.pool, worker.chain, worker.sender)
        flights = [f for f in flights if f.candidates]
        if not flights:
            return
        seen = await backend.look(worker.sender, flights)
        now = time.time()
        first_unmined = True
        confirmed: list[tuple[InFlight, rules.Receipt, int]] = []
        for flight in flights:
            action = rules.next_action(
                [c.view() for c in flight.candidates],
                flight.nonce,
                seen,
                threshold=backend.chain.confirmations,
                now=now,
                bump_after=self.settings.bump_after_seconds,
                first_unmined=first_unmined,
            )
            if isinstance(action, rules.Confirm):
                confirmed.append((flight, action.receipt, action.confirmations))
                continue
            if isinstance(action, rules.Mined):
                await self._progress(flight, action.receipt, action.confirmations)
                continue
            first_unmined = False
            if isinstance(action, rules.Rebroadcast):
                await self._rebroadcast(backend, flight, action)
            elif isinstance(action, rules.Bump):
                await self._bump(backend, flight)
            elif isinstance(action, rules.NonceTaken):
                await self._nonce_taken(backend.chain.id, flight, now)
        if confirmed:
            await self._confirm(backend, confirmed)

    async def _nonce_taken(self, chain: str, flight: InFlight, now: float) -> None:
        """Briefly this is a receipt not visible yet; for longer, a transaction not ours used the nonce."""
        transfer_id = flight.order.transfer_id
        first = self._nonce_taken_since.setdefault(transfer_id, now)
        if now - first > max(30.0, 5 * self.settings.poll_seconds):
            await self._alert_once(
                f"nonce-taken:{transfer_id}",
                "nonce_used_elsewhere",
                f"{transfer_id}: nonce {flight.nonce} is used but none of its candidates was mined",
                chain,
                flight.order.deal_id,
            )

    async def _progress(self, flight: InFlight, receipt: rules.Receipt, confirmations: int) -> None:
        order = flight.order
        async with self.pool.acquire() as conn, conn.transaction():
            await self._standing_in(
                conn,
                order.transfer_id,
                order.deal_id,
                order.chain,
                receipt.txid,
                receipt.block_number,
                receipt.block_hash,
                confirmations,
            )
            await store.note_mined(conn, receipt.txid, receipt.block_number, receipt.block_hash)

    async def _standing_in(
        self,
        conn: Connection,
        transfer_id: str,
        deal_id: str,
        chain: str,
        txid: str,
        block_number: int,
        block_hash: str | None,
        confirmations: int,
    ) -> None:
        """Records a mined transfer's confirmations below the threshold, and reports them once each."""
        if not await store.set_standing(conn, transfer_id, txid, block_number, confirmations):
            return
        await emit(
            conn,
            subjects.queue_result(chain),
            TransferProgress(
                transfer_id=transfer_id, deal_id=deal_id, chain=chain, txid=txid, confirmations=confirmations
            ),
            event_id=stable_event_id("queue", "progress", transfer_id, txid, block_hash, confirmations),
        )

    async def _confirm(self, backend: ChainBackend, confirmed: Sequence[tuple[InFlight, rules.Receipt, int]]) -> None:
        """Records a sender's transfers mined at the threshold, with their events, in one transaction."""
        outcomes: list[tuple[InFlight, rules.Receipt, store.Outcome]] = []
        for flight, receipt, confirmations in confirmed:
            order = flight.order
            mined = next(c for c in flight.candidates if c.txid == receipt.txid)
            outcome = store.Outcome(
                transfer_id=order.transfer_id,
                txid=receipt.txid,
                block_number=receipt.block_number,
                confirmations=confirmations,
                amount_sent=backend.amount_sent(order, mined.plan) if receipt.success else 0,
                fee_paid=receipt.fee,
                success=receipt.success,
                reason=None if receipt.success else reverted(receipt),
            )
            outcomes.append((flight, receipt, outcome))
        async with self.pool.acquire() as conn, conn.transaction(), emitted_together(conn):
            done = await store.confirm_many(conn, [outcome for _, _, outcome in outcomes])
            outcomes = [item for item in outcomes if item[2].transfer_id in done]
            newly_mined = {
                receipt.txid: (receipt.block_number, receipt.block_hash)
                for flight, receipt, _ in outcomes
                if next((c.mined_block, c.mined_hash) for c in flight.candidates if c.txid == receipt.txid)
                != (receipt.block_number, receipt.block_hash)
            }
            if newly_mined:
                await store.note_mined_many(conn, newly_mined)
            for flight, _, outcome in outcomes:
                await self._report_outcome(conn, outcome, flight.order.deal_id, flight.order.chain)
        for flight, _, outcome in outcomes:
            txids = [candidate.txid for candidate in flight.candidates]
            self._finished(outcome, flight.order.deal_id, flight.order.chain, flight.candidates[0].signed_at, txids)

    def _finished(
        self, outcome: store.Outcome, deal_id: str, chain: str, first_signed: datetime, txids: list[str]
    ) -> None:
        """Forgets what was kept in memory about a transfer now done, and says so."""
        self._nonce_taken_since.pop(outcome.transfer_id, None)
        for txid in txids:
            self._last_send.pop(txid, None)
        metrics.BROADCAST_TO_CONFIRMED.labels(chain).observe(max(0.0, time.time() - first_signed.timestamp()))
        if outcome.success:
            metrics.CONFIRMED.labels(chain).inc()
        else:
            metrics.FAILED.labels(chain, "false").inc()
        log.info(
            "confirmed" if outcome.success else "reverted",
            extra={
                "transfer_id": outcome.transfer_id,
                "deal_id": deal_id,
                "chain": chain,
                "txid": outcome.txid,
                "block_number": outcome.block_number,
                "amount_sent": outcome.amount_sent,
                "fee_paid": outcome.fee_paid,
                "candidates": len(txids),
            },
        )

    async def _report_outcome(self, conn: Connection, outcome: store.Outcome, deal_id: str, chain: str) -> None:
        result: Message
        if outcome.success:
            result = TransferConfirmed(
                transfer_id=outcome.transfer_id,
                deal_id=deal_id,
                chain=chain,
                txid=outcome.txid,
                block_number=outcome.block_number,
                confirmations=outcome.confirmations,
                amount_sent=outcome.amount_sent,
                fee_paid=outcome.fee_paid,
            )
            event_id = stable_event_id("queue", "confirmed", outcome.transfer_id)
        else:
            # The nonce and the fee are spent; sending the same again would fail the same way.
            assert outcome.reason is not None
            result = TransferFailed(
                transfer_id=outcome.transfer_id,
                deal_id=deal_id,
                chain=chain,
                reason=outcome.reason,
                retryable=False,
            )
            event_id = stable_event_id("queue", "failed", outcome.transfer_id)
            detail = f"{outcome.transfer_id}: {outcome.reason}"
            await self._alert_in(conn, "payout_reverted", detail, chain, deal_id)
        await emit(conn, subjects.queue_result(chain), result, event_id=event_id)

    async def _rebroadcast(self, backend: ChainBackend, flight: InFlight, action: rules.Rebroadcast) -> None:
        order = flight.order
        target = next(c for c in flight.candidates if c.txid == action.txid)
        outcome, words = await backend.send(target.raw)
        why = "reorg" if action.reorged else "not_known"
        metrics.REBROADCASTS.labels(order.chain, why).inc()
        # Logged after a reorg, or when the node's answer changes: a refusal repeats every sweep.
        if action.reorged or self._last_send.get(target.txid) != outcome:
            self._last_send[target.txid] = outcome
            log.info(
                "re-broadcast stored transaction",
                extra={
                    "transfer_id": order.transfer_id,
                    "chain": order.chain,
                    "txid": target.txid,
                    "why": why,
                    "outcome": outcome.value,
                    "detail": words,
                },
            )
        if outcome in (Sent.ACCEPTED, Sent.KNOWN):
            if action.reorged:
                await self._unmined(flight, target)
            return
        if outcome is Sent.SPENT:
            return
        if outcome is Sent.UNDERPRICED:
            if target.txid != flight.newest.txid:
                outcome, words = await backend.send(flight.newest.raw)
                if outcome in (Sent.ACCEPTED, Sent.KNOWN, Sent.SPENT):
                    return
            await self._bump(backend, flight)
            return
        await self._alert_once(
            f"send:{target.txid}:{outcome.value}",
            "broadcast_refused",
            f"{order.transfer_id}: the node refuses {target.txid}: {words}",
            order.chain,
            order.deal_id,
        )

    async def _unmined(self, flight: InFlight, candidate: StoredCandidate) -> None:
        order = flight.order
        async with self.pool.acquire() as conn, conn.transaction():
            await store.note_mined(conn, candidate.txid, None, None)
            if await store.set_standing(conn, order.transfer_id, candidate.txid, None, 0):
                await emit(
                    conn,
                    subjects.queue_result(order.chain),
                    TransferProgress(
                        transfer_id=order.transfer_id,
                        deal_id=order.deal_id,
                        chain=order.chain,
                        txid=candidate.txid,
                        confirmations=0,
                    ),
                    event_id=stable_event_id("queue", "unmined", order.transfer_id, candidate.txid, time.time()),
                )

    async def _bump(self, backend: ChainBackend, flight: InFlight) -> None:
        """Replaces the newest candidate at the same nonce with higher fees; stored before it is sent."""
        order = flight.order
        chain = backend.chain
        reading = await backend.read(order, estimate=False)
        if isinstance(reading, Wait):
            await self._waits(flight.row, reading.reason)
            return
        signed: Signed | Wait
        async with self.pool.acquire() as conn, conn.transaction():
            await store.lock_sender(conn, chain.id, order.escrow_address)
            current = await store.lock_transfer(conn, order.transfer_id)
            if current is None or current["status"] != "SIGNED":
                return
            stored = await store.candidates(conn, order.transfer_id)
            if not stored or stored[-1].txid != flight.newest.txid:
                return
            book = await store.outflows(conn, chain.id, order.escrow_address, order.asset, exclude=order.transfer_id)
            signed = backend.sign_replacement(order, flight.nonce, stored[-1].plan, reading, book)
            if isinstance(signed, Wait):
                await self._alert_once(
                    f"bump:{order.transfer_id}:{stored[-1].seq}",
                    "fee_bump_impossible",
                    f"{order.transfer_id}: {signed.reason}",
                    chain.id,
                    order.deal_id,
                )
                return
            seq = stored[-1].seq + 1
            await store.add_candidate(
                conn, order.transfer_id, seq, signed.txid, signed.raw, signed.plan, datetime.now(UTC)
            )
            await emit(
                conn,
                subjects.queue_result(chain.id),
                TransferSubmitted(
                    transfer_id=order.transfer_id,
                    deal_id=order.deal_id,
                    chain=chain.id,
                    txid=signed.txid,
                    candidates=[c.txid for c in stored] + [signed.txid],
                ),
                event_id=stable_event_id("queue", "submitted", order.transfer_id, seq),
            )
        metrics.BUMPS.labels(chain.id).inc()
        outcome, words = await backend.send(signed.raw)
        log.info(
            "fee bumped",
            extra={
                "transfer_id": order.transfer_id,
                "chain": chain.id,
                "txid": signed.txid,
                "replaces": stored[-1].txid,
                "nonce": flight.nonce,
                "max_fee": signed.plan.max_fee,
                "priority_fee": signed.plan.priority_fee,
                "outcome": outcome.value,
                "detail": words,
            },
        )


def reverted(receipt: rules.Receipt) -> str:
    return f"reverted on chain: {receipt.txid} in block {receipt.block_number}"


def _order(cmd: PayoutCommand) -> TransferOrder:
    return TransferOrder(
        transfer_id=cmd.transfer_id,
        deal_id=cmd.deal_id,
        chain=cmd.chain,
        asset=cmd.asset,
        escrow_address=cmd.escrow_address,
        escrow_index=cmd.escrow_index,
        to=cmd.to,
        amount=cmd.amount,
        purpose=cmd.purpose,
        fee_from_amount=cmd.fee_from_amount,
    )


def _with_sender(cmd: PayoutCommand, sender: str) -> PayoutCommand:
    return msgspec.structs.replace(cmd, escrow_address=sender)


def _with_address(msg: EscrowAssigned, address: str) -> EscrowAssigned:
    return msgspec.structs.replace(msg, address=address)
