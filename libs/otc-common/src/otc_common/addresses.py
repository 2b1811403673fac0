"""Address validation for the chains the broker serves, and the Electrum scripthash of an address.

Addresses arrive from traders and from the operator's config; a typo must fail here, with a message
that says what is wrong, rather than send funds somewhere nobody controls.
"""

from __future__ import annotations

import hashlib
import re

from bip_utils import Kekkak256, SegwitBech32Encoder
from bip_utils.bech32.bech32 import Bech32Encodings, Bech32Utils
from bip_utils.bech32.bech32_base import Bech32BaseConst, Bech32BaseUtils

__all__ = [
    "AddressError",
    "electrum_scripthash",
    "evm_checksum_address",
    "segwit_address",
    "utxo_script_pubkey",
    "validate_evm_address",
    "validate_hrp",
    "validate_utxo_address",
]

_HEX40_RE = re.compile(r"[0-9a-fA-F]{40}", re.ASCII)
_HRP_RE = re.compile(r"[a-z0-9]{1,83}", re.ASCII)
# BIP173: a bech32 string is at most 90 characters.
_BECH32_MAX_LEN = 90
_CHECKSUM_LEN = 6
_ZERO_EVM = "0x" + "0" * 40

# scriptPubKey opcodes for witness versions 0 and 1 (OP_0, OP_1).
_WITNESS_VERSION_OPCODE = {0: 0x00, 1: 0x51}


class AddressError(ValueError):
    """An address that cannot be accepted; the message says why in words a trader understands."""


def evm_checksum_address(hex40: str) -> str:
    """The EIP-55 form of a 40-hex-digit address (with or without `0x`)."""
    body = hex40[2:] if hex40.startswith("0x") else hex40
    if _HEX40_RE.fullmatch(body) is None:
        raise ValueError("an EVM address is 40 hexadecimal digits")
    lower = body.lower()
    digest = bytes(Kekkak256.QuickDigest(lower.encode("ascii"))).hex()
    return "0x" + "".join(
        ch.upper() if int(nibble, 16) >= 8 else ch for ch, nibble in zip(lower, digest[:40], strict=True)
    )


def validate_evm_address(text: str) -> str:
    """Accept only the EIP-55 checksummed form, so that a mistyped character is caught.

    An all-lowercase or all-uppercase address carries no checksum; accepting it would let a typo
    through, so it is refused with a message asking for the checksummed form.
    """
    if not isinstance(text, str):
        raise AddressError("EVM address must be a string")
    if not text:
        raise AddressError("EVM address is empty")
    if text != text.strip():
        raise AddressError("EVM address must not have spaces around it")
    if not text.startswith("0x"):
        raise AddressError("EVM address must start with 0x")
    body = text[2:]
    if not body.isascii() or any(ch not in "0123456789abcdefABCDEF" for ch in body):
        raise AddressError("EVM address may contain only hexadecimal digits (0-9, a-f) after 0x")
    if len(body) != 40:
        raise AddressError(f"EVM address must have 40 hexadecimal digits after 0x, this one has {len(body)}")
    checksummed = evm_checksum_address(body)
    if text != checksummed:
        letters = [ch for ch in body if ch.isalpha()]
        if all(ch.islower() for ch in letters) or all(ch.isupper() for ch in letters):
            raise AddressError(
                "EVM address must be in its checksummed (EIP-55, mixed-case) form; "
                "copy it from your wallet rather than retyping it"
            )
        raise AddressError(
            "EVM address checksum (its EIP-55 mix of upper and lower case) does not match; check for a typo"
        )
    if checksummed == _ZERO_EVM:
        raise AddressError("EVM address is the zero address; funds sent there are lost")
    return checksummed


def validate_hrp(hrp: str) -> str:
    """A bech32 human-readable part as the config spells it (lowercase, e.g. "alpha", "bc", "tb")."""
    if not isinstance(hrp, str) or _HRP_RE.fullmatch(hrp) is None:
        raise ValueError("the address prefix (bech32 hrp) must be 1-83 lowercase letters or digits")
    return hrp


