"""Thousands of malformed and random requests against a real gateway and engine.

Whatever arrives, the gateway must answer without an HTTP 5xx and without JSON-RPC
-32603, and a request that got only errors must leave the engine's state exactly as it
was. Requests are random bytes, random JSON, and JSON-RPC calls whose params come from the
OpenRPC document the gateway itself serves (so from the types that validate them), then
mutated: fields dropped, added, retyped, stretched past their bounds, nested, batched.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from otc_common.errors import ErrorCode
from tests.conftest import Stack
from tests.support import ALICE_EVM, ALPHA_ADDRESS, BOB_EVM

#: The long form (`make test-long`) sets OTC_FUZZ_REQUESTS=100000.
REQUESTS = int(os.environ.get("OTC_FUZZ_REQUESTS", "5000"))
MUTATING = {"otc.createDeal", "otc.fillPartyDetails", "otc.cancelDeal", "otc.sendInvite"}

FINGERPRINT = """
SELECT md5(concat_ws('#',
    (SELECT string_agg(t::text, '|' ORDER BY t::text) FROM engine.deals t),
    (SELECT string_agg(t::text, '|' ORDER BY t::text) FROM engine.deal_sides t),
    (SELECT string_agg(t::text, '|' ORDER BY t::text) FROM engine.deal_events t),
    (SELECT string_agg(t::text, '|' ORDER BY t::text) FROM engine.deposits t),
    (SELECT string_agg(t::text, '|' ORDER BY t::text) FROM engine.transfers t),
    (SELECT string_agg(t::text, '|' ORDER BY t::text) FROM engine.gas_fundings t),
    (SELECT last_value::text FROM engine.escrow_index_seq)
))
"""


@pytest.fixture
async def fuzz_stack(service_env: dict[str, str], work_dir: Path) -> AsyncIterator[Stack]:
    env = {
        **service_env,
        "OTC_LOG_LEVEL": "WARNING",
        "OTC_RATE_CLIENT_PER_SECOND": "1000000",
        "OTC_RATE_CLIENT_BURST": "1000000",
        "OTC_RATE_DEAL_PER_SECOND": "1000000",
        "OTC_RATE_DEAL_BURST": "1000000",
    }
    running = Stack(env, work_dir)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


# ----------------------------------------------------------------------------- generators

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
#: Values a mutation swaps in: wrong types, bounds, encodings, injection-looking text.
ODD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    1.5,
    2**64,
    -(2**200),
    1e308,
    "",
    " ",
    "null",
    "1e400",
    "NaN",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "' OR 1=1 --",
    "\u202e\u0000\ufeff",
    "\U0001d518\U0001d52b\U0001d526",  # mathematical letters outside the BMP
    "é" * 300,
    "a" * 5000,
    "\\" * 129,
    [],
    {},
    [[[[[]]]]],
    {"a": {"b": {"c": {}}}},
]
#: Hypothesis biases its own random draws towards edge values; a seeded PRNG keeps the mix as weighted.
SEEDS = st.integers(min_value=0, max_value=2**63)
HUGE_TEXT = st.sampled_from(["a", "é", "0", "\u202e", "\U0001d518", "\x00", '"', "\\"]).map(lambda c: c * 5000)


class Pools:
    """Plausible values by field name, so that mutated calls get past the first checks and reach deeper ones."""

    def __init__(self, deals: list[dict[str, Any]]) -> None:
        self.deal_ids = [d["dealId"] for d in deals]
        self.tokens = [t for d in deals for t in (d["aliceToken"], d["bobToken"])]

    def for_field(self, name: str) -> st.SearchStrategy[Any] | None:
        pools: dict[str, list[Any]] = {
            "dealId": self.deal_ids,
            "token": self.tokens,
            "chainId": ["ETH", "POLYGON", "UNICITY", "eth", "DOGE"],
            "asset": ["ETH", "USDT", "MATIC", "ALPHA", "ERC20:0x5FbDB2315678afecb367f032d93F642f64180aa3", "BTC"],
            "amount": ["1", "1.5", "0.000001", "40000", "1e3", "-1", "0", "1.", ".5", "10000000.0000001", "1_000"],
            "paybackAddress": [ALICE_EVM, BOB_EVM, ALPHA_ADDRESS, ALICE_EVM.lower(), "0x0"],
            "recipientAddress": [ALICE_EVM, BOB_EVM, ALPHA_ADDRESS, "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"],
            "party": ["ALICE", "BOB", "alice", "CAROL"],
            "email": ["a@b.co", "x@y", "@", "a" * 300 + "@b.co"],
            "timeoutSeconds": [2, 600, 3600, 0, -1, 2**31, 30 * 24 * 3600 + 1],
        }
        values = pools.get(name)
        return st.sampled_from(values) if values else None


class SchemaStrategies:
    """Hypothesis strategies for the JSON Schemas of the OpenRPC document (the subset msgspec emits)."""

    def __init__(self, document: dict[str, Any], pools: Pools) -> None:
        self.components = document["components"]["schemas"]
        self.pools = pools
        self._refs: dict[str, st.SearchStrategy[Any]] = {}

    def value(self, schema: dict[str, Any], name: str = "") -> st.SearchStrategy[Any]:
        if "$ref" in schema:
            ref = schema["$ref"].rsplit("/", 1)[1]
            if ref not in self._refs:
                self._refs[ref] = self.value(self.components[ref], name)
            return self._refs[ref]
        if "anyOf" in schema:
            return st.one_of([self.value(option, name) for option in schema["anyOf"]])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        kind = schema.get("type")
        pool = self.pools.for_field(name)
        if kind == "object":
            properties = schema.get("properties", {})
            required = set(schema.get("required", ()))
            return st.fixed_dictionaries(
                {key: self.value(sub, key) for key, sub in properties.items() if key in required},
                optional={key: self.value(sub, key) for key, sub in properties.items() if key not in required},
            )
        plain: st.SearchStrategy[Any]
        if kind == "integer":
            plain = st.integers(min_value=schema.get("minimum"), max_value=schema.get("maximum"))
        elif kind == "string":
            if "pattern" in schema:
                plain = st.from_regex(schema["pattern"], fullmatch=True)
            else:
                plain = st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 50), 140))
        elif kind == "null":
            return st.none()
        else:
            return JSON_VALUES
        # Mostly plausible values (to get past the first checks), sometimes anything the schema allows.
        return st.one_of(pool, pool, pool, plain) if pool is not None else plain

    def params(self, method: dict[str, Any]) -> st.SearchStrategy[Any]:
        schema = {
            "type": "object",
            "properties": {p["name"]: p["schema"] for p in method["params"]},
            "required": [p["name"] for p in method["params"] if p["required"]],
        }
        return self.value(schema)


def mutate(value: Any, rnd: random.Random, extra: Any) -> Any:
    """One random breakage of a value: its fields dropped, added, retyped, stretched or nested."""
    choice = rnd.random()
    if isinstance(value, dict) and value and choice < 0.75:
        key = rnd.choice(sorted(value))
        how = rnd.randrange(5)
        if how == 0:
            return {k: v for k, v in value.items() if k != key}
        if how == 1:
            return {**value, key: rnd.choice(ODD_VALUES)}
        if how == 2:
            return {**value, key: mutate(value[key], rnd, extra)}
        if how == 3:
            return {**value, rnd.choice(["extra", "Alice", "deal_id", key.upper(), ""]): extra}
        return {**value, key: extra}
    if isinstance(value, str) and choice < 0.8:
        return rnd.choice([value + "x" * 200, value.upper(), f" {value}", value[:-1], value * 3, value + "\u0000"])
    if isinstance(value, int) and not isinstance(value, bool) and choice < 0.8:
        return rnd.choice([str(value), float(value), value + 2**64, -value, value + 1, value - 1])
    if choice < 0.9:
        return rnd.choice(ODD_VALUES)
    return rnd.choice([[value], {"params": value}])


class RequestStrategies:
    def __init__(self, document: dict[str, Any], schemas: SchemaStrategies) -> None:
        self.names = sorted(m["name"] for m in document["methods"])
        self.params = {m["name"]: schemas.params(m) for m in document["methods"]}
        self.methods = st.sampled_from(self.names)
        self.call = self._call()

    def _call(self) -> st.SearchStrategy[Any]:
        @st.composite
        def call(draw: st.DrawFn) -> Any:
            rnd = random.Random(draw(SEEDS))
            name = draw(self.methods)
            params = draw(self.params[name])
            extra = draw(JSON_VALUES) if rnd.random() < 0.3 else rnd.choice(ODD_VALUES)
            shape = rnd.random()
            if shape < 0.3:
                pass  # exactly as the schema allows: the engine's own checks answer
            elif shape < 0.85:
                for _ in range(rnd.randint(1, 3)):
                    params = mutate(params, rnd, extra)
            elif shape < 0.93:
                params = extra
            else:
                params = None
            if rnd.random() < 0.12:
                name = rnd.choice(["otc.", "otc.stealFunds", "rpc.discover", "OTC.STATUS", name + " ", "", "x" * 300])
            body: dict[str, Any] = {
                "jsonrpc": "2.0" if rnd.random() < 0.93 else rnd.choice(["1.0", 2, None]),
                "method": name,
            }
            if params is not None or rnd.random() < 0.3:
                body["params"] = params
            if rnd.random() < 0.92:
                body["id"] = rnd.choice([rnd.randrange(10**6), f"id-{rnd.randrange(100)}", None, 2**70, 1.5, [1]])
            if rnd.random() < 0.08:
                body = mutate(body, rnd, extra)
            return body

        return call()

    def request(self) -> st.SearchStrategy[tuple[bytes, dict[str, str]]]:
        @st.composite
        def request(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
            rnd = random.Random(draw(SEEDS))
            headers = _headers(rnd)
            kind = rnd.choices(
                ["call", "batch", "json", "bytes", "text", "deep", "huge"], weights=[62, 14, 8, 4, 6, 3, 3]
            )[0]
            if kind == "call":
                payload: Any = draw(self.call)
            elif kind == "batch":
                items: list[Any] = []
                for _ in range(rnd.choice([0, 1, 2, 3, 5, 8, 21])):
                    pick = rnd.random()
                    if pick < 0.8:
                        items.append(draw(self.call))
                    elif pick < 0.9:
                        items.append([draw(self.call)])  # a nested batch is not a call
                    else:
                        items.append(rnd.choice(ODD_VALUES))
                payload = items
            elif kind == "json":
                payload = draw(JSON_VALUES)
            elif kind == "bytes":
                return draw(st.binary(max_size=300)), headers
            elif kind == "text":
                text = json.dumps(draw(self.call))
                cut = draw(st.text(max_size=60)) if rnd.random() < 0.4 else text[: rnd.randrange(len(text) + 1)]
                return cut.encode(), headers
            elif kind == "deep":
                opener = rnd.choice(["[", '{"a":', '{"jsonrpc":"2.0","id":1,"method":"otc.status","params":'])
                return (opener * rnd.randint(10, 30_000)).encode(), headers
            else:
                payload = {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "otc.status",
                    "params": {"dealId": draw(HUGE_TEXT) * 14},
                }
            return json.dumps(payload, ensure_ascii=rnd.random() < 0.5).encode(), headers

        return request()


def _headers(rnd: random.Random) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if rnd.random() < 0.06:
        headers["content-type"] = rnd.choice(
            [
                "text/plain",
                "application/x-www-form-urlencoded",
                "",
                "application/json; charset=utf-8",
                "APPLICATION/JSON",
            ]
        )
    if rnd.random() < 0.06:
        headers["origin"] = rnd.choice(["https://otc.example", "https://evil.example", "null", "http://otc.example"])
    return headers


# ----------------------------------------------------------------------------- checks


def _may_change(body: bytes) -> bool:
    """Whether the request holds a notification that could change state unseen (it gets no reply)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return False
    items = document if isinstance(document, list) else [document]
    return any(isinstance(i, dict) and "id" not in i and str(i.get("method")) in MUTATING for i in items)


