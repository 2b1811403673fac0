from __future__ import annotations

import hashlib
from typing import Any

import pytest
from bip_utils.bech32.bech32 import Bech32Encodings, Bech32Utils
from bip_utils.bech32.bech32_base import Bech32BaseConst, Bech32BaseUtils
from bitcoin import segwit_addr  # python-bitcoinlib: an implementation independent of the one under test

from otc_common.addresses import (
    AddressError,
    electrum_scripthash,
    evm_checksum_address,
    utxo_script_pubkey,
    validate_evm_address,
    validate_hrp,
    validate_utxo_address,
)

# EIP-55's published examples (the last four are all-caps / all-lowercase by the checksum itself).
EIP55_VECTORS = [
    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
    "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
    "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
    "0x52908400098527886E0F7030069857D2E4169EE7",
    "0x8617E340B3D01FA5F11F306F4090FD50E238070D",
    "0xde709f2102306220921060314715629080e2fb77",
    "0x27b1fdb04752bbc536007a920d24acb045561c26",
]
GOOD_EVM = EIP55_VECTORS[0]

# The BIP84 vector's first receive key hash (see test_keys.py), as an alpha1 P2WPKH program.
P2WPKH_PROGRAM = bytes.fromhex("c0cebcd6c3d3ca8c75dc5ec62ebe55330ef910e2")
P2WSH_PROGRAM = bytes.fromhex("1863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262")
TAPROOT_PROGRAM = bytes.fromhex("79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")


def _encode(hrp: str, version: int, program: bytes, encoding: Bech32Encodings) -> str:
    """Any (even invalid) segwit-shaped string, to test what the validator refuses."""
    data = [version, *Bech32BaseUtils.ConvertBits(program, 8, 5)]
    checksum = Bech32Utils.ComputeChecksum(hrp, data, encoding)
    return hrp + "1" + "".join(Bech32BaseConst.CHARSET[v] for v in data + checksum)


ALPHA_P2WPKH = segwit_addr.encode("alpha", 0, P2WPKH_PROGRAM)
ALPHA_P2WSH = segwit_addr.encode("alpha", 0, P2WSH_PROGRAM)
ALPHA_TAPROOT = _encode("alpha", 1, TAPROOT_PROGRAM, Bech32Encodings.BECH32M)


# --- EVM -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("address", EIP55_VECTORS)
def test_eip55_published_vectors_are_accepted(address: str) -> None:
    assert validate_evm_address(address) == address
    assert evm_checksum_address(address.lower()) == address


def test_hardhat_account_zero_is_accepted() -> None:
    assert validate_evm_address("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266") == (
        "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    )


def _flip_case_of_first_letter(address: str) -> str:
    body = address[2:]
    i = next(i for i, ch in enumerate(body) if ch.isalpha())
    return "0x" + body[:i] + body[i].swapcase() + body[i + 1 :]


@pytest.mark.parametrize("address", EIP55_VECTORS)
def test_bad_checksum_is_rejected(address: str) -> None:
    with pytest.raises(AddressError, match="checksum"):
        validate_evm_address(_flip_case_of_first_letter(address))


@pytest.mark.parametrize("address", [GOOD_EVM.lower(), "0x" + GOOD_EVM[2:].upper()])
def test_unchecksummed_forms_are_rejected_with_a_clear_message(address: str) -> None:
    with pytest.raises(AddressError, match=r"checksummed \(EIP-55"):
        validate_evm_address(address)


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("", "empty"),
        (GOOD_EVM[:-1], "this one has 39"),
        (GOOD_EVM + "a", "this one has 41"),
        ("0x", "this one has 0"),
        (GOOD_EVM[2:], "must start with 0x"),
        ("0X" + GOOD_EVM[2:], "must start with 0x"),
        ("0x" + "g" * 40, "hexadecimal digits"),
        (GOOD_EVM[:-1] + "z", "hexadecimal digits"),
        (GOOD_EVM[:-1] + "٣", "hexadecimal digits"),
        (" " + GOOD_EVM, "spaces"),
        (GOOD_EVM + "\n", "spaces"),
        ("0x" + "0" * 40, "zero address"),
    ],
)
def test_malformed_evm_addresses(address: str, fragment: str) -> None:
    with pytest.raises(AddressError, match=fragment):
        validate_evm_address(address)


@pytest.mark.parametrize("value", [None, 1, b"0x00"])
def test_evm_non_string(value: Any) -> None:
    with pytest.raises(AddressError):
        validate_evm_address(value)


# --- UTXO ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "hrp", "script_hex"),
    [
        # BIP173's published example, in upper case as the BIP gives it.
        ("BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4", "bc", "0014751e76e8199196d454941c45d1b3a323f1433bd6"),
        (
            "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7",
            "tb",
            "00201863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262",
        ),
        # BIP350's published v1 example.
        (
            "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
            "bc",
            "512079be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
        ),
    ],
)
def test_published_segwit_vectors(address: str, hrp: str, script_hex: str) -> None:
    assert validate_utxo_address(address, hrp) == address.lower()
    assert utxo_script_pubkey(address, hrp).hex() == script_hex


