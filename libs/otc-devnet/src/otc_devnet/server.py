"""Electrum protocol 1.4 over TCP (newline-delimited JSON-RPC 2.0), plus the devnet.* control methods.

Behaviour follows the protocol documentation and, where it is silent, Fulcrum (the server the
production Unicity chain runs): error codes and texts, the 1.4 status hash, result shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from . import __version__
from .chain import Chain, ChainError
from .decode import verbose_tx
from .faucet import Faucet, FaucetError
from .params import coins
from .script import AddressError, script_for_address
from .store import BlockFile, DataDir, read_records, write_records_atomically
from .tx import TxDecodeError, parse_tx
from .validation import Rejected

__all__ = ["Devnet", "RpcError"]

log = logging.getLogger(__name__)

SERVER_VERSION = f"otc-devnet {__version__}"
PROTOCOL_MIN = (1, 4)
#: 1.4.2 added blockchain.scripthash.unsubscribe, which is served.
PROTOCOL_MAX = (1, 4, 2)
MAX_HEADERS = 2016
MAX_LINE = 8 * 1024 * 1024
MAX_MINE = 10_000
#: A client that stops reading is dropped rather than buffered without bound.
MAX_WRITE_BUFFER = 32 * 1024 * 1024

# JSON-RPC and Fulcrum's application error codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
BAD_REQUEST = 1
DAEMON_ERROR = 2

NO_SUCH_TX = (
    "daemon error: DaemonError({'code': -5, 'message': 'No such mempool or blockchain transaction. "
    "Use gettransaction for wallet transactions.'})"
)
TX_DECODE_FAILED = "TX decode failed. Make sure the tx has at least one input."

_encoder = msgspec.json.Encoder(decimal_format="number")
_decoder = msgspec.json.Decoder()


class RpcError(Exception):
    def __init__(self, code: int, message: str, *, disconnect: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.disconnect = disconnect


# --- parameter checks ---------------------------------------------------------------------


def _hash_param(value: Any, what: str) -> bytes:
    """A 64-hex-digit hash as sent by clients (display order), in internal byte order."""
    try:
        if isinstance(value, str) and len(value) == 64:
            return bytes.fromhex(value)[::-1]
    except ValueError:
        pass
    raise RpcError(BAD_REQUEST, f"Invalid {what}")


def _scripthash_param(value: Any) -> str:
    return _hash_param(value, "scripthash")[::-1].hex()


def _int_param(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RpcError(BAD_REQUEST, f"Invalid {what}")
    return value


def _bool_param(value: Any, what: str) -> bool:
    if isinstance(value, bool) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return bool(value)
    raise RpcError(BAD_REQUEST, f"Invalid {what} argument; expected boolean")


def parse_version(text: Any) -> tuple[int, ...] | None:
    if not isinstance(text, str):
        return None
    try:
        parts = tuple(int(part) for part in text.split("."))
    except ValueError:
        return None
    if len(parts) < 2 or any(part < 0 for part in parts):
        return None
    while len(parts) > 2 and parts[-1] == 0:
        parts = parts[:-1]
    return parts


def negotiate(protocol_version: Any) -> tuple[int, ...]:
    """The version to speak: min(client max, server max), unless below both minimums."""
    if isinstance(protocol_version, list) and len(protocol_version) == 2:
        low, high = parse_version(protocol_version[0]), parse_version(protocol_version[1])
        if low is None or high is None or low > high:
            raise RpcError(BAD_REQUEST, f"Bad version tuple: {protocol_version}", disconnect=True)
        client_min, client_max = low, high
    else:
        single = parse_version(protocol_version)
        if single is None:
            raise RpcError(BAD_REQUEST, "Unsupported protocol version", disconnect=True)
        client_min = client_max = single
    chosen = min(client_max, PROTOCOL_MAX)
    if chosen < max(client_min, PROTOCOL_MIN):
        raise RpcError(BAD_REQUEST, "Unsupported protocol version", disconnect=True)
    return chosen


class _Method:
    """A handler and its parameter names: positional or named params are checked against them."""

    def __init__(self, handler: Callable[..., Any]) -> None:
        self.handler = handler
        parameters = inspect.signature(handler).parameters.values()
        self.names = [parameter.name for parameter in parameters]
        self.required = [parameter.name for parameter in parameters if parameter.default is inspect.Parameter.empty]

    def __call__(self, params: Any) -> Any:
        if params is None:
            params = []
        if isinstance(params, list):
            if not len(self.required) <= len(params) <= len(self.names):
                expected = f"{len(self.required)} to {len(self.names)}"
                raise RpcError(INVALID_PARAMS, f"invalid params: expected {expected} arguments, got {len(params)}")
            return self.handler(*params)
        if isinstance(params, dict):
            unknown = sorted(set(params) - set(self.names))
            missing = [name for name in self.required if name not in params]
            if unknown or missing:
                raise RpcError(INVALID_PARAMS, f"invalid params: unknown {unknown}, missing {missing}")
            return self.handler(**params)
        raise RpcError(INVALID_REQUEST, "params must be an array or an object")


# --- sessions -----------------------------------------------------------------------------


class Session:
    def __init__(self, devnet: Devnet, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.devnet = devnet
        self.reader = reader
        self.writer = writer
        self.version: tuple[int, ...] | None = None
        self.client_name = ""
        self.headers = False
        #: scripthash -> the status last sent to the client
        self.subs: dict[str, str | None] = {}
        self.closing = False
        self.methods = {name: _Method(handler) for name, handler in devnet.methods(self).items()}
        peer = writer.get_extra_info("peername")
        self.name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "client"

    def send(self, message: Any) -> None:
        if self.closing:
            return
        self.writer.write(_encoder.encode(message) + b"\n")
        if self.writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("%s does not read its notifications; disconnecting", self.name)
            self.close()

    def notify(self, method: str, params: list[Any]) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def close(self) -> None:
        self.closing = True
        self.writer.close()

    async def run(self) -> None:
        try:
            while not self.closing:
                try:
                    line = await self.reader.readline()
                except ValueError:
                    self.send(_error(None, INVALID_REQUEST, f"request longer than {MAX_LINE} bytes"))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                self.handle_line(line)
                self.devnet.publish()
                await self.writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.devnet.sessions.discard(self)
            self.close()

    def handle_line(self, line: bytes) -> None:
        try:
            message = _decoder.decode(line)
        except msgspec.DecodeError:
            self.send(_error(None, PARSE_ERROR, "Parse error"))
            return
        if isinstance(message, list):
            if not message:
                self.send(_error(None, INVALID_REQUEST, "empty batch"))
                return
            replies = [reply for item in message if (reply := self.handle_request(item)) is not None]
            if replies:
                self.send(replies)
            return
        reply = self.handle_request(message)
        if reply is not None:
            self.send(reply)

    def handle_request(self, request: Any) -> dict[str, Any] | None:
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            return _error(request.get("id") if isinstance(request, dict) else None, INVALID_REQUEST, "Invalid Request")
        method = request["method"]
        is_call = "id" in request
        request_id = request.get("id")
        handler = self.methods.get(method)
        try:
            if handler is None:
                raise RpcError(METHOD_NOT_FOUND, f"unknown method {method!r}")
            result = handler(request.get("params"))
        except RpcError as exc:
            if exc.disconnect:
                if is_call:
                    self.send(_error(request_id, exc.code, exc.message))
                self.close()
                return None
            return _error(request_id, exc.code, exc.message) if is_call else None
        except Exception:
            log.exception("%s failed", method)
            return _error(request_id, INTERNAL_ERROR, "internal error") if is_call else None
        return {"jsonrpc": "2.0", "id": request_id, "result": result} if is_call else None


def _rejected(reason: str) -> str:
    """Fulcrum's wrapping of the node's reject reason."""
    return f"the transaction was rejected by network rules.\n\n{reason}\n"


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


# --- the server ---------------------------------------------------------------------------


class Devnet:
    """The chain, its faucet and its data directory behind one Electrum endpoint."""

    def __init__(self, chain: Chain, faucet: Faucet, data: DataDir, blocks: BlockFile, host: str, port: int) -> None:
        self.chain = chain
        self.faucet = faucet
        self.data = data
        self.blocks = blocks
        self.host = host
        self.port = port
        self.sessions: set[Session] = set()
        self.autominer_seconds: float = 0.0
        self._autominer: asyncio.Task[None] | None = None
        self._server: asyncio.AbstractServer | None = None

    # --- life cycle ---

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer)
        self.sessions.add(session)
        await session.run()

    async def close(self) -> None:
        self.set_autominer(0)
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        self.save_mempool()
        self.blocks.close()

    def save_mempool(self) -> None:
        """Keep the mempool across a graceful restart, as bitcoind's mempool.dat does."""
        write_records_atomically(self.data.mempool, [entry.tx.raw for entry in self.chain.mempool.values()])

    def load_mempool(self) -> int:
        records, _offsets, _end = read_records(self.data.mempool)
        accepted = 0
        for raw in records:
            try:
                self.chain.accept(parse_tx(raw), bypass_limits=True)
                accepted += 1
            except (Rejected, TxDecodeError):
                pass
        # Loaded once: after a crash an old file must not resurrect replaced transactions.
        self.data.mempool.unlink(missing_ok=True)
        self.chain.take_changes()
        return accepted

    # --- notifications ---

    def publish(self) -> None:
        """Tell subscribers what the last operations changed: the new tip, then changed statuses."""
        touched, tip_changed = self.chain.take_changes()
        if tip_changed:
            tip = self._tip()
            for session in list(self.sessions):
                if session.headers:
                    session.notify("blockchain.headers.subscribe", [tip])
        if not touched:
            return
        statuses: dict[str, str | None] = {}
        for session in list(self.sessions):
            subs = session.subs
            hits = (
                [sh for sh in touched if sh in subs]
                if len(touched) <= len(subs)
                else [sh for sh in subs if sh in touched]
            )
            for sh in hits:
                if sh not in statuses:
                    statuses[sh] = self.chain.status(sh)
                if statuses[sh] != session.subs[sh]:
                    session.subs[sh] = statuses[sh]
                    session.notify("blockchain.scripthash.subscribe", [sh, statuses[sh]])

    def _tip(self) -> dict[str, Any]:
        return {"height": self.chain.height, "hex": self.chain.tip.header.hex()}

    # --- the autominer ---

    def set_autominer(self, seconds: float) -> None:
        if self._autominer is not None:
            self._autominer.cancel()
            self._autominer = None
        self.autominer_seconds = seconds
        if seconds > 0:
            self._autominer = asyncio.get_running_loop().create_task(self._autominate(seconds))

    async def _autominate(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                self.chain.mine(1)
            except Exception:
                log.exception("the autominer could not mine a block")
            self.publish()

    # --- methods ---

    def methods(self, session: Session) -> dict[str, Callable[..., Any]]:
        chain = self.chain

        def server_version(client_name: Any = "", protocol_version: Any = "1.4") -> list[str]:
            if session.version is not None:
                raise RpcError(BAD_REQUEST, "server.version already sent")
            chosen = negotiate(protocol_version)
            session.version = chosen
            session.client_name = str(client_name)[:80]
            return [SERVER_VERSION, ".".join(map(str, chosen))]

        def server_features() -> dict[str, Any]:
            return {
                "genesis_hash": chain.genesis_hash[::-1].hex(),
                "hosts": {self.host: {"tcp_port": self.port, "ssl_port": None}},
                "protocol_max": ".".join(map(str, PROTOCOL_MAX)),
                "protocol_min": ".".join(map(str, PROTOCOL_MIN)),
                "pruning": None,
                "server_version": SERVER_VERSION,
                "hash_function": "sha256",
            }

        def block_header(height: Any, cp_height: Any = 0) -> Any:
            height = _int_param(height, "height")
            cp_height = _int_param(cp_height, "cp_height")
            if height > chain.height:
                raise RpcError(BAD_REQUEST, f"height {height} out of range")
            header = chain.header(height).hex()
            if not cp_height:
                return header
            if not height <= cp_height <= chain.height:
                raise RpcError(
                    BAD_REQUEST,
                    f"header height {height} must be <= cp_height {cp_height} "
                    f"which must be <= chain height {chain.height}",
                )
            branch, root = chain.header_merkle(height, cp_height)
            return {"branch": [h[::-1].hex() for h in branch], "header": header, "root": root[::-1].hex()}

        def block_headers(start_height: Any, count: Any, cp_height: Any = 0) -> dict[str, Any]:
            start_height = _int_param(start_height, "height")
            count = _int_param(count, "count")
            cp_height = _int_param(cp_height, "cp_height")
            count = max(0, min(count, MAX_HEADERS, chain.height + 1 - start_height))
            headers = b"".join(chain.header(h) for h in range(start_height, start_height + count))
            result: dict[str, Any] = {"count": count, "hex": headers.hex(), "max": MAX_HEADERS}
            if count and cp_height:
                last = start_height + count - 1
                if not last <= cp_height <= chain.height:
                    raise RpcError(
                        BAD_REQUEST,
                        f"header height + (count - 1) {last} must be <= cp_height {cp_height} "
                        f"which must be <= chain height {chain.height}",
                    )
                branch, root = chain.header_merkle(last, cp_height)
                result |= {"branch": [h[::-1].hex() for h in branch], "root": root[::-1].hex()}
            return result

        def estimatefee(number: Any, mode: Any = None) -> msgspec.Raw:
            _int_param(number, "number")
            return coins(chain.params.estimate_fee)

        def headers_subscribe() -> dict[str, Any]:
            session.headers = True
            return self._tip()

        def get_balance(scripthash: Any) -> dict[str, int]:
            confirmed, unconfirmed = chain.balance(_scripthash_param(scripthash))
            return {"confirmed": confirmed, "unconfirmed": unconfirmed}

        def mempool_items(sh: str) -> list[dict[str, Any]]:
            return [
                {"tx_hash": entry.tx.txid_hex, "height": entry.electrum_height, "fee": entry.fee}
                for entry in chain.mempool_history(sh)
            ]

        def get_history(scripthash: Any) -> list[dict[str, Any]]:
            sh = _scripthash_param(scripthash)
            confirmed = [
                {"tx_hash": txid[::-1].hex(), "height": height} for txid, height in chain.confirmed_history(sh)
            ]
            return confirmed + mempool_items(sh)

        def get_mempool(scripthash: Any) -> list[dict[str, Any]]:
            return mempool_items(_scripthash_param(scripthash))

        def listunspent(scripthash: Any) -> list[dict[str, Any]]:
            return [
                {"tx_hash": txid[::-1].hex(), "tx_pos": n, "height": max(coin.height, 0), "value": coin.value}
                for (txid, n), coin in chain.unspent(_scripthash_param(scripthash))
            ]

        def subscribe(scripthash: Any) -> str | None:
            sh = _scripthash_param(scripthash)
            status = chain.status(sh)
            session.subs[sh] = status
            return status

        def unsubscribe(scripthash: Any) -> bool:
            return session.subs.pop(_scripthash_param(scripthash), "absent") != "absent"

        def broadcast(raw_tx: Any) -> str:
            try:
                tx = parse_tx(bytes.fromhex(raw_tx))
            except (TypeError, ValueError):
                raise RpcError(BAD_REQUEST, _rejected(TX_DECODE_FAILED)) from None
            try:
                chain.accept(tx)
            except Rejected as exc:
                raise RpcError(BAD_REQUEST, _rejected(str(exc))) from None
            log.debug("accepted %s", tx.txid_hex)
            return tx.txid_hex

        def transaction_get(tx_hash: Any, verbose: Any = False) -> Any:
            txid = _hash_param(tx_hash, "tx hash")
            verbose = _bool_param(verbose, "verbose")
            try:
                tx, block = chain.find_tx(txid)
            except KeyError:
                raise RpcError(DAEMON_ERROR, NO_SUCH_TX) from None
            if not verbose:
                return tx.raw.hex()
            return verbose_tx(
                tx,
                chain.params.hrp,
                block_hash=block.hash_hex if block is not None else None,
                block_time=block.time if block is not None else 0,
                confirmations=chain.height - block.height + 1 if block is not None else 0,
            )

        def get_merkle(tx_hash: Any, height: Any) -> dict[str, Any]:
            txid = _hash_param(tx_hash, "tx hash")
            height = _int_param(height, "height argument; expected non-negative numeric value")
            try:
                pos, branch = chain.tx_merkle(txid, height)
            except LookupError as exc:
                raise RpcError(BAD_REQUEST, str(exc)) from None
            return {"block_height": height, "merkle": [h[::-1].hex() for h in branch], "pos": pos}

        def id_from_pos(height: Any, tx_pos: Any, merkle: Any = False) -> Any:
            height = _int_param(height, "height argument; expected non-negative numeric value")
            tx_pos = _int_param(tx_pos, "tx_pos argument; expected non-negative numeric value")
            merkle = _bool_param(merkle, "merkle")
            if height > chain.height or tx_pos >= len(chain.block_at(height).txs):
                raise RpcError(BAD_REQUEST, f"No transaction at position {tx_pos} for height {height}")
            tx = chain.block_at(height).txs[tx_pos]
            if not merkle:
                return tx.txid_hex
            _pos, branch = chain.tx_merkle(tx.txid, height)
            return {"tx_hash": tx.txid_hex, "merkle": [h[::-1].hex() for h in branch]}

        def address_script(address: Any) -> bytes:
            if not isinstance(address, str):
                raise RpcError(BAD_REQUEST, "address must be a string")
            try:
                return script_for_address(address, chain.params.hrp)
            except AddressError as exc:
                raise RpcError(BAD_REQUEST, f"invalid address {address!r}: {exc}") from None

        def devnet_mine(blocks: Any = 1, address: Any = None, include_mempool: Any = True) -> list[str]:
            count = _int_param(blocks, "blocks", minimum=1)
            if count > MAX_MINE:
                raise RpcError(BAD_REQUEST, f"at most {MAX_MINE} blocks per call")
            script = address_script(address) if address is not None else None
            include = _bool_param(include_mempool, "include_mempool")
            mined = chain.mine(count, script, include)
            log.info(
                "mined %d block(s), height %d, %d transaction(s) left in the mempool",
                count,
                chain.height,
                len(chain.mempool),
            )
            return [block.hash_hex for block in mined]

        def devnet_faucet(address: Any, amount: Any) -> str:
            script = address_script(address)
            try:
                tx = self.faucet.pay(chain, script, amount)
                chain.accept(tx)
            except (FaucetError, Rejected) as exc:
                raise RpcError(BAD_REQUEST, str(exc)) from None
            log.info("faucet paid %d to %s in %s", amount, address, tx.txid_hex)
            return tx.txid_hex

        def devnet_reorg(
            depth: Any, drop_txids: Any = None, include_mempool: Any = False, address: Any = None
        ) -> list[str]:
            depth = _int_param(depth, "depth", minimum=1)
            if drop_txids is None:
                drop_txids = []
            if not isinstance(drop_txids, list):
                raise RpcError(BAD_REQUEST, "drop_txids must be a list of txids")
            drop = [_hash_param(txid, "txid in drop_txids") for txid in drop_txids]
            include = _bool_param(include_mempool, "include_mempool")
            script = address_script(address) if address is not None else None
            try:
                blocks = chain.reorg(depth, drop, include, script)
            except ChainError as exc:
                raise RpcError(BAD_REQUEST, str(exc)) from None
            log.info(
                "reorg: replaced %d block(s) with %d, height %d, %d dropped",
                depth,
                len(blocks),
                chain.height,
                len(drop),
            )
            return [block.hash_hex for block in blocks]

        def devnet_autominer(seconds: Any) -> dict[str, float]:
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= 86400:
                raise RpcError(BAD_REQUEST, "seconds must be a number from 0 (off) to 86400")
            self.set_autominer(float(seconds))
            return {"seconds": self.autominer_seconds}

        def devnet_info() -> dict[str, Any]:
            return {
                "height": chain.height,
                "tip": chain.tip.hash_hex,
                "genesis_hash": chain.genesis_hash[::-1].hex(),
                "mempool_size": len(chain.mempool),
                "faucet_address": self.faucet.address,
                "faucet_balance": self.faucet.balance(chain),
                "coinbase_maturity": chain.params.coinbase_maturity,
                "alpha_rules": chain.params.alpha,
                "autominer": self.autominer_seconds,
                "hrp": chain.params.hrp,
            }

        return {
            "server.version": server_version,
            "server.ping": lambda: None,
            "server.banner": lambda: f"{SERVER_VERSION}: a local development chain, not a real network",
            "server.donation_address": lambda: "",
            "server.features": server_features,
            "server.peers.subscribe": lambda: [],
            "blockchain.block.header": block_header,
            "blockchain.block.headers": block_headers,
            "blockchain.estimatefee": estimatefee,
            "blockchain.headers.subscribe": headers_subscribe,
            "blockchain.relayfee": lambda: coins(chain.params.min_relay_fee),
            "blockchain.scripthash.get_balance": get_balance,
            "blockchain.scripthash.get_history": get_history,
            "blockchain.scripthash.get_mempool": get_mempool,
            "blockchain.scripthash.listunspent": listunspent,
            "blockchain.scripthash.subscribe": subscribe,
            "blockchain.scripthash.unsubscribe": unsubscribe,
            "blockchain.transaction.broadcast": broadcast,
            "blockchain.transaction.get": transaction_get,
            "blockchain.transaction.get_merkle": get_merkle,
            "blockchain.transaction.id_from_pos": id_from_pos,
            "mempool.get_fee_histogram": lambda: [list(item) for item in chain.fee_histogram()],
            "devnet.mine": devnet_mine,
            "devnet.faucet": devnet_faucet,
            "devnet.reorg": devnet_reorg,
            "devnet.autominer": devnet_autominer,
            "devnet.info": devnet_info,
        }
