"""The rules a transaction must pass to enter the mempool, as bitcoind applies them.

Pure functions over a parsed transaction and the coins it spends; the mempool and chain state
they need is passed in. Each rejection carries bitcoind's reject reason and debug text, so a
client sees the same error it would get from a production Electrum server in front of a node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import coincurve
from bitcoin.core.script import SIGVERSION_WITNESS_V0, CScript, SignatureHash

from . import params as p
from .params import ChainParams, fee_for, fee_rate, format_fee_rate, format_money
from .script import STANDARD_OUTPUT_TYPES, dust_threshold, script_type, witness_program
from .tx import Coin, Tx

__all__ = [
    "Conflict",
    "Rejected",
    "check_fee",
    "check_final",
    "check_input_types",
    "check_inputs",
    "check_replacement",
    "check_standard",
    "check_transaction",
    "signals_rbf",
    "verify_scripts",
]

_SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_ORDER = _SECP256K1_ORDER // 2
SIGHASH_ALL, SIGHASH_SINGLE, SIGHASH_ANYONECANPAY = 1, 3, 0x80


class Rejected(Exception):
    """A transaction the mempool refuses; str() is bitcoind's `reason, debug` text."""

    def __init__(self, reason: str, debug: str = "") -> None:
        self.reason = reason
        self.debug = debug
        super().__init__(f"{reason}, {debug}" if debug else reason)


# --- context-free checks ------------------------------------------------------------------


def check_transaction(tx: Tx, single_input: bool = False) -> None:
    """Consensus::CheckTransaction, with the Alpha chain's one-input rule when single_input is set."""
    ctx = tx.ctx
    if not ctx.vin:
        raise Rejected("bad-txns-vin-empty")
    if not ctx.vout:
        raise Rejected("bad-txns-vout-empty")
    if tx.stripped_size * 4 > p.MAX_BLOCK_WEIGHT:
        raise Rejected("bad-txns-oversize")
    total = 0
    for out in ctx.vout:
        if out.nValue < 0:
            raise Rejected("bad-txns-vout-negative")
        if out.nValue > p.MAX_MONEY:
            raise Rejected("bad-txns-vout-toolarge")
        total += out.nValue
        if total > p.MAX_MONEY:
            raise Rejected("bad-txns-txouttotal-toolarge")
    outpoints = tx.outpoints()
    if len(set(outpoints)) != len(outpoints):
        raise Rejected("bad-txns-inputs-duplicate")
    if tx.is_coinbase:
        if not 2 <= len(ctx.vin[0].scriptSig) <= 100:
            raise Rejected("bad-cb-length")
    elif any(txin.prevout.is_null() for txin in ctx.vin):
        raise Rejected("bad-txns-prevout-null")
    if single_input and len(ctx.vin) != 1:
        raise Rejected("bad-txns-too-many-inputs", "Alpha Transactions must have exactly one input")


def check_standard(tx: Tx, params: ChainParams) -> None:
    """IsStandardTx and the minimum size, in bitcoind's order."""
    ctx = tx.ctx
    if not 1 <= ctx.nVersion <= 3:
        raise Rejected("version")
    if tx.weight > p.MAX_STANDARD_TX_WEIGHT:
        raise Rejected("tx-size")
    for txin in ctx.vin:
        if len(txin.scriptSig) > 1650:
            raise Rejected("scriptsig-size")
        if not CScript(txin.scriptSig).is_push_only():
            raise Rejected("scriptsig-not-pushonly")
    data_carriers = 0
    for out in ctx.vout:
        kind = script_type(out.scriptPubKey)
        if kind not in STANDARD_OUTPUT_TYPES or (kind == "nulldata" and len(out.scriptPubKey) > 83):
            raise Rejected("scriptpubkey")
        if kind == "nulldata":
            data_carriers += 1
        elif out.nValue < dust_threshold(out.scriptPubKey, params.dust_relay_fee):
            raise Rejected("dust")
    if data_carriers > 1:
        raise Rejected("multi-op-return")
    if tx.stripped_size < p.MIN_STANDARD_TX_NONWITNESS_SIZE:
        raise Rejected("tx-size-small")


def check_final(tx: Tx, next_height: int, median_time_past: int) -> None:
    """IsFinalTx for the next block: a lock time in the future needs every input final."""
    locktime = tx.ctx.nLockTime
    if locktime == 0:
        return
    limit = next_height if locktime < p.LOCKTIME_THRESHOLD else median_time_past
    if locktime < limit:
        return
    if any(txin.nSequence != p.SEQUENCE_FINAL for txin in tx.ctx.vin):
        raise Rejected("non-final")


def signals_rbf(tx: Tx) -> bool:
    """BIP125 opt-in: some input has a sequence number below 0xfffffffe."""
    return any(txin.nSequence <= p.MAX_BIP125_RBF_SEQUENCE for txin in tx.ctx.vin)


# --- checks against the coins spent -------------------------------------------------------