def test_alpha_addresses_are_accepted() -> None:
    assert ALPHA_P2WPKH.startswith("alpha1q")
    assert validate_utxo_address(ALPHA_P2WPKH, "alpha") == ALPHA_P2WPKH
    assert validate_utxo_address(ALPHA_P2WPKH.upper(), "alpha") == ALPHA_P2WPKH
    assert utxo_script_pubkey(ALPHA_P2WPKH, "alpha") == b"\x00\x14" + P2WPKH_PROGRAM
    assert validate_utxo_address(ALPHA_P2WSH, "alpha") == ALPHA_P2WSH
    assert utxo_script_pubkey(ALPHA_P2WSH, "alpha") == b"\x00\x20" + P2WSH_PROGRAM
    assert validate_utxo_address(ALPHA_TAPROOT, "alpha") == ALPHA_TAPROOT
    assert utxo_script_pubkey(ALPHA_TAPROOT, "alpha") == b"\x51\x20" + TAPROOT_PROGRAM


def test_mainnet_bitcoin_address_is_rejected_for_alpha() -> None:
    bc = segwit_addr.encode("bc", 0, P2WPKH_PROGRAM)
    assert validate_utxo_address(bc, "bc") == bc
    with pytest.raises(AddressError) as info:
        validate_utxo_address(bc, "alpha")
    assert "alpha1" in str(info.value)
    assert "got bc1" in str(info.value)


@pytest.mark.parametrize("hrp", ["tb", "bcrt", "alphax", "alph"])
def test_other_prefixes_are_rejected_for_alpha(hrp: str) -> None:
    with pytest.raises(AddressError, match="expected an address starting with alpha1"):
        validate_utxo_address(segwit_addr.encode(hrp, 0, P2WPKH_PROGRAM), "alpha")


def test_alpha_address_is_rejected_for_bitcoin() -> None:
    with pytest.raises(AddressError, match="starting with bc1"):
        validate_utxo_address(ALPHA_P2WPKH, "bc")


def _change_one_char(address: str, position: int) -> str:
    position %= len(address)
    ch = address[position]
    replacement = next(c for c in str(Bech32BaseConst.CHARSET) if c != ch)
    return address[:position] + replacement + address[position + 1 :]


@pytest.mark.parametrize("position", [-1, -7, 10, len("alpha1") + 1])
def test_wrong_checksum_is_rejected(position: int) -> None:
    with pytest.raises(AddressError, match="checksum does not match"):
        validate_utxo_address(_change_one_char(ALPHA_P2WPKH, position), "alpha")


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        (_encode("alpha", 0, P2WPKH_PROGRAM, Bech32Encodings.BECH32M), "wrong checksum kind"),
        (_encode("alpha", 1, TAPROOT_PROGRAM, Bech32Encodings.BECH32), "wrong checksum kind"),
        (_encode("alpha", 0, bytes(25), Bech32Encodings.BECH32), "25-byte witness program; version 0"),
        (_encode("alpha", 0, bytes(2), Bech32Encodings.BECH32), "2-byte witness program; version 0"),
        (_encode("alpha", 1, bytes(20), Bech32Encodings.BECH32M), "20-byte witness program; version 1"),
        (_encode("alpha", 2, bytes(32), Bech32Encodings.BECH32M), "witness version 2"),
        (_encode("alpha", 16, bytes(32), Bech32Encodings.BECH32M), "witness version 16"),
    ],
)
def test_wrong_witness_version_or_length(address: str, fragment: str) -> None:
    with pytest.raises(AddressError, match=fragment):
        validate_utxo_address(address, "alpha")


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("", "empty"),
        (" " + ALPHA_P2WPKH, "spaces"),
        (ALPHA_P2WPKH[:8] + ALPHA_P2WPKH[8:].upper(), "mixes upper and lower case"),
        ("alpha1" + "q" * 90, "too long"),
        ("alpha1qqqq", "too short"),
        (ALPHA_P2WPKH[:-1] + "b", "'b'"),
        (ALPHA_P2WPKH[:-2] + "io", "'i', 'o'"),
        ("qqqqqqqqqqqqqq", "must start with alpha1"),
        ("1qqqqqqqqqqqqq", "must start with alpha1"),
        (ALPHA_P2WPKH.replace("q", "é", 1), "never appear"),
    ],
)
def test_malformed_utxo_addresses(address: str, fragment: str) -> None:
    with pytest.raises(AddressError, match=fragment):
        validate_utxo_address(address, "alpha")


@pytest.mark.parametrize("hrp", ["", "Alpha", "al pha", "x" * 84])
def test_bad_hrp_is_a_configuration_error(hrp: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_utxo_address(ALPHA_P2WPKH, hrp)
    assert not isinstance(info.value, AddressError)
    with pytest.raises(ValueError):
        validate_hrp(hrp)


# --- Electrum scripthash ---------------------------------------------------------------------------


def test_electrum_scripthash_published_example() -> None:
    # The Electrum protocol documentation's example: the P2PKH script of 1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa.
    script = bytes.fromhex("76a91462e907b15cbf27d5425399ebf6f0fb50ebb88f1888ac")
    assert electrum_scripthash(script) == "8b01df4e368ea28f8dc0423bcf7a4923e3a12d307c875e47a0cfbf90b5c39161"


def test_electrum_scripthash_of_alpha_address() -> None:
    script = utxo_script_pubkey(ALPHA_P2WPKH, "alpha")
    assert electrum_scripthash(script) == hashlib.sha256(script).digest()[::-1].hex()


@pytest.mark.parametrize("value", [b"", "0014", None])
def test_electrum_scripthash_rejects_non_scripts(value: Any) -> None:
    with pytest.raises(ValueError):
        electrum_scripthash(value)
