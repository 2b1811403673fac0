"""Output scripts: their types as bitcoind names them, addresses, scripthashes, dust, asm."""

from __future__ import annotations

import hashlib

from bitcoin.core.script import OPCODE_NAMES, CScript, CScriptOp
from bitcoin.segwit_addr import bech32_hrp_expand, bech32_polymod, convertbits

from .params import fee_for

__all__ = [
    "AddressError",
    "address_of",
    "asm",
    "descriptor",
    "dust_threshold",
    "p2wpkh_script",
    "script_for_address",
    "script_type",
    "scripthash",
]

OP_0 = 0x00
OP_1 = 0x51
OP_16 = 0x60
OP_RETURN = 0x6A
OP_PUSHDATA4 = 0x4E
MAX_OP_RETURN_RELAY = 83
MAX_SCRIPT_SIZE = 10_000

_BECH32_CONST = 1
_BECH32M_CONST = 0x2BC830A3
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


class AddressError(ValueError):
    """Not an address of this chain."""


def scripthash(script: bytes) -> str:
    """The Electrum scripthash: sha256 of the scriptPubKey, bytes reversed, as hex."""
    return hashlib.sha256(script).digest()[::-1].hex()


def p2wpkh_script(program: bytes) -> bytes:
    return bytes([OP_0, 20]) + program


def witness_program(script: bytes) -> tuple[int, bytes] | None:
    """(version, program) when script is a segwit output: a version opcode and one 2..40 byte push."""
    if not 4 <= len(script) <= 42 or script[1] != len(script) - 2:
        return None
    if script[0] == OP_0:
        return 0, script[2:]
    if OP_1 <= script[0] <= OP_16:
        return script[0] - OP_1 + 1, script[2:]
    return None


def _push_only(script: bytes) -> bool:
    try:
        return all(op <= OP_16 for op, _data, _index in _ops(script))
    except ValueError:
        return False


def _ops(script: bytes) -> list[tuple[int, bytes | None, int]]:
    try:
        return list(CScript(script).raw_iter())
    except Exception as exc:  # python-bitcoinlib raises its own truncation errors
        raise ValueError("truncated script") from exc


def script_type(script: bytes) -> str:
    """bitcoind's name for the script's template (Solver), as getrawtransaction reports it."""
    program = witness_program(script)
    if program is not None:
        version, data = program
        if version == 0 and len(data) == 20:
            return "witness_v0_keyhash"
        if version == 0 and len(data) == 32:
            return "witness_v0_scripthash"
        if version == 1 and len(data) == 32:
            return "witness_v1_taproot"
        if version == 1 and data == b"\x4e\x73":
            return "anchor"
        if version != 0:
            return "witness_unknown"
        return "nonstandard"
    if len(script) == 25 and script[:3] == b"\x76\xa9\x14" and script[23:] == b"\x88\xac":
        return "pubkeyhash"
    if len(script) == 23 and script[:2] == b"\xa9\x14" and script[22] == 0x87:
        return "scripthash"
    if script[:1] == bytes([OP_RETURN]) and _push_only(script[1:]):
        return "nulldata"
    if (len(script) == 35 and script[0] == 33 and script[34] == 0xAC) or (
        len(script) == 67 and script[0] == 65 and script[66] == 0xAC
    ):
        return "pubkey"
    return "nonstandard"


STANDARD_OUTPUT_TYPES = frozenset(
    {
        "pubkeyhash",
        "scripthash",
        "pubkey",
        "witness_v0_keyhash",
        "witness_v0_scripthash",
        "witness_v1_taproot",
        "witness_unknown",
        "anchor",
        "nulldata",
    }
)


def is_unspendable(script: bytes) -> bool:
    return script[:1] == bytes([OP_RETURN]) or len(script) > MAX_SCRIPT_SIZE


def dust_threshold(script: bytes, dust_relay_fee: int) -> int:
    """GetDustThreshold: below this an output costs more to spend than it is worth."""
    if is_unspendable(script):
        return 0
    size = 8 + _compact_size_len(len(script)) + len(script)
    # The input that would spend it: outpoint, sequence, a scriptSig or a discounted witness.
    size += 32 + 4 + 1 + (107 // 4) + 4 if witness_program(script) is not None else 32 + 4 + 1 + 107 + 4
    return fee_for(dust_relay_fee, size)


def _compact_size_len(n: int) -> int:
    return 1 if n < 0xFD else 3 if n <= 0xFFFF else 5 if n <= 0xFFFFFFFF else 9


# --- bech32 / bech32m (BIP173, BIP350) ---------------------------------------------------


def _bech32_encode(hrp: str, data: list[int], const: int) -> str:
    values = bech32_hrp_expand(hrp) + data
    polymod = bech32_polymod([*values, 0, 0, 0, 0, 0, 0]) ^ const
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[d] for d in data + checksum)