def check_inputs(tx: Tx, coins: Sequence[Coin], spend_height: int, maturity: int) -> int:
    """Consensus::CheckTxInputs; returns the fee."""
    value_in = 0
    for coin in coins:
        if coin.coinbase and spend_height - coin.height < maturity:
            raise Rejected(
                "bad-txns-premature-spend-of-coinbase", f"tried to spend coinbase at depth {spend_height - coin.height}"
            )
        value_in += coin.value
        if not 0 <= value_in <= p.MAX_MONEY:
            raise Rejected("bad-txns-inputvalues-outofrange")
    value_out: int = sum(out.nValue for out in tx.ctx.vout)
    if value_in < value_out:
        raise Rejected(
            "bad-txns-in-belowout", f"value in ({format_money(value_in)}) < value out ({format_money(value_out)})"
        )
    return value_in - value_out


def check_input_types(coins: Sequence[Coin]) -> None:
    """The devnet verifies P2WPKH spends only; anything else is refused rather than waved through."""
    for index, coin in enumerate(coins):
        kind = script_type(coin.script)
        if kind != "witness_v0_keyhash":
            raise Rejected("devnet-unsupported-input", f"input {index} spends a {kind} output; only P2WPKH is verified")


def check_fee(fee: int, vsize: int, params: ChainParams) -> None:
    minimum = fee_for(params.min_relay_fee, vsize)
    if fee < minimum:
        raise Rejected("min relay fee not met", f"{fee} < {minimum}")


@dataclass(frozen=True)
class Conflict:
    """A mempool transaction the new one double-spends directly."""

    txid_hex: str
    fee: int
    vsize: int


def check_replacement(
    tx: Tx,
    fee: int,
    direct: Sequence[Conflict],
    evicted_count: int,
    evicted_fees: int,
    parents_of_conflicts: Collection[bytes],
    in_mempool: Callable[[bytes], bool],
    params: ChainParams,
) -> None:
    """BIP125 rules 2 to 6, as bitcoind checks them (the signalling rule 1 is checked on lookup)."""
    txid = tx.txid_hex
    new_rate = fee_rate(fee, tx.vsize)
    for old in direct:
        old_rate = fee_rate(old.fee, old.vsize)
        if new_rate <= old_rate:
            raise Rejected(
                "insufficient fee",
                f"rejecting replacement {txid}; new feerate {format_fee_rate(new_rate)} "
                f"<= old feerate {format_fee_rate(old_rate)}",
            )
    if evicted_count > p.MAX_REPLACEMENT_CANDIDATES:
        raise Rejected(
            "too many potential replacements",
            f"rejecting replacement {txid}; too many potential replacements "
            f"({evicted_count} > {p.MAX_REPLACEMENT_CANDIDATES})",
        )
    for index, txin in enumerate(tx.ctx.vin):
        parent = txin.prevout.hash
        if parent not in parents_of_conflicts and in_mempool(parent):
            raise Rejected("replacement-adds-unconfirmed", f"replacement {txid} adds unconfirmed input, idx {index}")
    if fee < evicted_fees:
        raise Rejected(
            "insufficient fee",
            f"rejecting replacement {txid}, less fees than conflicting txs; "
            f"{format_money(fee)} < {format_money(evicted_fees)}",
        )
    relay = fee_for(params.incremental_relay_fee, tx.vsize)
    if fee - evicted_fees < relay:
        raise Rejected(
            "insufficient fee",
            f"rejecting replacement {txid}, not enough additional fees to relay; "
            f"{format_money(fee - evicted_fees)} < {format_money(relay)}",
        )


# --- P2WPKH script verification ---------------------------------------------------------------

# bitcoind's ScriptErrorString texts.
EVAL_FALSE = "Script evaluated without error but finished with a false/empty top stack element"
EQUALVERIFY = "Script failed an OP_EQUALVERIFY operation"
PUSH_SIZE = "Push value size limit exceeded"
SIG_HASHTYPE = "Signature hash type missing or not understood"
SIG_DER = "Non-canonical DER signature"
SIG_HIGH_S = "Non-canonical signature: S value is unnecessarily high"
SIG_NULLFAIL = "Signature must be zero for failed CHECK(MULTI)SIG operation"
PUBKEYTYPE = "Public key is neither compressed or uncompressed"
WITNESS_PROGRAM_MISMATCH = "Witness program hash mismatch"
WITNESS_MALLEATED = "Witness requires empty scriptSig"
WITNESS_PUBKEYTYPE = "Using non-compressed keys in segwit"


def is_valid_signature_encoding(sig: bytes) -> bool:
    """BIP66 strict DER, with the sighash byte at the end."""
    if not 9 <= len(sig) <= 73 or sig[0] != 0x30 or sig[1] != len(sig) - 3:
        return False
    len_r = sig[3]
    if 5 + len_r >= len(sig):
        return False
    len_s = sig[5 + len_r]
    if len_r + len_s + 7 != len(sig):
        return False
    if sig[2] != 0x02 or len_r == 0 or sig[4] & 0x80:
        return False
    if len_r > 1 and sig[4] == 0x00 and not sig[5] & 0x80:
        return False
    if sig[len_r + 4] != 0x02 or len_s == 0 or sig[len_r + 6] & 0x80:
        return False
    return not (len_s > 1 and sig[len_r + 6] == 0x00 and not sig[len_r + 7] & 0x80)