def _decode_segwit(text: str, hrp: str) -> tuple[int, bytes]:
    validate_hrp(hrp)
    if not isinstance(text, str):
        raise AddressError("address must be a string")
    if not text:
        raise AddressError("address is empty")
    if text != text.strip():
        raise AddressError("address must not have spaces around it")
    if not text.isascii() or any(ch.isspace() for ch in text):
        raise AddressError("address contains characters that never appear in an address")
    if len(text) > _BECH32_MAX_LEN:
        raise AddressError(f"address is too long (at most {_BECH32_MAX_LEN} characters)")
    if text != text.lower() and text != text.upper():
        raise AddressError("address mixes upper and lower case letters")
    lowered = text.lower()
    separator = lowered.rfind("1")
    if separator <= 0:
        raise AddressError(f"address must start with {hrp}1")
    got = lowered[:separator]
    if got != hrp:
        raise AddressError(f"address is for another network: expected an address starting with {hrp}1, got {got}1")
    data_part = lowered[separator + 1 :]
    bad = sorted({ch for ch in data_part if ch not in Bech32BaseConst.CHARSET})
    if bad:
        shown = ", ".join(repr(ch) for ch in bad)
        raise AddressError(f"address contains {shown}, which never appear{'s' if len(bad) == 1 else ''} after {hrp}1")
    if len(data_part) < 1 + _CHECKSUM_LEN:
        raise AddressError("address is too short")
    values = [Bech32BaseConst.CHARSET.index(ch) for ch in data_part]
    version = values[0]
    # BIP350: version 0 uses the bech32 checksum, every later version bech32m.
    encoding = Bech32Encodings.BECH32 if version == 0 else Bech32Encodings.BECH32M
    if not Bech32Utils.VerifyChecksum(hrp, values, encoding):
        other = Bech32Encodings.BECH32M if version == 0 else Bech32Encodings.BECH32
        if Bech32Utils.VerifyChecksum(hrp, values, other):
            raise AddressError(f"address has the wrong checksum kind for witness version {version} (bech32 vs bech32m)")
        raise AddressError("address checksum does not match; check it for a typo")
    converted = Bech32BaseUtils.ConvertBits(values[1:-_CHECKSUM_LEN], 5, 8, False)
    if converted is None:
        raise AddressError(f"not a valid {hrp}1 segwit address (bad padding)")
    program = bytes(converted)
    if version == 0 and len(program) in (20, 32):
        return version, program
    if version == 1 and len(program) == 32:
        return version, program
    if version == 0:
        raise AddressError(
            f"address has a {len(program)}-byte witness program; version 0 needs 20 (P2WPKH) or 32 (P2WSH)"
        )
    if version == 1:
        raise AddressError(f"address has a {len(program)}-byte witness program; version 1 needs 32")
    raise AddressError(f"address uses witness version {version}, which is not supported (only 0 and 1)")


def validate_utxo_address(text: str, hrp: str) -> str:
    """A segwit address with exactly prefix `hrp`: v0 P2WPKH/P2WSH or v1 (taproot); returned lowercase."""
    _decode_segwit(text, hrp)
    return text.lower()


def segwit_address(hrp: str, version: int, program: bytes) -> str:
    """Encode a witness program as a bech32 (v0) or bech32m (v1+) address with prefix `hrp`."""
    validate_hrp(hrp)
    return str(SegwitBech32Encoder.Encode(hrp, version, program))


def utxo_script_pubkey(address: str, hrp: str) -> bytes:
    """The scriptPubKey an output to `address` carries: OP_n followed by a push of the witness program."""
    version, program = _decode_segwit(address, hrp)
    return bytes([_WITNESS_VERSION_OPCODE[version], len(program)]) + program


def electrum_scripthash(script_pubkey: bytes) -> str:
    """The Electrum protocol's key for an output script: sha256 of the script, bytes reversed, as hex."""
    if not isinstance(script_pubkey, bytes | bytearray) or not script_pubkey:
        raise ValueError("script_pubkey must be non-empty bytes")
    return hashlib.sha256(script_pubkey).digest()[::-1].hex()
