"""The only module that handles the HD seed and private keys.

Only the queue processor and the tank sign, so only they (and the dev CLI that writes the dev
registry's xpubs) may import this module; tests/test_key_custody.py enforces that. Nothing here logs,
and no exception message or repr carries seed or key bytes: exceptions raised while handling secret
input are re-raised `from None` so that a library's message quoting its input is not chained along.
"""

from __future__ import annotations

import hmac
import re
from typing import Any, NoReturn

from bip_utils import Bip32Secp256k1, Bip39MnemonicValidator, Bip39SeedGenerator

from otc_common.keys import parse_fixed_path, parse_path

__all__ = [
    "Seed",
    "account_xpub",
    "escrow_private_key",
    "extended_public_key_at",
    "load_seed",
    "private_key_at",
]

MIN_SEED_BYTES = 16
MAX_SEED_BYTES = 64

_HEX_RE = re.compile(r"(?:0x)?([0-9a-fA-F]+)", re.ASCII)


class Seed:
    """HD seed bytes behind a redacted repr, so that logging or printing one shows nothing secret."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes | bytearray):
            raise ValueError("seed must be bytes")
        if not MIN_SEED_BYTES <= len(secret) <= MAX_SEED_BYTES:
            raise ValueError(f"seed must be {MIN_SEED_BYTES} to {MAX_SEED_BYTES} bytes")
        self._secret = bytes(secret)

    def __repr__(self) -> str:
        return "Seed(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Seed):
            return NotImplemented
        return hmac.compare_digest(self._secret, other._secret)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        # A pickled seed would end up in a cache, a queue or a file; refuse rather than leak.
        raise TypeError("a Seed cannot be pickled or copied")


def load_seed(secret: str, *, passphrase: str = "") -> Seed:
    """A seed from a hex string of 16-64 bytes (an optional 0x prefix) or from a BIP39 mnemonic.

    `passphrase` is the optional BIP39 passphrase and applies only to a mnemonic.
    """
    if not isinstance(secret, str):
        raise ValueError("seed must be given as a hex string or a BIP39 mnemonic")
    text = secret.strip()
    hex_match = _HEX_RE.fullmatch(text)
    if hex_match is not None:
        if passphrase:
            raise ValueError("a passphrase applies only to a mnemonic, not to a hex seed")
        digits = hex_match.group(1)
        if len(digits) % 2 or not MIN_SEED_BYTES * 2 <= len(digits) <= MAX_SEED_BYTES * 2:
            raise ValueError(
                f"hex seed must be {MIN_SEED_BYTES} to {MAX_SEED_BYTES} bytes "
                f"({MIN_SEED_BYTES * 2} to {MAX_SEED_BYTES * 2} hex digits), got {len(digits)} hex digits"
            )
        return Seed(bytes.fromhex(digits))

    mnemonic = " ".join(text.split())
    words = len(mnemonic.split(" ")) if mnemonic else 0
    try:
        valid = bool(Bip39MnemonicValidator().IsValid(mnemonic))
    except Exception:
        valid = False
    if not valid:
        raise ValueError(
            f"seed is neither a hex string of {MIN_SEED_BYTES}-{MAX_SEED_BYTES} bytes nor a valid BIP39 "
            f"mnemonic ({words} words given; check the words and their order)"
        )
    try:
        seed_bytes = bytes(Bip39SeedGenerator(mnemonic).Generate(passphrase))
    except Exception:
        raise ValueError("the BIP39 mnemonic could not be turned into a seed") from None
    return Seed(seed_bytes)


def _as_seed(seed: Seed | bytes) -> Seed:
    return seed if isinstance(seed, Seed) else Seed(seed)


def _node_at(seed: Seed | bytes, child_numbers: tuple[int, ...]) -> Any:
    secret = _as_seed(seed)._secret
    try:
        node = Bip32Secp256k1.FromSeed(secret)
        for number in child_numbers:
            node = node.ChildKey(number)
    except Exception:
        # Astronomically unlikely (an invalid child key); never chain the library's message.
        raise ValueError("key derivation failed at this path; use another index") from None
    return node


def extended_public_key_at(seed: Seed | bytes, full_path: str) -> str:
    """The xpub at a fixed path such as m/44'/60'/0'."""
    return str(_node_at(seed, parse_fixed_path(full_path)).PublicKey().ToExtended())


def account_xpub(seed: Seed | bytes, path_template: str) -> str:
    """The xpub at the account path of `path_template`: what the engine and the watchers are given."""
    return str(_node_at(seed, parse_path(path_template).account).PublicKey().ToExtended())


def escrow_private_key(seed: Seed | bytes, path_template: str, index: int) -> bytes:
    """The 32-byte private key of escrow `index` under `path_template`."""
    node = _node_at(seed, parse_path(path_template).child_numbers(index))
    return bytes(node.PrivateKey().Raw().ToBytes())


def private_key_at(seed: Seed | bytes, full_path: str) -> bytes:
    """The 32-byte private key at a fixed path, e.g. a tank wallet at m/44'/60'/1'/0/0."""
    node = _node_at(seed, parse_fixed_path(full_path))
    return bytes(node.PrivateKey().Raw().ToBytes())
