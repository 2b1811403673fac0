"""Bitcoin's merkle tree: the last hash of an odd level is paired with itself."""

from __future__ import annotations

from collections.abc import Sequence

from .tx import sha256d


def merkle_root(hashes: Sequence[bytes]) -> bytes:
    if not hashes:
        raise ValueError("a merkle tree needs at least one hash")
    level = list(hashes)
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [sha256d(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def merkle_branch(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """The hashes index is paired with on the way up, deepest first."""
    if not 0 <= index < len(hashes):
        raise IndexError(f"position {index} is not in a tree of {len(hashes)}")
    branch: list[bytes] = []
    level = list(hashes)
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        branch.append(level[index ^ 1])
        level = [sha256d(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
        index //= 2
    return branch


def root_from_branch(leaf: bytes, branch: Sequence[bytes], index: int) -> bytes:
    """What a client does with a branch: hash its way up to the root."""
    node = leaf
    for sibling in branch:
        node = sha256d(sibling + node) if index & 1 else sha256d(node + sibling)
        index //= 2
    return node
