"""Escrow addresses from an account-level extended public key (BIP32 public derivation, secp256k1).

No private key material ever enters this module: the engine and the watchers use it to know the
escrow addresses, and they hold only the account xpub. Anything that needs the seed lives in
`otc_common.signing_keys`, which this module must never import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bip_utils import (
    Base58Decoder,
    Bip32KeyNetVersions,
    Bip32Secp256k1,
    EthAddrEncoder,
    Hash160,
)

from otc_common.addresses import segwit_address

__all__ = [
    "HARDENED",
    "EscrowKeyring",
    "PathTemplate",
    "derive_extended_public_key",
    "format_path",
    "parse_fixed_path",
    "parse_path",
]

HARDENED = 0x80000000
INDEX_PLACEHOLDER = "{index}"

_ELEMENT_RE = re.compile(r"(0|[1-9][0-9]*)(['hH]?)", re.ASCII)

# Extended public key version bytes that differ only in what wallets display; the key data is the same,
# so the address kind is decided by the chain's config, not by the prefix the operator exported.
_PUBLIC_VERSIONS: dict[bytes, bytes] = {
    bytes.fromhex("0488b21e"): bytes.fromhex("0488ade4"),  # xpub / xprv
    bytes.fromhex("049d7cb2"): bytes.fromhex("049d7878"),  # ypub / yprv
    bytes.fromhex("04b24746"): bytes.fromhex("04b2430c"),  # zpub / zprv
    bytes.fromhex("043587cf"): bytes.fromhex("04358394"),  # tpub / tprv
    bytes.fromhex("044a5262"): bytes.fromhex("044a4e28"),  # upub / uprv
    bytes.fromhex("045f1cf6"): bytes.fromhex("045f18bc"),  # vpub / vprv
}
_PRIVATE_VERSIONS = frozenset(_PUBLIC_VERSIONS.values())
_EXTENDED_KEY_LEN = 78


def _parse_element(element: str) -> int:
    match = _ELEMENT_RE.fullmatch(element)
    if match is None:
        raise ValueError(f"path element {element!r} is not a number optionally followed by '")
    number = int(match.group(1))
    if number >= HARDENED:
        raise ValueError(f"path element {element!r} is out of range (must be below 2**31)")
    return number + HARDENED if match.group(2) else number


def _split(path: str, what: str) -> list[str]:
    if not isinstance(path, str):
        raise ValueError(f"{what} must be a string")
    parts = path.split("/")
    if parts[0] != "m":
        raise ValueError(f"{what} must start with m/ (got a path that does not)")
    if any(part == "" for part in parts[1:]):
        raise ValueError(f"{what} has an empty element (a doubled or trailing /)")
    return parts[1:]


def format_path(child_numbers: tuple[int, ...]) -> str:
    """The canonical text form of a path, hardened elements marked with '."""
    return "/".join(["m", *(f"{n - HARDENED}'" if n >= HARDENED else str(n) for n in child_numbers)])


def parse_fixed_path(path: str) -> tuple[int, ...]:
    """A full BIP32 path such as m/44'/60'/1'/0/0 as child numbers (hardened ones have 2**31 added)."""
    return tuple(_parse_element(part) for part in _split(path, "derivation path"))


def _check_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError("escrow index must be an int")
    if not 0 <= index < HARDENED:
        raise ValueError(f"escrow index must be between 0 and 2**31 - 1, got {index}")
    return index


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A template such as m/44'/60'/0'/0/{index}, split where public derivation can take over."""

    account: tuple[int, ...]
    """The leading hardened elements: the account xpub sits here."""
    fixed_suffix: tuple[int, ...]
    """The non-hardened elements between the account and {index} (e.g. the 0 of the receive chain)."""

    @property
    def account_path(self) -> str:
        return format_path(self.account)

    @property
    def suffix(self) -> str:
        return "/".join([*(str(n) for n in self.fixed_suffix), INDEX_PLACEHOLDER])

    @property
    def template(self) -> str:
        return f"{self.account_path}/{self.suffix}"

    def child_numbers(self, index: int) -> tuple[int, ...]:
        return (*self.account, *self.fixed_suffix, _check_index(index))

    def full_path(self, index: int) -> str:
        return format_path(self.child_numbers(index))


