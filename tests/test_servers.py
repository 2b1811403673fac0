"""The local servers the dev stack and the integration tests run on, and the test token."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from eth_typing import HexStr
from web3 import Web3
from web3.exceptions import ContractCustomError

from otc_cli import contracts
from otc_cli.servers import (
    BinaryNotFoundError,
    ManagedServer,
    _group_members,
    find_anvil,
    free_port,
    start_anvil,
    start_nats,
    start_postgres,
)

CHAIN_ID = 31337


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    """A PostgreSQL data directory outside pytest's base temp.

    Run as root, postgres runs as a system user that must traverse every ancestor of its
    data directory, and pytest resets its base temp to mode 0700 at every session start.
    """
    parent = Path(tempfile.mkdtemp(prefix="otc-test-pg-"))
    parent.chmod(0o755)
    yield parent / "pg"
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[ManagedServer]:
    server = start_anvil(free_port(), CHAIN_ID, tmp_path / "anvil.log")
    yield server
    server.stop()


async def test_nats_jetstream_answers(tmp_path: Path) -> None:
    server = start_nats(tmp_path / "nats", free_port(), tmp_path / "nats.log")
    try:
        assert server.url.startswith("nats://127.0.0.1:")
        client = await nats.connect(server.url)
        try:
            js = client.jetstream()
            await js.add_stream(name="SMOKE", subjects=["smoke.>"])
            ack = await js.publish("smoke.one", b"hello")
            assert ack.stream == "SMOKE"
            info = await js.account_info()
            assert info.streams == 1
        finally:
            await client.close()
    finally:
        server.stop()
    assert not _pid_alive(server.pid or 0)


async def test_postgres_select_1_and_data_survive_restart(tmp_path: Path, pg_dir: Path) -> None:
    server = start_postgres(pg_dir, tmp_path / "pg.log")
    try:
        assert server.url.startswith("postgresql://postgres@127.0.0.1:")
        conn = await asyncpg.connect(server.url)
        try:
            assert await conn.fetchval("select 1") == 1
            await conn.execute("create table kept (v int); insert into kept values (42)")
        finally:
            await conn.close()

        server.restart()
        conn = await asyncpg.connect(server.url)
        try:
            assert await conn.fetchval("select v from kept") == 42
        finally:
            await conn.close()
    finally:
        server.stop()


def test_anvil_reports_its_chain_id(anvil: ManagedServer) -> None:
    w3 = Web3(Web3.HTTPProvider(anvil.url))
    assert w3.eth.chain_id == CHAIN_ID
    assert w3.eth.get_balance(Web3.to_checksum_address(contracts.anvil_address(0))) > 0


def test_anvil_keys_match_the_mnemonic() -> None:
    from eth_account import Account

    Account.enable_unaudited_hdwallet_features()
    for index in (0, 9):
        derived = Account.from_mnemonic(contracts.ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")
        assert derived.address == contracts.anvil_address(index)


def test_test_token_mint_transfer_and_events(anvil: ManagedServer) -> None:
    deployer = contracts.ANVIL_PRIVATE_KEYS[0]
    alice, bob = contracts.anvil_address(1), contracts.anvil_address(2)
    token = contracts.deploy_test_token(anvil.url, "Tether USD", "USDT", 6, deployer)
    assert Web3.is_checksum_address(token)
    assert contracts.code_exists(anvil.url, token)

    contracts.mint(anvil.url, token, alice, 5_000_000, deployer)
    tx_hash = contracts.transfer(anvil.url, token, bob, 1_250_000, contracts.ANVIL_PRIVATE_KEYS[1])

    assert contracts.balance_of(anvil.url, token, alice) == 3_750_000
    assert contracts.balance_of(anvil.url, token, bob) == 1_250_000
    w3 = Web3(Web3.HTTPProvider(anvil.url))
    erc20 = contracts.token_contract(w3, token)
    assert erc20.functions.decimals().call() == 6
    assert erc20.functions.symbol().call() == "USDT"
    assert erc20.functions.totalSupply().call() == 5_000_000

    receipt = w3.eth.get_transaction_receipt(HexStr(tx_hash))
    (event,) = erc20.events.Transfer().process_receipt(receipt)
    assert event["args"]["from"] == alice
    assert event["args"]["to"] == bob
    assert event["args"]["value"] == 1_250_000

    not_minter = Web3.keccak(text="NotMinter(address)")[:4].to_0x_hex()
    with pytest.raises(ContractCustomError, match=not_minter):
        contracts.mint(anvil.url, token, alice, 1, contracts.ANVIL_PRIVATE_KEYS[1])


def test_anvil_state_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "chain.json"
    server = start_anvil(free_port(), CHAIN_ID, tmp_path / "anvil.log", state_file=state)
    try:
        token = contracts.deploy_test_token(server.url, "T", "T", 6, contracts.ANVIL_PRIVATE_KEYS[0])
        server.restart()
        assert contracts.code_exists(server.url, token)

        # A torn state file (a kill during a dump) falls back to the last good copy.
        server.stop()
        state.write_text('{"block": ')
        server.start()
        assert contracts.code_exists(server.url, token)
    finally:
        server.stop()


def test_kill_leaves_no_process_and_restart_recovers(tmp_path: Path, pg_dir: Path) -> None:
    server = start_postgres(pg_dir, tmp_path / "pg.log")
    try:
        pid = server.pid
        assert pid is not None
        server.kill()
        assert not _pid_alive(pid)
        assert _group_members(pid) == []  # the backends died with the postmaster
        server.restart()
        assert server.is_running()
    finally:
        server.stop()


def test_missing_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OTC_ANVIL_BIN", str(tmp_path / "nope"))
    with pytest.raises(BinaryNotFoundError, match="OTC_ANVIL_BIN"):
        find_anvil()
    monkeypatch.delenv("OTC_ANVIL_BIN")
    assert os.access(find_anvil(), os.X_OK)
