"""What must leave an escrow, and when: pure functions over one escrow's facts.

Each side's escrow is planned on its own. The shell loads an `Escrow` (its deposits, its
transfers so far, the gas the tank gave it), asks `next_steps` for the deal's stage, and
stores what comes back. Every rule of DESIGN §2 and §3 about money out lives here.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from otc_common.messages import Party, Stage, TransferPurpose

#: Transfers that still count as money leaving (everything but a refused or skipped one).
LIVE = ("PLANNED", "COMMANDED", "SUBMITTED", "CONFIRMED")
DONE = ("CONFIRMED", "SKIPPED")
#: Token transfers a swap needs at most: payout, commission, surplus.
SWAP_TOKEN_TRANSFERS = 3


class SafeguardViolation(Exception):
    """A plan that would break DESIGN §3; never stored."""


class DepositFact(msgspec.Struct, frozen=True, kw_only=True):
    amount: int
    block_number: int | None
    block_time: datetime | None


class TransferFact(msgspec.Struct, frozen=True, kw_only=True):
    transfer_id: str
    purpose: TransferPurpose
    amount: int
    status: str
    fee_from_amount: bool
    amount_sent: int | None = None
    fee_paid: int | None = None

    @property
    def done(self) -> bool:
        return self.status in DONE

    @property
    def live(self) -> bool:
        return self.status in LIVE

    def outflow(self) -> int:
        """What it takes out of the escrow in the traded asset (fees apart for fee-on-top transfers)."""
        if self.status == "CONFIRMED" and self.amount_sent is not None:
            if self.fee_from_amount:
                return self.amount_sent + (self.fee_paid or 0)
            return self.amount_sent
        return self.amount if self.live else 0


class GasFact(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    status: str
    amount: int


class Escrow(msgspec.Struct, frozen=True, kw_only=True):
    deal_id: str
    party: Party
    native: bool
    amount: int
    commission: int
    fee_reserve: int
    confirmations_needed: int
    tip_height: int | None
    deposits: list[DepositFact]
    transfers: list[TransferFact]
    gas: list[GasFact] = []
    #: UTXO escrows pay out in phases, each confirmed before the next is broadcast (DESIGN §2),
    #: so no transaction spends the change of one that is still unconfirmed.
    phased: bool = False

    # ----------------------------------------------------------------- deposits

    def confirmations(self, deposit: DepositFact) -> int:
        if deposit.block_number is None or self.tip_height is None:
            return 0
        return max(0, self.tip_height - deposit.block_number + 1)

    def is_confirmed(self, deposit: DepositFact) -> bool:
        return self.confirmations(deposit) >= self.confirmations_needed

    def mined_total(self, deadline: datetime | None = None) -> int:
        return sum(d.amount for d in self.deposits if _counts(d, deadline))

    def locked_total(self, deadline: datetime | None = None) -> int:
        return sum(d.amount for d in self.deposits if _counts(d, deadline) and self.is_confirmed(d))

    @property
    def confirmed_total(self) -> int:
        return sum(d.amount for d in self.deposits if self.is_confirmed(d))

    @property
    def maturing(self) -> bool:
        """A deposit is mined but not yet confirmed: wait before closing.

        One a reorg unmined is not waited for: it may never be mined again, and a deal must not stay open
        for it forever. If it is mined again after the close, it is returned as a late deposit.
        """
        return any(d.block_number is not None and not self.is_confirmed(d) for d in self.deposits)

    # ----------------------------------------------------------------- transfers

    def of(self, purpose: TransferPurpose) -> list[TransferFact]:
        return [t for t in self.transfers if t.purpose is purpose and t.status != "FAILED"]

    @property
    def asset_out(self) -> int:
        """The traded asset leaving the escrow; gas returns of token escrows are native, not counted."""
        counted = (t for t in self.transfers if not (t.purpose is TransferPurpose.GAS_RETURN and not self.native))
        return sum(t.outflow() for t in counted)

    @property
    def fees_paid_on_top(self) -> int:
        return sum(t.fee_paid or 0 for t in self.transfers if t.status == "CONFIRMED" and not t.fee_from_amount)

    @property
    def all_done(self) -> bool:
        return all(t.done or t.status == "FAILED" for t in self.transfers)

    @property
    def failed(self) -> bool:
        return any(t.status == "FAILED" for t in self.transfers)

    # ----------------------------------------------------------------- tank gas

    def funded(self, request_id: str) -> bool:
        return any(g.request_id == request_id and g.status == "FUNDED" for g in self.gas)

    def requested(self, request_id: str) -> bool:
        return any(g.request_id == request_id for g in self.gas)

    @property
    def gas_left(self) -> int:
        """Tank gas still in a token escrow: funded, less fees paid, less what went back."""
        funded = sum(g.amount for g in self.gas if g.status == "FUNDED")
        returned = sum(t.outflow() for t in self.of(TransferPurpose.GAS_RETURN))
        return funded - self.fees_paid_on_top - returned


def _counts(deposit: DepositFact, deadline: datetime | None) -> bool:
    if deposit.block_number is None:
        return False
    if deadline is None or deposit.block_time is None:
        return True
    return deposit.block_time <= deadline


class Planned(msgspec.Struct, frozen=True, kw_only=True):
    purpose: TransferPurpose
    to: str
    amount: int
    fee_from_amount: bool
    phase: int


class Destinations(msgspec.Struct, frozen=True, kw_only=True):
    counterparty_recipient: str
    operator: str
    payback: str
    tank: str | None


class Steps(msgspec.Struct, frozen=True, kw_only=True):
    transfers: list[Planned] = []
    #: Ask the tank for gas under this request id, for this many token transfers.
    gas_request: tuple[str, int] | None = None
    #: Nothing left to do for this escrow in this stage.
    complete: bool = False


def gas_request_id(deal_id: str, party: Party, round_name: str) -> str:
    return f"{deal_id}:{party.value}:gas:{round_name}"


def _gas_return(escrow: Escrow, to: Destinations, phase: int) -> list[Planned]:
    if escrow.native or to.tank is None:
        return []
    left = escrow.gas_left
    if left <= 0 or any(t.live and not t.done for t in escrow.of(TransferPurpose.GAS_RETURN)):
        return []
    if _skipped_as_dust(escrow, TransferPurpose.GAS_RETURN, left):
        # Gas that cannot pay for its own return stays; asking again would loop forever and never close the deal.
        return []
    return [Planned(purpose=TransferPurpose.GAS_RETURN, to=to.tank, amount=left, fee_from_amount=True, phase=phase)]


def swap_steps(escrow: Escrow, to: Destinations) -> Steps:
    """SWAP: pay the counterparty and the operator, then surplus, then (tokens) the unused gas back."""
    if escrow.of(TransferPurpose.REFUND):
        raise SafeguardViolation("no swap payout once a refund exists (safeguard 2)")
    held = escrow.confirmed_total
    if not escrow.of(TransferPurpose.SWAP_PAYOUT):
        if not escrow.native:
            request = gas_request_id(escrow.deal_id, escrow.party, "swap")
            if not escrow.funded(request):
                return Steps(gas_request=None if escrow.requested(request) else (request, SWAP_TOKEN_TRANSFERS))
        plan = [
            Planned(
                purpose=TransferPurpose.SWAP_PAYOUT,
                to=to.counterparty_recipient,
                amount=escrow.amount,
                fee_from_amount=False,
                phase=1,
            )
        ]
        if escrow.commission > 0 and not escrow.phased:
            plan.append(
                Planned(
                    purpose=TransferPurpose.COMMISSION,
                    to=to.operator,
                    amount=escrow.commission,
                    fee_from_amount=False,
                    phase=1,
                )
            )
        surplus = held - escrow.amount - escrow.commission
        if not escrow.native and surplus > 0:
            plan.append(
                Planned(purpose=TransferPurpose.SURPLUS, to=to.payback, amount=surplus, fee_from_amount=False, phase=1)
            )
        # Safeguard 4: what the plan takes out never exceeds the confirmed deposits.
        if sum(p.amount for p in plan) + (escrow.fee_reserve if escrow.native else 0) > held:
            raise SafeguardViolation("the plan would send more than the escrow's confirmed deposits (safeguard 4)")
        return Steps(transfers=plan)
    if not escrow.all_done:
        return Steps()
    if escrow.phased and escrow.commission > 0 and not escrow.of(TransferPurpose.COMMISSION):
        return Steps(
            transfers=[
                Planned(
                    purpose=TransferPurpose.COMMISSION,
                    to=to.operator,
                    amount=escrow.commission,
                    fee_from_amount=False,
                    phase=2,
                )
            ]
        )
    if escrow.native:
        # Everything left (deposits beyond the requirement, the unused fee reserve) goes back;
        # the escrow pays that transfer's fee out of it.
        left = held - escrow.asset_out - escrow.fees_paid_on_top
        if left < 0:
            # Less counts as confirmed than has already gone out: the view of the deposits is behind the chain
            # (a reorg unmined one, a tip is late). Not done: wait until they count again, then pay the rest.
            return Steps()
        if left > 0 and not escrow.of(TransferPurpose.SURPLUS):
            return Steps(
                transfers=[
                    Planned(
                        purpose=TransferPurpose.SURPLUS,
                        to=to.payback,
                        amount=left,
                        fee_from_amount=True,
                        phase=3 if escrow.phased else 2,
                    )
                ]
            )
        # Deposits still maturing now are returned after close, as late deposits.
        return Steps(complete=True)
    late_tokens = held - escrow.asset_out
    if late_tokens < 0:
        # As for native escrows: the deposits' view is behind what has already been paid out; wait.
        return Steps()
    if late_tokens > 0:
        # Tokens that arrived during the swap go back to the payback address, on the same gas.
        return Steps(
            transfers=[
                Planned(
                    purpose=TransferPurpose.SURPLUS, to=to.payback, amount=late_tokens, fee_from_amount=False, phase=2
                )
            ]
        )
    gas_back = _gas_return(escrow, to, phase=3)
    return Steps(transfers=gas_back, complete=not gas_back)


def _skipped_as_dust(escrow: Escrow, purpose: TransferPurpose, owed: int) -> bool:
    """The queue skips a return smaller than its own fee; asking again for the same amount is pointless."""
    return any(t.status == "SKIPPED" and t.amount == owed for t in escrow.transfers if t.purpose is purpose)


def return_steps(escrow: Escrow, to: Destinations, purpose: TransferPurpose, round_name: str) -> Steps:
    """REVERTED (refunds) and CLOSED (late deposits): every confirmed unit goes back to the payback address."""
    if purpose is TransferPurpose.REFUND and escrow.of(TransferPurpose.SWAP_PAYOUT):
        raise SafeguardViolation("no refund while a swap payout is pending or done (safeguard 2)")
    if not escrow.all_done:
        return Steps()
    owed = escrow.confirmed_total - escrow.asset_out
    if escrow.native:
        owed -= escrow.fees_paid_on_top
        if owed > 0 and not _skipped_as_dust(escrow, purpose, owed):
            return Steps(
                transfers=[Planned(purpose=purpose, to=to.payback, amount=owed, fee_from_amount=True, phase=1)]
            )
        return Steps(complete=not escrow.maturing)
    if owed > 0:
        request = gas_request_id(escrow.deal_id, escrow.party, round_name)
        if not escrow.funded(request):
            return Steps(gas_request=None if escrow.requested(request) else (request, 1))
        return Steps(transfers=[Planned(purpose=purpose, to=to.payback, amount=owed, fee_from_amount=False, phase=1)])
    if escrow.maturing:
        # Keep the tank's gas here: the maturing deposit will need it to be returned.
        return Steps()
    gas_back = _gas_return(escrow, to, phase=2)
    return Steps(transfers=gas_back, complete=not gas_back)


def next_steps(stage: Stage, escrow: Escrow, to: Destinations, *, late_round: int = 0) -> Steps:
    if stage is Stage.SWAP:
        return swap_steps(escrow, to)
    if stage is Stage.REVERTED:
        return return_steps(escrow, to, TransferPurpose.REFUND, "refund")
    if stage is Stage.CLOSED:
        return return_steps(escrow, to, TransferPurpose.LATE_RETURN, f"late{late_round}")
    if stage is Stage.WAITING and not escrow.native:
        # Fund the gas while the locks mature, so the token payouts can leave with the locking block.
        request = gas_request_id(escrow.deal_id, escrow.party, "swap")
        if not escrow.requested(request):
            return Steps(gas_request=(request, SWAP_TOKEN_TRANSFERS))
    return Steps()
