"""The devnet's own wallet: it receives the coinbase rewards and pays out faucet requests.

Its key is the devnet's, made with python-bitcoinlib and kept in the data directory; it guards
nothing but devnet coins, yet it is still never logged.
"""

from __future__ import annotations

import os
from pathlib import Path

from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CTxInWitness, CTxWitness, Hash160
from bitcoin.core.script import SIGHASH_ALL, SIGVERSION_WITNESS_V0, CScript, CScriptWitness, SignatureHash
from bitcoin.wallet import CKey

from .chain import Chain
from .params import fee_for
from .script import address_of, dust_threshold, p2wpkh_script, scripthash
from .tx import Coin, Outpoint, Tx, tx_from

__all__ = ["Faucet", "FaucetError"]

#: Upper bounds of a P2WPKH spend and of the fixed part, in virtual bytes, for the fee.
_INPUT_VSIZE = 69
_OVERHEAD_VSIZE = 11
_RBF_SEQUENCE = 0xFFFFFFFD


class FaucetError(Exception):
    """A faucet request that cannot be paid; the message says why."""


class Faucet:
    def __init__(self, key: CKey, hrp: str) -> None:
        self._key = key
        self.program = Hash160(key.pub)
        self.script = p2wpkh_script(self.program)
        self.scripthash = scripthash(self.script)
        address = address_of(self.script, hrp)
        assert address is not None
        self.address = address

    def __repr__(self) -> str:
        return f"Faucet({self.address})"

    @classmethod
    def load_or_create(cls, path: Path, hrp: str) -> Faucet:
        if path.exists():
            try:
                secret = bytes.fromhex(path.read_text().strip())
            except ValueError:
                secret = b""
            if len(secret) != 32:
                raise FaucetError(f"{path} does not hold a 32-byte hex key; restore it or use a new data directory")
        else:
            secret = os.urandom(32)
            temporary = path.with_name(path.name + ".tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secret.hex())
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(path)
        return cls(CKey(secret, compressed=True), hrp)

    def spendable(self, chain: Chain) -> list[tuple[Outpoint, Coin]]:
        """Mature confirmed coins first (oldest first), then the faucet's own unconfirmed change."""
        next_height = chain.height + 1
        maturity = chain.params.coinbase_maturity
        return [
            (outpoint, coin)
            for outpoint, coin in chain.unspent(self.scripthash)
            if not coin.coinbase or next_height - coin.height >= maturity
        ]

    def balance(self, chain: Chain) -> int:
        return sum(coin.value for _outpoint, coin in self.spendable(chain))

    def pay(self, chain: Chain, script: bytes, amount: int) -> Tx:
        """A signed transaction paying amount to script, change back to the faucet."""
        params = chain.params
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise FaucetError("amount must be a positive whole number of satoshis")
        dust = dust_threshold(script, params.dust_relay_fee)
        if amount < dust:
            raise FaucetError(f"amount {amount} is below the dust threshold ({dust}) of that output")
        outputs_vsize = (9 + len(script)) + (9 + len(self.script))
        coins = self.spendable(chain)
        if params.alpha:
            # One input per transaction: a single coin must cover the payment.
            fee = fee_for(params.estimate_fee, _OVERHEAD_VSIZE + _INPUT_VSIZE + outputs_vsize)
            covering = [item for item in coins if item[1].value >= amount + fee]
            if not covering:
                largest = max((coin.value for _outpoint, coin in coins), default=0)
                raise FaucetError(
                    f"on Alpha a payment has one input: the faucet's largest coin is {largest} satoshis, "
                    f"not enough for {amount} plus fee; ask for less or mine more blocks"
                )
            selected = covering[:1]
            total = selected[0][1].value
        else:
            selected = []
            total = 0
            for outpoint, coin in coins:
                selected.append((outpoint, coin))
                total += coin.value
                fee = fee_for(params.estimate_fee, _OVERHEAD_VSIZE + _INPUT_VSIZE * len(selected) + outputs_vsize)
                if total >= amount + fee:
                    break
            else:
                raise FaucetError(
                    f"the faucet has {total} spendable satoshis, not enough for {amount} plus fee; mine more blocks"
                )
        outputs = [CMutableTxOut(amount, CScript(script))]
        change = total - amount - fee
        if change >= dust_threshold(self.script, params.dust_relay_fee):
            outputs.append(CMutableTxOut(change, CScript(self.script)))
        tx = CMutableTransaction(
            [CMutableTxIn(COutPoint(txid, n), nSequence=_RBF_SEQUENCE) for (txid, n), _coin in selected],
            outputs,
            nVersion=2,
        )
        script_code = CScript(b"\x76\xa9\x14" + self.program + b"\x88\xac")
        witnesses = []
        for index, (_outpoint, coin) in enumerate(selected):
            digest = SignatureHash(
                script_code, tx, index, SIGHASH_ALL, amount=coin.value, sigversion=SIGVERSION_WITNESS_V0
            )
            signature = self._key.sign(digest) + bytes([SIGHASH_ALL])
            witnesses.append(CTxInWitness(CScriptWitness([signature, self._key.pub])))
        tx.wit = CTxWitness(witnesses)
        return tx_from(tx)