def parse_path(path_template: str) -> PathTemplate:
    """Parse a template such as m/84'/0'/0'/0/{index}; ValueError names what is wrong with a bad one.

    Everything after the leading run of hardened elements must be non-hardened, {index} included,
    because the services that derive escrow addresses hold only the xpub at the end of that run and
    public derivation cannot produce hardened children.
    """
    parts = _split(path_template, "path template")
    if INDEX_PLACEHOLDER not in parts:
        if any(INDEX_PLACEHOLDER in part for part in parts):
            raise ValueError(f"{INDEX_PLACEHOLDER} must not be hardened or combined with anything else")
        raise ValueError(f"path template has no {INDEX_PLACEHOLDER} element")
    if parts.index(INDEX_PLACEHOLDER) != len(parts) - 1:
        raise ValueError(f"{INDEX_PLACEHOLDER} must be the last element of the path template")
    numbers = [_parse_element(part) for part in parts[:-1]]
    account_len = 0
    while account_len < len(numbers) and numbers[account_len] >= HARDENED:
        account_len += 1
    if account_len == 0:
        raise ValueError(
            "path template must begin with at least one hardened element (such as 44'), "
            "so that the account xpub cannot derive keys outside its account"
        )
    suffix = numbers[account_len:]
    hardened_in_suffix = [n for n in suffix if n >= HARDENED]
    if hardened_in_suffix:
        raise ValueError(
            f"hardened element {hardened_in_suffix[0] - HARDENED}' follows a non-hardened one: "
            f"everything after the account path {format_path(tuple(numbers[:account_len]))} must be "
            "non-hardened, since it is derived from the account xpub"
        )
    return PathTemplate(account=tuple(numbers[:account_len]), fixed_suffix=tuple(suffix))


def _public_node(extended_public_key: str) -> Any:
    """A bip_utils public-only node; refuses an extended private key without echoing any of it."""
    if not isinstance(extended_public_key, str):
        raise ValueError("extended public key must be a string")
    try:
        raw = bytes(Base58Decoder.CheckDecode(extended_public_key))
    except Exception:
        raise ValueError("extended public key is not valid base58check (typo or truncated?)") from None
    if len(raw) != _EXTENDED_KEY_LEN:
        raise ValueError("extended public key has the wrong length")
    version = raw[:4]
    if version in _PRIVATE_VERSIONS:
        raise ValueError(
            "an extended PRIVATE key was given where the account's extended public key belongs; "
            "treat that private key as exposed"
        )
    if version not in _PUBLIC_VERSIONS:
        raise ValueError("extended public key has an unknown version (expected xpub, ypub, zpub, tpub, upub or vpub)")
    try:
        node = Bip32Secp256k1.FromExtendedKey(
            extended_public_key, Bip32KeyNetVersions(version, _PUBLIC_VERSIONS[version])
        )
    except Exception:
        raise ValueError("extended public key is not a valid secp256k1 public key") from None
    if not node.IsPublicOnly():
        raise ValueError("extended public key unexpectedly carries a private key")
    return node


def _derive_public(node: Any, child_numbers: tuple[int, ...]) -> Any:
    for number in child_numbers:
        if number >= HARDENED:
            raise ValueError("a hardened child cannot be derived from an extended public key")
        node = node.ChildKey(number)
    return node


def derive_extended_public_key(extended_public_key: str, relative_path: str) -> str:
    """The extended public key at a non-hardened relative path such as "0/5" below `extended_public_key`.

    The result keeps the version prefix of the input (an xpub yields an xpub, a zpub a zpub).
    """
    if not isinstance(relative_path, str):
        raise ValueError("relative path must be a string")
    parts = relative_path.split("/") if relative_path else []
    if any(part == "" for part in parts):
        raise ValueError("relative path has an empty element")
    numbers = tuple(_parse_element(part) for part in parts)
    return str(_derive_public(_public_node(extended_public_key), numbers).PublicKey().ToExtended())


class EscrowKeyring:
    """Escrow public keys and addresses for one chain, from the account xpub and the path template."""

    __slots__ = ("_path", "_suffix_node")

    def __init__(self, account_xpub: str, path_template: str | PathTemplate) -> None:
        path = path_template if isinstance(path_template, PathTemplate) else parse_path(path_template)
        node = _public_node(account_xpub)
        # Depth and child number are in the serialised key, so a key exported at the wrong path
        # (another account, or the master) is caught at start-up instead of yielding wrong addresses.
        depth = int(node.Depth().ToInt())
        if depth != len(path.account):
            raise ValueError(
                f"the account xpub is at depth {depth}, but the account path {path.account_path} "
                f"has depth {len(path.account)}"
            )
        child = int(node.Index().ToInt())
        if child != path.account[-1]:
            raise ValueError(
                f"the account xpub is child {format_path((child,))[2:]} of its parent, "
                f"but the account path {path.account_path} ends in {format_path((path.account[-1],))[2:]}"
            )
        self._path = path
        # The fixed part of the suffix is the same for every escrow, so it is derived once.
        self._suffix_node = _derive_public(node, path.fixed_suffix)

    @property
    def path(self) -> PathTemplate:
        return self._path

    def __repr__(self) -> str:
        return f"EscrowKeyring(path={self._path.template!r})"

    def public_key(self, index: int) -> bytes:
        """The 33-byte compressed public key of escrow `index`."""
        child = self._suffix_node.ChildKey(_check_index(index))
        return bytes(child.PublicKey().RawCompressed().ToBytes())

    def evm_address(self, index: int) -> str:
        """The EIP-55 checksummed address of escrow `index`."""
        return str(EthAddrEncoder.EncodeKey(self.public_key(index)))

    def utxo_address(self, index: int, hrp: str) -> str:
        """The bech32 P2WPKH (witness v0) address of escrow `index` with prefix `hrp` (e.g. "alpha")."""
        return segwit_address(hrp, 0, bytes(Hash160.QuickDigest(self.public_key(index))))
