"""The data directory: an append-only block file, the mempool at shutdown, the faucet key, a lock.

blocks.dat is a sequence of records `magic, length, sha256(block)[:4], block`. A process killed
mid-write leaves a torn last record, which the next start cuts off: the chain then ends at the
last complete block, as a node's would.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["BlockFile", "DataDir", "DataDirLocked", "read_records", "write_records_atomically"]

log = logging.getLogger(__name__)

_MAGIC = b"ODNB"
_HEAD = struct.Struct("<4sI4s")


class DataDirLocked(RuntimeError):
    """Another devnet process uses the data directory."""


def _record(payload: bytes) -> bytes:
    return _HEAD.pack(_MAGIC, len(payload), hashlib.sha256(payload).digest()[:4]) + payload


def read_records(path: Path) -> tuple[list[bytes], list[int], int]:
    """The complete records of a file, their start offsets, and where the last complete one ends."""
    records: list[bytes] = []
    offsets: list[int] = []
    if not path.exists():
        return records, offsets, 0
    data = path.read_bytes()
    pos = 0
    while pos + _HEAD.size <= len(data):
        magic, length, checksum = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if magic != _MAGIC or end > len(data):
            break
        payload = data[pos + _HEAD.size : end]
        if hashlib.sha256(payload).digest()[:4] != checksum:
            break
        records.append(payload)
        offsets.append(pos)
        pos = end
    if pos != len(data):
        log.warning("%s: %d bytes after the last complete record are discarded", path, len(data) - pos)
    return records, offsets, pos


def write_records_atomically(path: Path, payloads: list[bytes]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        for payload in payloads:
            handle.write(_record(payload))
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


class BlockFile:
    """Blocks by height; appends go to the OS at once so a killed process loses nothing it confirmed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        blocks, self._offsets, end = read_records(path)
        self.loaded = blocks
        self._handle: BinaryIO = path.open("r+b" if path.exists() else "w+b")
        self._handle.truncate(end)
        self._handle.seek(end)

    def append(self, raw: bytes) -> None:
        self._offsets.append(self._handle.tell())
        self._handle.write(_record(raw))
        self._handle.flush()

    def truncate(self, height: int) -> None:
        if height >= len(self._offsets):
            return
        end = self._offsets[height]
        del self._offsets[height:]
        self._handle.truncate(end)
        self._handle.seek(end)
        self._handle.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._handle.flush()
            os.fsync(self._handle.fileno())
        self._handle.close()


class DataDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.blocks = root / "blocks.dat"
        self.mempool = root / "mempool.dat"
        self.faucet_key = root / "faucet.key"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        handle = (self.root / ".lock").open("wb")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise DataDirLocked(f"{self.root} is in use by another otc-devnet process") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()