def _r_s(der: bytes) -> tuple[int, int]:
    len_r = der[3]
    r = int.from_bytes(der[4 : 4 + len_r], "big")
    s = int.from_bytes(der[6 + len_r : 6 + len_r + der[5 + len_r]], "big")
    return r, s


def _der(r: int, s: int) -> bytes:
    def integer(value: int) -> bytes:
        body = value.to_bytes((value.bit_length() + 8) // 8 or 1, "big")
        return bytes([0x02, len(body)]) + body

    body = integer(r) + integer(s)
    return bytes([0x30, len(body)]) + body


def _is_compressed(pubkey: bytes) -> bool:
    return len(pubkey) == 33 and pubkey[0] in (2, 3)


def _is_compressed_or_uncompressed(pubkey: bytes) -> bool:
    return _is_compressed(pubkey) or (len(pubkey) == 65 and pubkey[0] == 4)


def _ecdsa_ok(der: bytes, pubkey: bytes, digest: bytes) -> bool:
    """CPubKey::Verify: lax about high S (it is normalised), strict about everything else."""
    r, s = _r_s(der)
    if not (0 < r < _SECP256K1_ORDER and 0 < s < _SECP256K1_ORDER):
        return False
    if s > _HALF_ORDER:
        der = _der(r, _SECP256K1_ORDER - s)
    try:
        return bool(coincurve.PublicKey(pubkey).verify(der, digest, hasher=None))
    except ValueError:
        return False


def _hash160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


def _eval_p2wpkh(
    script_sig: bytes,
    stack: Sequence[bytes],
    program: bytes,
    sighash: Callable[[int], bytes],
    policy: bool,
) -> str | None:
    """Run a P2WPKH spend the way bitcoind's interpreter does; the script error, or None."""
    if script_sig:
        return WITNESS_MALLEATED
    if len(stack) != 2:
        return WITNESS_PROGRAM_MISMATCH
    if any(len(item) > p.MAX_SCRIPT_ELEMENT_SIZE for item in stack):
        return PUSH_SIZE
    sig, pubkey = stack
    if _hash160(pubkey) != program:
        return EQUALVERIFY
    if sig:
        # DERSIG is consensus; LOW_S and STRICTENC are policy.
        if not is_valid_signature_encoding(sig):
            return SIG_DER
        if policy and _r_s(sig[:-1])[1] > _HALF_ORDER:
            return SIG_HIGH_S
        if policy and not SIGHASH_ALL <= sig[-1] & ~SIGHASH_ANYONECANPAY <= SIGHASH_SINGLE:
            return SIG_HASHTYPE
    if policy and not _is_compressed_or_uncompressed(pubkey):
        return PUBKEYTYPE
    if policy and not _is_compressed(pubkey):
        return WITNESS_PUBKEYTYPE
    valid = bool(sig) and _ecdsa_ok(sig[:-1], pubkey, sighash(sig[-1]))
    if not valid:
        return SIG_NULLFAIL if policy and sig else EVAL_FALSE
    return None


def _sighash_function(ctx: object, index: int, program: bytes, amount: int) -> Callable[[int], bytes]:
    """BIP143 digests for one input, computed once per sighash type."""
    script_code = CScript(b"\x76\xa9\x14" + program + b"\x88\xac")
    digests: dict[int, bytes] = {}

    def sighash(hashtype: int) -> bytes:
        if hashtype not in digests:
            digests[hashtype] = SignatureHash(
                script_code, ctx, index, hashtype, amount=amount, sigversion=SIGVERSION_WITNESS_V0
            )
        return digests[hashtype]

    return sighash


def verify_scripts(tx: Tx, coins: Sequence[Coin]) -> None:
    """Check every input's witness; a failure is reported as bitcoind reports it.

    bitcoind runs the scripts with its policy flags and, on failure, again with the consensus
    flags only: passing then makes the error `non-mandatory-script-verify-flag`, otherwise
    `mandatory-script-verify-flag-failed`; either way with the first run's script error.
    """
    ctx = tx.ctx
    witnesses = ctx.wit.vtxinwit
    for index, (txin, coin) in enumerate(zip(ctx.vin, coins, strict=True)):
        program = witness_program(coin.script)
        assert program is not None and program[0] == 0 and len(program[1]) == 20
        stack = list(witnesses[index].scriptWitness.stack) if index < len(witnesses) else []
        sighash = _sighash_function(ctx, index, program[1], coin.value)
        script_sig = bytes(txin.scriptSig)
        error = _eval_p2wpkh(script_sig, stack, program[1], sighash, policy=True)
        if error is None:
            continue
        if _eval_p2wpkh(script_sig, stack, program[1], sighash, policy=False) is None:
            raise Rejected(f"non-mandatory-script-verify-flag ({error})")
        raise Rejected(f"mandatory-script-verify-flag-failed ({error})")
