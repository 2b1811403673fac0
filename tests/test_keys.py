"""Key derivation against published test vectors (BIP32, BIP39, BIP84, the Hardhat/anvil accounts)."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
from bip_utils import Base58Decoder, Base58Encoder, Bip32KeyNetVersions, Bip32Secp256k1, WifDecoder
from bitcoin import segwit_addr  # python-bitcoinlib: decodes independently of the code under test

from otc_common.keys import (
    EscrowKeyring,
    PathTemplate,
    derive_extended_public_key,
    parse_fixed_path,
    parse_path,
)
from otc_common.signing_keys import (
    Seed,
    account_xpub,
    escrow_private_key,
    extended_public_key_at,
    load_seed,
    private_key_at,
)

# --- BIP32 test vector 1 ---------------------------------------------------------------------------

BIP32_SEED_HEX = "000102030405060708090a0b0c0d0e0f"
BIP32_VECTOR_1: dict[str, tuple[str, str]] = {
    "m": (
        "xpub661MyMwAqRbcFtXgS5sYJABqqG9YLmC4Q1Rdap9gSE8NqtwybGhePY2gZ29ESFjqJoCu1Rupje8YtGqsefD265TMg7usUDFdp6W1EGMcet8",
        "xprv9s21ZrQH143K3QTDL4LXw2F7HEK3wJUD2nW2nRk4stbPy6cq3jPPqjiChkVvvNKmPGJxWUtg6LnF5kejMRNNU3TGtRBeJgk33yuGBxrMPHi",
    ),
    "m/0'": (
        "xpub68Gmy5EdvgibQVfPdqkBBCHxA5htiqg55crXYuXoQRKfDBFA1WEjWgP6LHhwBZeNK1VTsfTFUHCdrfp1bgwQ9xv5ski8PX9rL2dZXvgGDnw",
        "xprv9uHRZZhk6KAJC1avXpDAp4MDc3sQKNxDiPvvkX8Br5ngLNv1TxvUxt4cV1rGL5hj6KCesnDYUhd7oWgT11eZG7XnxHrnYeSvkzY7d2bhkJ7",
    ),
    "m/0'/1": (
        "xpub6ASuArnXKPbfEwhqN6e3mwBcDTgzisQN1wXN9BJcM47sSikHjJf3UFHKkNAWbWMiGj7Wf5uMash7SyYq527Hqck2AxYysAA7xmALppuCkwQ",
        "xprv9wTYmMFdV23N2TdNG573QoEsfRrWKQgWeibmLntzniatZvR9BmLnvSxqu53Kw1UmYPxLgboyZQaXwTCg8MSY3H2EU4pWcQDnRnrVA1xe8fs",
    ),
    "m/0'/1/2'": (
        "xpub6D4BDPcP2GT577Vvch3R8wDkScZWzQzMMUm3PWbmWvVJrZwQY4VUNgqFJPMM3No2dFDFGTsxxpG5uJh7n7epu4trkrX7x7DogT5Uv6fcLW5",
        "xprv9z4pot5VBttmtdRTWfWQmoH1taj2axGVzFqSb8C9xaxKymcFzXBDptWmT7FwuEzG3ryjH4ktypQSAewRiNMjANTtpgP4mLTj34bhnZX7UiM",
    ),
    "m/0'/1/2'/2": (
        "xpub6FHa3pjLCk84BayeJxFW2SP4XRrFd1JYnxeLeU8EqN3vDfZmbqBqaGJAyiLjTAwm6ZLRQUMv1ZACTj37sR62cfN7fe5JnJ7dh8zL4fiyLHV",
        "xprvA2JDeKCSNNZky6uBCviVfJSKyQ1mDYahRjijr5idH2WwLsEd4Hsb2Tyh8RfQMuPh7f7RtyzTtdrbdqqsunu5Mm3wDvUAKRHSC34sJ7in334",
    ),
    "m/0'/1/2'/2/1000000000": (
        "xpub6H1LXWLaKsWFhvm6RVpEL9P4KfRZSW7abD2ttkWP3SSQvnyA8FSVqNTEcYFgJS2UaFcxupHiYkro49S8yGasTvXEYBVPamhGW6cFJodrTHy",
        "xprvA41z7zogVVwxVSgdKUHDy1SKmdb533PjDz7J6N6mV6uS3ze1ai8FHa8kmHScGpWmj4WggLyQjgPie1rFSruoUihUZREPSL39UNdE3BBDu76",
    ),
}


def _xpub(path: str) -> str:
    return BIP32_VECTOR_1[path][0]


def _pubkey_of(extended_key: str) -> bytes:
    return bytes(Bip32Secp256k1.FromExtendedKey(extended_key).PublicKey().RawCompressed().ToBytes())


@pytest.fixture(scope="module")
def bip32_seed() -> Seed:
    return load_seed(BIP32_SEED_HEX)


@pytest.mark.parametrize("path", list(BIP32_VECTOR_1))
def test_bip32_vector_1_via_signing_keys(bip32_seed: Seed, path: str) -> None:
    xpub, xprv = BIP32_VECTOR_1[path]
    assert extended_public_key_at(bip32_seed, path) == xpub
    published_private = bytes(Bip32Secp256k1.FromExtendedKey(xprv).PrivateKey().Raw().ToBytes())
    assert private_key_at(bip32_seed, path) == published_private
    # Raw bytes are accepted too, and give the same keys.
    assert private_key_at(bytes.fromhex(BIP32_SEED_HEX), path) == published_private


@pytest.mark.parametrize(
    ("parent", "relative", "child"),
    [
        ("m/0'", "1", "m/0'/1"),
        ("m/0'/1/2'", "2", "m/0'/1/2'/2"),
        ("m/0'/1/2'/2", "1000000000", "m/0'/1/2'/2/1000000000"),
        ("m/0'/1/2'", "2/1000000000", "m/0'/1/2'/2/1000000000"),
        ("m/0'", "", "m/0'"),
    ],
)
def test_bip32_vector_1_non_hardened_steps_via_public_derivation(parent: str, relative: str, child: str) -> None:
    assert derive_extended_public_key(_xpub(parent), relative) == _xpub(child)


@pytest.mark.parametrize(("parent", "relative"), [("m", "0'"), ("m/0'/1", "2'"), ("m/0'", "1/2h")])
def test_hardened_steps_cannot_be_derived_from_an_xpub(parent: str, relative: str) -> None:
    with pytest.raises(ValueError, match="hardened"):
        derive_extended_public_key(_xpub(parent), relative)


def test_bip32_vector_1_via_keyring(bip32_seed: Seed) -> None:
    template = "m/0'/{index}"
    assert account_xpub(bip32_seed, template) == _xpub("m/0'")
    keyring = EscrowKeyring(_xpub("m/0'"), template)
    assert keyring.public_key(1) == _pubkey_of(_xpub("m/0'/1"))


def test_bip32_vector_1_escrow_private_key(bip32_seed: Seed) -> None:
    published = bytes(Bip32Secp256k1.FromExtendedKey(BIP32_VECTOR_1["m/0'/1"][1]).PrivateKey().Raw().ToBytes())
    assert escrow_private_key(bip32_seed, "m/0'/{index}", 1) == published


# --- BIP39 / BIP84 ---------------------------------------------------------------------------------

ABANDON_ABOUT = " ".join(["abandon"] * 11 + ["about"])
BIP84_TEMPLATE = "m/84'/0'/0'/0/{index}"
BIP84_ACCOUNT_ZPRV = (
    "zprvAdG4iTXWBoARxkkzNpNh8r6Qag3irQB8PzEMkAFeTRXxHpbF9z4QgEvBRmfvqWvGp42t42nvgGpNgYSJA9iefm1yYNZKEm7z6qUWCroSQnE"
)
BIP84_ACCOUNT_ZPUB = (
    "zpub6rFR7y4Q2AijBEqTUquhVz398htDFrtymD9xYYfG1m4wAcvPhXNfE3EfH1r1ADqtfSdVCToUG868RvUUkgDKf31mGDtKsAYz2oz2AGutZYs"
)
BIP84_RECEIVE = [
    (
        "KyZpNDKnfs94vbrwhJneDi77V6jF64PWPF8x5cdJb8ifgg2DUc9d",
        "0330d54fd0dd420a6e5f8d3624f5f3482cae350f79d5f0753bf5beef9c2d91af3c",
        "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu",
    ),
    (
        "Kxpf5b8p3qX56DKEe5NqWbNUP9MnqoRFzZwHRtsFqhzuvUJsYZCy",
        "03e775fd51f0dfb8cd865d9ff1cca2a158cf651fe997fdc9fee9c1d3b5e995ea77",
        "bc1qnjg0jd8228aq7egyzacy8cys3knf9xvrerkf9g",
    ),
]
BIP84_CHANGE_0 = (
    "KxuoxufJL5csa1Wieb2kp29VNdn92Us8CoaUG3aGtPtcF3AzeXvF",
    "03025324888e429ab8e3dbaf1f7802648b9cd01e9b418485c5fa4c1b9b5700e1a6",
    "bc1q8c6fshw2dlwun7ekn9qwf37cu2rn755upcp6el",
)
ZPUB_VERSION = bytes.fromhex("04b24746")
ZPRV_VERSION = bytes.fromhex("04b2430c")


def _reversion(extended_key: str, version: bytes) -> str:
    return str(Base58Encoder.CheckEncode(version + bytes(Base58Decoder.CheckDecode(extended_key))[4:]))


@pytest.fixture(scope="module")
def abandon_seed() -> Seed:
    return load_seed(ABANDON_ABOUT)


def test_bip84_published_account_keys_agree() -> None:
    node = Bip32Secp256k1.FromExtendedKey(BIP84_ACCOUNT_ZPRV, Bip32KeyNetVersions(ZPUB_VERSION, ZPRV_VERSION))
    assert node.PublicKey().ToExtended() == BIP84_ACCOUNT_ZPUB


def test_bip84_account_xpub(abandon_seed: Seed) -> None:
    xpub = account_xpub(abandon_seed, BIP84_TEMPLATE)
    assert xpub.startswith("xpub")
    assert _reversion(xpub, ZPUB_VERSION) == BIP84_ACCOUNT_ZPUB


@pytest.mark.parametrize("account_key", ["xpub", "zpub"])
@pytest.mark.parametrize("index", [0, 1])
def test_bip84_receive_addresses(abandon_seed: Seed, account_key: str, index: int) -> None:
    wif, pubkey_hex, address = BIP84_RECEIVE[index]
    xpub = account_xpub(abandon_seed, BIP84_TEMPLATE) if account_key == "xpub" else BIP84_ACCOUNT_ZPUB
    keyring = EscrowKeyring(xpub, BIP84_TEMPLATE)
    assert keyring.public_key(index).hex() == pubkey_hex
    assert keyring.utxo_address(index, "bc") == address
    assert escrow_private_key(abandon_seed, BIP84_TEMPLATE, index) == bytes(WifDecoder.Decode(wif)[0])


def test_bip84_change_address(abandon_seed: Seed) -> None:
    wif, pubkey_hex, address = BIP84_CHANGE_0
    template = "m/84'/0'/0'/1/{index}"
    keyring = EscrowKeyring(BIP84_ACCOUNT_ZPUB, template)
    assert keyring.public_key(0).hex() == pubkey_hex
    assert keyring.utxo_address(0, "bc") == address
    assert private_key_at(abandon_seed, "m/84'/0'/0'/1/0") == bytes(WifDecoder.Decode(wif)[0])


def test_same_key_with_alpha_prefix() -> None:
    keyring = EscrowKeyring(BIP84_ACCOUNT_ZPUB, BIP84_TEMPLATE)
    alpha = keyring.utxo_address(0, "alpha")
    assert alpha.startswith("alpha1q")
    _, published_program = segwit_addr.decode("bc", BIP84_RECEIVE[0][2])
    version, program = segwit_addr.decode("alpha", alpha)
    assert version == 0
    assert bytes(program) == bytes(published_program)


def test_derive_extended_public_key_keeps_the_version() -> None:
    child = derive_extended_public_key(BIP84_ACCOUNT_ZPUB, "0")
    assert child.startswith("zpub")
    assert derive_extended_public_key(child, "0").startswith("zpub")
    assert (
        _pubkey_of(_reversion(derive_extended_public_key(child, "0"), bytes.fromhex("0488b21e"))).hex()
        == (BIP84_RECEIVE[0][1])
    )


def test_bip39_passphrase_trezor_vector() -> None:
    # Trezor's python-mnemonic vectors: this mnemonic with passphrase "TREZOR" gives this master xprv.
    published_xprv = (
        "xprv9s21ZrQH143K3h3fDYiay8mocZ3afhfULfb5GX8kCBdno77K4HiA"
        "15Tg23wpbeF1pLfs1c5SPmYHrEpTuuRhxMwvKDwqdKiGJS9XFKzUsAF"
    )
    seed = load_seed(ABANDON_ABOUT, passphrase="TREZOR")
    published = Bip32Secp256k1.FromExtendedKey(published_xprv)
    assert extended_public_key_at(seed, "m") == published.PublicKey().ToExtended()
    assert private_key_at(seed, "m") == bytes(published.PrivateKey().Raw().ToBytes())
    assert seed != load_seed(ABANDON_ABOUT)


def test_mnemonic_whitespace_is_normalised(abandon_seed: Seed) -> None:
    assert load_seed("  " + ABANDON_ABOUT.replace(" ", "\n  ", 3) + "\n") == abandon_seed


# --- Ethereum (Hardhat / anvil default accounts) ---------------------------------------------------

HARDHAT_MNEMONIC = "test test test test test test test test test test test junk"
EVM_TEMPLATE = "m/44'/60'/0'/0/{index}"


def test_hardhat_accounts() -> None:
    seed = load_seed(HARDHAT_MNEMONIC)
    keyring = EscrowKeyring(account_xpub(seed, EVM_TEMPLATE), EVM_TEMPLATE)
    assert keyring.evm_address(0) == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    assert keyring.evm_address(1) == "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    assert escrow_private_key(seed, EVM_TEMPLATE, 0).hex() == (
        "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
    )
    assert private_key_at(seed, "m/44'/60'/0'/0/0") == escrow_private_key(seed, EVM_TEMPLATE, 0)


def test_public_and_private_derivation_agree() -> None:
    seed = load_seed(HARDHAT_MNEMONIC)
    keyring = EscrowKeyring(account_xpub(seed, EVM_TEMPLATE), EVM_TEMPLATE)
    for index in (0, 7, 2**31 - 1):
        private = escrow_private_key(seed, EVM_TEMPLATE, index)
        assert len(private) == 32
        public = Bip32Secp256k1.FromPrivateKey(private).PublicKey().RawCompressed().ToBytes()
        assert keyring.public_key(index) == bytes(public)
        assert len(keyring.public_key(index)) == 33


# --- path templates --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "account_path", "suffix", "full_path_7"),
    [
        ("m/44'/60'/0'/0/{index}", "m/44'/60'/0'", "0/{index}", "m/44'/60'/0'/0/7"),
        ("m/84'/0'/0'/0/{index}", "m/84'/0'/0'", "0/{index}", "m/84'/0'/0'/0/7"),
        ("m/44h/60H/0'/0/{index}", "m/44'/60'/0'", "0/{index}", "m/44'/60'/0'/0/7"),
        ("m/0'/{index}", "m/0'", "{index}", "m/0'/7"),
        ("m/44'/60'/0'/0'/{index}", "m/44'/60'/0'/0'", "{index}", "m/44'/60'/0'/0'/7"),
        ("m/44'/60'/0'/1/2/{index}", "m/44'/60'/0'", "1/2/{index}", "m/44'/60'/0'/1/2/7"),
    ],
)
def test_parse_path(template: str, account_path: str, suffix: str, full_path_7: str) -> None:
    parsed = parse_path(template)
    assert isinstance(parsed, PathTemplate)
    assert parsed.account_path == account_path
    assert parsed.suffix == suffix
    assert parsed.template == f"{account_path}/{suffix}"
    assert parsed.full_path(7) == full_path_7
    assert parse_fixed_path(full_path_7) == parsed.child_numbers(7)


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("m/44'/60'/0'/0/0", "no {index}"),
        ("m/44'/60'/0'/0/{index}'", "must not be hardened"),
        ("m/44'/60'/0'/0/{index}h", "must not be hardened"),
        ("m/44'/60'/0'/{index}/0", "must be the last element"),
        ("m/44'/60'/0/1'/{index}", "hardened element 1' follows a non-hardened one"),
        ("m/44'/60'/0'/0/1'/{index}", "everything after the account path m/44'/60'/0'"),
        ("m/0/{index}", "at least one hardened element"),
        ("m/{index}", "at least one hardened element"),
        ("44'/60'/0'/0/{index}", "must start with m/"),
        ("M/44'/60'/0'/0/{index}", "must start with m/"),
        ("", "must start with m/"),
        ("m/44'/60'//0/{index}", "empty element"),
        ("m/44'/60'/0'/0/{index}/", "empty element"),
        ("m/2147483648'/0/{index}", "out of range"),
        ("m/-1'/0/{index}", "not a number"),
        ("m/01'/0/{index}", "not a number"),
        ("m/44''/0/{index}", "not a number"),
        ("m/ 44'/0/{index}", "not a number"),
        ("m/44'/60'/0'/0/{index}{index}", "must not be hardened or combined"),
    ],
)
def test_parse_path_rejects(template: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_path(template)
    assert fragment in str(info.value)


@pytest.mark.parametrize("value", [None, 44, b"m/44'/{index}"])
def test_parse_path_rejects_non_strings(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_path(value)


@pytest.mark.parametrize("index", [-1, 2**31, 2**32, True, 1.0, "1"])
def test_index_range(index: Any) -> None:
    keyring = EscrowKeyring(BIP84_ACCOUNT_ZPUB, BIP84_TEMPLATE)
    with pytest.raises(ValueError, match="index"):
        keyring.public_key(index)
    with pytest.raises(ValueError, match="index"):
        keyring.evm_address(index)
    with pytest.raises(ValueError, match="index"):
        parse_path(BIP84_TEMPLATE).full_path(index)
    with pytest.raises(ValueError, match="index"):
        escrow_private_key(bytes.fromhex(BIP32_SEED_HEX), BIP84_TEMPLATE, index)


def test_largest_index_is_accepted() -> None:
    keyring = EscrowKeyring(BIP84_ACCOUNT_ZPUB, BIP84_TEMPLATE)
    assert len(keyring.public_key(2**31 - 1)) == 33


# --- keyring refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("private_key", [BIP32_VECTOR_1["m/0'"][1], BIP84_ACCOUNT_ZPRV])
def test_keyring_refuses_extended_private_keys_without_echoing_them(private_key: str) -> None:
    template = "m/0'/{index}" if private_key.startswith("xprv") else BIP84_TEMPLATE
    with pytest.raises(ValueError) as info:
        EscrowKeyring(private_key, template)
    assert "PRIVATE" in str(info.value)
    assert private_key not in str(info.value)
    assert private_key[4:20] not in str(info.value)
    with pytest.raises(ValueError):
        derive_extended_public_key(private_key, "0")


def test_keyring_refuses_xpub_at_wrong_depth() -> None:
    with pytest.raises(ValueError, match="depth 2"):
        EscrowKeyring(_xpub("m/0'/1"), "m/0'/{index}")


def test_keyring_refuses_xpub_of_another_account() -> None:
    seed = load_seed(HARDHAT_MNEMONIC)
    other_account = account_xpub(seed, "m/44'/60'/1'/0/{index}")
    with pytest.raises(ValueError, match="ends in 0'"):
        EscrowKeyring(other_account, EVM_TEMPLATE)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "base58check"),
        ("not an xpub", "base58check"),
        (_xpub("m/0'")[:-1] + ("a" if _xpub("m/0'")[-1] != "a" else "b"), "base58check"),
        (str(Base58Encoder.CheckEncode(b"\x00" * 78)), "unknown version"),
        (str(Base58Encoder.CheckEncode(b"\x04\x88\xb2\x1e" + b"\x00" * 40)), "wrong length"),
    ],
)
def test_keyring_refuses_garbage(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        EscrowKeyring(text, "m/0'/{index}")


def test_keyring_repr_names_the_path_only() -> None:
    keyring = EscrowKeyring(BIP84_ACCOUNT_ZPUB, BIP84_TEMPLATE)
    assert repr(keyring) == "EscrowKeyring(path=\"m/84'/0'/0'/0/{index}\")"
    assert keyring.path == parse_path(BIP84_TEMPLATE)


# --- seeds -----------------------------------------------------------------------------------------


def test_seed_repr_is_redacted(abandon_seed: Seed) -> None:
    for shown in (
        repr(abandon_seed),
        str(abandon_seed),
        f"{abandon_seed}",
        f"{abandon_seed!r}",
        str([abandon_seed]),
    ):
        assert "redacted" in shown
        assert "abandon" not in shown
    raw = load_seed(BIP32_SEED_HEX)
    assert BIP32_SEED_HEX not in repr(raw)
    assert "\\x00\\x01" not in repr(raw)


def test_seed_cannot_be_pickled_or_copied(abandon_seed: Seed) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(abandon_seed)
    with pytest.raises(TypeError):
        copy.copy(abandon_seed)


def test_hex_seed_forms() -> None:
    reference = load_seed(BIP32_SEED_HEX)
    assert load_seed("0x" + BIP32_SEED_HEX) == reference
    assert load_seed(BIP32_SEED_HEX.upper() + "\n") == reference
    assert load_seed("ab" * 64) != reference


@pytest.mark.parametrize(
    "secret",
    [
        "00" * 15,  # 15 bytes
        "00" * 65,  # 65 bytes
        "000",  # odd number of hex digits
    ],
)
def test_hex_seed_length_is_checked_without_echoing_it(secret: str) -> None:
    with pytest.raises(ValueError) as info:
        load_seed(secret)
    assert "16 to 64 bytes" in str(info.value)
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    "secret",
    [
        " ".join(["abandon"] * 12),  # bad checksum
        " ".join(["abandon"] * 11 + ["notaword"]),
        ABANDON_ABOUT.replace("about", "zoo"),
        "",
        "correct horse battery staple",
    ],
)
def test_bad_mnemonic_is_refused_without_echoing_it(secret: str) -> None:
    with pytest.raises(ValueError) as info:
        load_seed(secret)
    message = str(info.value)
    assert "BIP39 mnemonic" in message
    for word in set(secret.split()):
        assert word not in message
    assert info.value.__cause__ is None


def test_passphrase_with_hex_seed_is_refused() -> None:
    with pytest.raises(ValueError, match="passphrase"):
        load_seed(BIP32_SEED_HEX, passphrase="x")


@pytest.mark.parametrize("secret", [b"\x00" * 15, b"\x00" * 65, "not bytes"])
def test_seed_constructor_checks(secret: Any) -> None:
    with pytest.raises(ValueError):
        Seed(secret)