def _bech32_decode(text: str) -> tuple[str, list[int], int]:
    if any(ord(ch) < 33 or ord(ch) > 126 for ch in text) or (text.lower() != text and text.upper() != text):
        raise AddressError("not a bech32 string")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text) or len(text) > 90:
        raise AddressError("not a bech32 string")
    if not all(ch in _CHARSET for ch in text[pos + 1 :]):
        raise AddressError("invalid bech32 character")
    hrp = text[:pos]
    data = [_CHARSET.find(ch) for ch in text[pos + 1 :]]
    const = bech32_polymod(bech32_hrp_expand(hrp) + data)
    if const not in (_BECH32_CONST, _BECH32M_CONST):
        raise AddressError("bad bech32 checksum")
    return hrp, data[:-6], const


def script_for_address(address: str, hrp: str) -> bytes:
    """The scriptPubKey a segwit address of this chain stands for."""
    got_hrp, data, const = _bech32_decode(address)
    if got_hrp != hrp:
        raise AddressError(f"address prefix {got_hrp!r} is not this chain's {hrp!r}")
    if not data:
        raise AddressError("empty address")
    version = data[0]
    program = convertbits(data[1:], 5, 8, False)
    if version > 16 or program is None or not 2 <= len(program) <= 40:
        raise AddressError("not a segwit address")
    if (version == 0) != (const == _BECH32_CONST):
        raise AddressError("wrong checksum variant for the witness version")
    if version == 0 and len(program) not in (20, 32):
        raise AddressError("a version 0 program is 20 or 32 bytes")
    opcode = OP_0 if version == 0 else OP_1 + version - 1
    return bytes([opcode, len(program)]) + bytes(program)


def address_of(script: bytes, hrp: str) -> str | None:
    """The address of a segwit output script; None for other scripts (they have no alpha address)."""
    program = witness_program(script)
    if program is None:
        return None
    version, data = program
    if version == 0 and len(data) not in (20, 32):
        return None
    five_bit = convertbits(list(data), 8, 5)
    assert five_bit is not None
    return _bech32_encode(hrp, [version, *five_bit], _BECH32_CONST if version == 0 else _BECH32M_CONST)


# --- output descriptors (BIP380), as getrawtransaction's "desc" ------------------------------

_DESC_INPUT_CHARSET = (
    "0123456789()[],'/*abcdefgh@:$%{}IJKLMNOPQRSTUVWXYZ&+-.;<=>?!^_|~ijklmnopqrstuvwxyzABCDEFGH`#\"\\ "
)
_DESC_GENERATOR = (0xF5DEE51989, 0xA9FDCA3312, 0x1BAB10E32D, 0x3706B1677A, 0x644D626FFD)


def _descsum_polymod(symbols: list[int]) -> int:
    chk = 1
    for value in symbols:
        top = chk >> 35
        chk = (chk & 0x7FFFFFFFF) << 5 ^ value
        for i in range(5):
            chk ^= _DESC_GENERATOR[i] if (top >> i) & 1 else 0
    return chk


def descriptor_checksum(desc: str) -> str:
    symbols: list[int] = []
    groups: list[int] = []
    for ch in desc:
        value = _DESC_INPUT_CHARSET.find(ch)
        if value < 0:
            raise ValueError(f"character {ch!r} cannot appear in a descriptor")
        symbols.append(value & 31)
        groups.append(value >> 5)
        if len(groups) == 3:
            symbols.append(groups[0] * 9 + groups[1] * 3 + groups[2])
            groups = []
    if len(groups) == 1:
        symbols.append(groups[0])
    elif len(groups) == 2:
        symbols.append(groups[0] * 3 + groups[1])
    checksum = _descsum_polymod([*symbols, 0, 0, 0, 0, 0, 0, 0, 0]) ^ 1
    return "".join(_CHARSET[(checksum >> (5 * (7 - i))) & 31] for i in range(8))


def descriptor(script: bytes, hrp: str) -> str:
    address = address_of(script, hrp)
    body = f"addr({address})" if address is not None else f"raw({script.hex()})"
    return f"{body}#{descriptor_checksum(body)}"


# --- asm, as bitcoind's ScriptToAsmStr ----------------------------------------------------


def _script_num(data: bytes) -> int:
    if not data:
        return 0
    value = int.from_bytes(data, "little")
    if data[-1] & 0x80:
        return -(value & ~(0x80 << (8 * (len(data) - 1))))
    return value


def asm(script: bytes) -> str:
    parts: list[str] = []
    try:
        ops = _ops(script)
    except ValueError:
        return "[error]"
    for opcode, data, _index in ops:
        if data is not None and opcode <= OP_PUSHDATA4:
            parts.append(str(_script_num(data)) if len(data) <= 4 else data.hex())
        elif opcode == OP_0:
            parts.append("0")
        elif opcode == 0x4F:
            parts.append("-1")
        elif OP_1 <= opcode <= OP_16:
            parts.append(str(opcode - OP_1 + 1))
        else:
            parts.append(OPCODE_NAMES.get(CScriptOp(opcode), "OP_UNKNOWN"))
    return " ".join(parts)