def _replies(response: httpx.Response) -> list[Any]:
    if response.status_code == 204 or not response.content:
        return []
    document = response.json()
    return document if isinstance(document, list) else [document]


class Tally:
    def __init__(self) -> None:
        self.requests = 0
        self.statuses: dict[int, int] = {}
        self.codes: dict[int, int] = {}
        self.successes = 0
        self.checked_unchanged = 0
        self.http_seconds = 0.0


def run_fuzz(gateway_url: str, database_url: str, document: dict[str, Any], deals: list[dict[str, Any]]) -> Tally:
    """Runs in a thread of its own (hypothesis drives a synchronous test function)."""
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(asyncpg.connect(database_url))
    client = httpx.Client(base_url=gateway_url, timeout=20)
    tally = Tally()
    strategies = RequestStrategies(document, SchemaStrategies(document, Pools(deals)))
    state = {"fingerprint": loop.run_until_complete(conn.fetchval(FINGERPRINT))}

    @settings(
        max_examples=REQUESTS,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(request=strategies.request())
    def one(request: tuple[bytes, dict[str, str]]) -> None:
        body, headers = request
        sent = time.perf_counter()
        response = client.post("/rpc", content=body, headers=headers)
        tally.http_seconds += time.perf_counter() - sent
        tally.requests += 1
        tally.statuses[response.status_code] = tally.statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text[:500], body[:300])
        replies = _replies(response)
        succeeded = False
        for reply in replies:
            assert isinstance(reply, dict) and reply.get("jsonrpc") == "2.0", reply
            if "error" in reply:
                code = reply["error"]["code"]
                tally.codes[code] = tally.codes.get(code, 0) + 1
                assert code != ErrorCode.INTERNAL_ERROR, (reply, body[:300])
                assert isinstance(reply["error"]["message"], str) and "Traceback" not in reply["error"]["message"]
            else:
                assert "result" in reply, reply
                succeeded = True
        after = loop.run_until_complete(conn.fetchval(FINGERPRINT))
        if succeeded:
            tally.successes += 1
        elif not _may_change(body):
            assert after == state["fingerprint"], ("state changed on an error", body[:500], replies)
            tally.checked_unchanged += 1
        state["fingerprint"] = after

    try:
        one()
    finally:
        client.close()
        loop.run_until_complete(conn.close())
        loop.close()
    return tally


