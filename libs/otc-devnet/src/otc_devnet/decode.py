"""getrawtransaction's verbose form, which Electrum servers pass through for `verbose=true`."""

from __future__ import annotations

from typing import Any

from .params import coins
from .script import address_of, asm, descriptor, script_type
from .tx import Tx


def verbose_tx(tx: Tx, hrp: str, *, block_hash: str | None, block_time: int, confirmations: int) -> dict[str, Any]:
    """The fields of bitcoind's getrawtransaction(txid, true); block fields only for a mined transaction."""
    ctx = tx.ctx
    witnesses = ctx.wit.vtxinwit
    vin: list[dict[str, Any]] = []
    for index, txin in enumerate(ctx.vin):
        item: dict[str, Any]
        if tx.is_coinbase:
            item = {"coinbase": bytes(txin.scriptSig).hex()}
        else:
            script_sig = bytes(txin.scriptSig)
            item = {
                "txid": txin.prevout.hash[::-1].hex(),
                "vout": txin.prevout.n,
                "scriptSig": {"asm": asm(script_sig), "hex": script_sig.hex()},
            }
        stack = witnesses[index].scriptWitness.stack if index < len(witnesses) else ()
        if stack:
            item["txinwitness"] = [bytes(element).hex() for element in stack]
        item["sequence"] = txin.nSequence
        vin.append(item)
    vout: list[dict[str, Any]] = []
    for n, out in enumerate(ctx.vout):
        script = bytes(out.scriptPubKey)
        script_pub_key: dict[str, Any] = {"asm": asm(script), "desc": descriptor(script, hrp), "hex": script.hex()}
        address = address_of(script, hrp)
        if address is not None:
            script_pub_key["address"] = address
        script_pub_key["type"] = script_type(script)
        vout.append({"value": coins(out.nValue), "n": n, "scriptPubKey": script_pub_key})
    result: dict[str, Any] = {
        "txid": tx.txid_hex,
        "hash": tx.wtxid[::-1].hex(),
        "version": ctx.nVersion,
        "size": len(tx.raw),
        "vsize": tx.vsize,
        "weight": tx.weight,
        "locktime": ctx.nLockTime,
        "vin": vin,
        "vout": vout,
        "hex": tx.raw.hex(),
    }
    if block_hash is not None:
        result |= {"blockhash": block_hash, "confirmations": confirmations, "time": block_time, "blocktime": block_time}
    return result