# The long form runs past the suite's default per-test timeout; 10 requests a second is a busy machine.
@pytest.mark.timeout(max(300, REQUESTS // 10))
async def test_fuzz_never_fails_inside_and_changes_nothing_on_errors(fuzz_stack: Stack) -> None:
    rpc = fuzz_stack.rpc
    base = {
        "alice": {"chainId": "ETH", "asset": "ETH", "amount": "1.5"},
        "bob": {"chainId": "POLYGON", "asset": "USDT", "amount": "40000"},
        "timeoutSeconds": 3600,
    }
    deals = [await rpc.result("otc.createDeal", base) for _ in range(3)]
    await rpc.result(
        "otc.fillPartyDetails",
        {
            "dealId": deals[0]["dealId"],
            "party": "ALICE",
            "token": deals[0]["aliceToken"],
            "paybackAddress": ALICE_EVM,
            "recipientAddress": BOB_EVM,
        },
    )
    document = await rpc.result("rpc.discover")
    started = time.monotonic()
    tally = await asyncio.to_thread(run_fuzz, fuzz_stack.gateway.url, fuzz_stack.database_url, document, deals)
    elapsed = time.monotonic() - started
    print(
        f"\n{tally.requests} requests in {elapsed:.1f}s; HTTP {dict(sorted(tally.statuses.items()))}; "
        f"codes {dict(sorted(tally.codes.items()))}; {tally.successes} with a success, "
        f"{tally.checked_unchanged} checked unchanged; {tally.http_seconds:.1f}s waiting for answers"
    )
    assert tally.requests >= REQUESTS
    # The mix reached every layer: parsing, protocol, params, and the engine's own checks.
    for code in (
        ErrorCode.PARSE_ERROR,
        ErrorCode.INVALID_REQUEST,
        ErrorCode.METHOD_NOT_FOUND,
        ErrorCode.INVALID_PARAMS,
        ErrorCode.DEAL_NOT_FOUND,
    ):
        assert tally.codes.get(code, 0) > 0, (code, tally.codes)
    assert tally.checked_unchanged > REQUESTS // 2
    for engine in fuzz_stack.engines:
        assert engine.proc is not None and engine.proc.poll() is None, engine.log_tail()
    assert fuzz_stack.gateway.proc is not None and fuzz_stack.gateway.proc.poll() is None
    assert await rpc.result("otc.status", {"dealId": deals[1]["dealId"]})
