"""HTTP contract of the InfluxDB APIs (v1, v2, v3) against a recording stub server, and
``check`` against a real InfluxDB 1.x with authentication.

InfluxDB 2.x and 3.x cannot be installed here; these tests pin down what HA Ingestor sends
(paths, query parameters, authentication, compression) and how it reads the answers, as
documented by InfluxData and implemented in InfluxDB 3's ``influxdb3_server``.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from ha_ingestor.config import InfluxApi, Settings
from ha_ingestor.errors import CheckError
from ha_ingestor.sinks.influxdb import (
    InfluxClient,
    InfluxUnavailableError,
    Outcome,
    WriteResult,
    classify,
    error_message,
    parse_retry_after,
)
from tests.sinks.conftest import AuthInfluxDB1, make_settings, running_writer, serving
from tests.support.servers import InfluxDB1, free_port

TOKEN = "t0ken-Secret_42"
PASSWORD = "pa ss:w0rd"


Answer = tuple[int, dict[str, str], str]


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw: bytes  # as sent on the wire
    body: bytes  # decompressed


@dataclass
class Stub:
    """Answers ``/ping`` as told, scripted statuses for writes (then 204), records everything."""

    ping_status: int = 204
    ping_headers: dict[str, str] = field(default_factory=dict)
    ping_json: dict[str, str] | None = None
    write_answers: list[Answer] = field(default_factory=list)
    query_answer: tuple[int, str] = (200, '{"results":[{"statement_id":0}]}')
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        gzipped = request.headers.get("Content-Encoding") == "gzip"
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                raw,
                gzip.decompress(raw) if gzipped else raw,
            )
        )
        if request.path == "/ping":
            if self.ping_json is not None:
                return web.json_response(
                    self.ping_json, status=self.ping_status, headers=self.ping_headers
                )
            return web.Response(status=self.ping_status, headers=self.ping_headers)
        if request.path == "/query":
            status, text = self.query_answer
            return web.Response(status=status, text=text, content_type="application/json")
        if self.write_answers:
            status, headers, text = self.write_answers.pop(0)
            return web.Response(status=status, headers=headers, text=text)
        return web.Response(status=204)

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.path not in ("/ping", "/query")]


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    state = Stub()
    async with serving(state.handle) as url:
        state.url = url
        yield state


def settings_for(url: str, tmp_path: Path, **env: str) -> Settings:
    return make_settings(url, tmp_path, **env)


async def write_once(
    stub: Stub, tmp_path: Path, body: bytes = b"m v=1 1", **env: str
) -> tuple[InfluxClient, WriteResult]:
    async with aiohttp.ClientSession() as session:
        client = InfluxClient(settings_for(stub.url, tmp_path, **env), session)
        await client.prepare()
        return client, await client.write(body)


# --- what is sent ------------------------------------------------------------------------------
async def test_v2_write_path_parameters_token_and_gzip(stub: Stub, tmp_path: Path) -> None:
    _, result = await write_once(
        stub,
        tmp_path,
        body=b"m v=1 1\nm v=2 2",
        influx_api="v2",
        influx_token=TOKEN,
        influx_org="home",
        influx_bucket="ha",
        influx_gzip="true",
    )
    assert result == WriteResult(Outcome.OK, 204)
    (write,) = stub.writes()
    assert write.method == "POST"
    assert write.path == "/api/v2/write"
    assert write.query == {"org": "home", "bucket": "ha", "precision": "ns"}
    assert write.headers["Authorization"] == f"Token {TOKEN}"
    assert write.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert write.headers["Content-Encoding"] == "gzip"
    assert write.raw[:2] == b"\x1f\x8b"
    assert write.raw[8] == 4  # XFL: the fastest compression level
    assert write.body == b"m v=1 1\nm v=2 2"
    assert [r.path for r in stub.requests] == ["/api/v2/write"]  # no probing: API was given


async def test_v2_without_a_bucket_writes_to_the_database_name(stub: Stub, tmp_path: Path) -> None:
    client, _ = await write_once(
        stub, tmp_path, influx_api="v2", influx_token=TOKEN, influx_database="home_db"
    )
    (write,) = stub.writes()
    assert write.query == {"bucket": "home_db", "precision": "ns"}  # no org: InfluxDB 3 needs none
    assert client.target == "home_db"


async def test_v3_write_uses_write_lp_nanosecond_precision_and_a_bearer_token(
    stub: Stub, tmp_path: Path
) -> None:
    _, result = await write_once(
        stub, tmp_path, influx_api="v3", influx_token=TOKEN, influx_database="home"
    )
    assert result.outcome is Outcome.OK
    (write,) = stub.writes()
    assert write.path == "/api/v3/write_lp"
    assert write.query == {"db": "home", "precision": "nanosecond", "accept_partial": "true"}
    assert write.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Content-Encoding" not in write.headers  # a local InfluxDB: not worth the CPU
    assert write.body == b"m v=1 1"


async def test_v1_write_uses_basic_auth_never_url_credentials(stub: Stub, tmp_path: Path) -> None:
    _, result = await write_once(
        stub,
        tmp_path,
        influx_api="v1",
        influx_username="ingest",
        influx_password=PASSWORD,
        influx_database='we"ird\\db',
        influx_retention_policy="autogen",
    )
    assert result.outcome is Outcome.OK
    create, write = stub.requests
    assert create.path == "/query"
    assert create.method == "POST"
    assert dict(x.split("=", 1) for x in create.body.decode().split("&")) == {
        "q": "CREATE+DATABASE+%22we%5C%22ird%5C%5Cdb%22"  # CREATE DATABASE "we\"ird\\db"
    }
    assert write.path == "/write"
    assert write.query == {"db": 'we"ird\\db', "precision": "ns", "rp": "autogen"}
    assert write.headers["Authorization"] == "Basic aW5nZXN0OnBhIHNzOncwcmQ="
    assert create.headers["Authorization"] == write.headers["Authorization"]
    assert "u" not in write.query
    assert "p" not in write.query


async def test_v1_with_a_token_uses_the_token_scheme(stub: Stub, tmp_path: Path) -> None:
    await write_once(stub, tmp_path, influx_api="v1", influx_token=TOKEN)
    (write,) = stub.writes()
    assert write.headers["Authorization"] == f"Token {TOKEN}"  # InfluxDB 2/3 v1 compatibility


async def test_credentials_in_the_url_become_basic_auth_and_leave_the_url(
    stub: Stub, tmp_path: Path
) -> None:
    url = stub.url.replace("http://", "http://ingest:url-secret@")
    async with aiohttp.ClientSession() as session:
        client = InfluxClient(settings_for(url, tmp_path, influx_api="v1"), session)
        await client.write(b"m v=1 1")
    (write,) = stub.writes()
    assert write.headers["Authorization"] == "Basic aW5nZXN0OnVybC1zZWNyZXQ="
    assert client.url == stub.url
    assert "url-secret" not in client.url


# --- detection -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "headers", "body", "env", "expected", "version"),
    [
        (
            204,
            {"X-Influxdb-Version": "1.6.7~rc0", "X-Influxdb-Build": "OSS"},
            None,
            {},
            "v1",
            "1.6.7~rc0",
        ),
        (
            204,
            {"X-Influxdb-Version": "v2.7.11", "X-Influxdb-Build": "OSS"},
            None,
            {},
            "v2",
            "v2.7.11",
        ),
        (204, {"X-Influxdb-Version": "2.7.4"}, None, {}, "v2", "2.7.4"),
        # InfluxDB 3 Core/Enterprise: 200, version headers and a JSON body.
        (
            200,
            {"X-Influxdb-Version": "3.5.0", "X-Influxdb-Build": "Core"},
            {"version": "3.5.0", "revision": "abc123", "process_id": "f00"},
            {},
            "v3",
            "3.5.0",
        ),
        (200, {}, {"version": "3.0.1", "revision": "x"}, {}, "v3", "3.0.1"),
        (401, {}, None, {}, "v3", None),  # only InfluxDB 3 guards /ping with a token
        (204, {}, None, {"influx_bucket": "b"}, "v2", None),  # InfluxDB Cloud: no version
        (204, {}, None, {}, "v1", None),
    ],
)
async def test_auto_detection_from_ping(
    stub: Stub,
    tmp_path: Path,
    status: int,
    headers: dict[str, str],
    body: dict[str, str] | None,
    env: dict[str, str],
    expected: str,
    version: str | None,
) -> None:
    stub.ping_status, stub.ping_headers, stub.ping_json = status, headers, body
    async with aiohttp.ClientSession() as session:
        client = InfluxClient(settings_for(stub.url, tmp_path, influx_token=TOKEN, **env), session)
        assert await client.detect() == InfluxApi(expected)
    assert client.version == version
    (ping,) = stub.requests
    assert ping.method == "GET"
    assert ping.headers["Authorization"] == f"Token {TOKEN}"


async def test_detection_fails_for_an_unreachable_or_broken_server(
    stub: Stub, tmp_path: Path
) -> None:
    stub.ping_status = 503
    async with aiohttp.ClientSession() as session:
        with pytest.raises(InfluxUnavailableError, match="HTTP 503"):
            await InfluxClient(settings_for(stub.url, tmp_path), session).detect()
        dead = f"http://127.0.0.1:{free_port()}"
        with pytest.raises(InfluxUnavailableError, match=r"/ping: ClientConnectorError"):
            await InfluxClient(settings_for(dead, tmp_path), session).detect()


# --- how answers are read ----------------------------------------------------------------------
V3_PARTIAL = json.dumps(
    {
        "error": "partial write of line protocol occurred",
        "data": [
            {"original_line": "m v=x", "line_number": 2, "error_message": "invalid field value"},
            {"original_line": "m", "line_number": 5, "error_message": "missing fields"},
        ],
    }
)


@pytest.mark.parametrize(
    ("status", "body", "headers", "outcome", "message"),
    [
        (204, "", {}, Outcome.OK, ""),
        (
            400,
            '{"error":"partial write: field type conflict: input field \\"v\\" dropped=1"}',
            {},
            Outcome.REJECTED,
            'partial write: field type conflict: input field "v" dropped=1',
        ),
        (
            400,
            V3_PARTIAL,
            {},
            Outcome.PARTIAL,
            "partial write of line protocol occurred: line 2: invalid field value; "
            "line 5: missing fields",
        ),
        (
            422,
            '{"code":"unprocessable entity","message":"too many columns"}',
            {},
            Outcome.REJECTED,
            "too many columns",
        ),
        (
            401,
            '{"code":"unauthorized","message":"unauthorized access"}',
            {},
            Outcome.AUTH,
            "unauthorized access",
        ),
        (403, "", {"X-Influxdb-Error": "not authorized"}, Outcome.AUTH, "not authorized"),
        (
            404,
            '{"error":"database not found: \\"x\\""}',
            {},
            Outcome.NOT_FOUND,
            'database not found: "x"',
        ),
        (
            404,
            '{"code":"not found","message":"bucket \\"b\\" not found"}',
            {},
            Outcome.NOT_FOUND,
            'bucket "b" not found',
        ),
        (413, "Request Entity Too Large", {}, Outcome.TOO_LARGE, "Request Entity Too Large"),
        (429, "", {"Retry-After": "7"}, Outcome.RETRY, ""),
        (500, '{"error":"timeout"}', {}, Outcome.RETRY, "timeout"),
        (503, "<html>busy</html>", {"Retry-After": "2.5"}, Outcome.RETRY, "<html>busy</html>"),
        (
            500,
            '{"error":"retention policy not found: zzz"}',
            {},
            Outcome.CONFIG,
            "retention policy not found: zzz",
        ),
        (400, '{"error":"database is required"}', {}, Outcome.CONFIG, "database is required"),
        (
            400,
            '{"code":"invalid","message":"Please provide either orgID or org"}',
            {},
            Outcome.CONFIG,
            "Please provide either orgID or org",
        ),
        (
            400,
            "db name did not start with a number or letter",
            {},
            Outcome.CONFIG,
            "db name did not start with a number or letter",
        ),
    ],
)
def test_answers_are_classified(
    status: int, body: str, headers: dict[str, str], outcome: Outcome, message: str
) -> None:
    result = classify(status, body, headers)
    assert result.outcome is outcome
    assert result.status == status
    assert result.message == message
    expected_retry_after = float(headers["Retry-After"]) if "Retry-After" in headers else None
    assert result.retry_after == expected_retry_after


def test_retry_after_as_an_http_date() -> None:
    moment = datetime.now(UTC) + timedelta(seconds=30)
    seconds = parse_retry_after(format_datetime(moment, usegmt=True))
    assert seconds is not None
    assert 28 <= seconds <= 30
    assert (
        parse_retry_after(format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)) == 0
    )
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_long_error_bodies_are_cut() -> None:
    assert len(error_message("x" * 10_000)) == 2000
    assert error_message('{"error": {"nested": 1}}') == '{"nested":1}'
    assert error_message("[1, 2]") == "[1, 2]"


async def test_connection_refused_is_retryable(tmp_path: Path) -> None:
    settings = settings_for(f"http://127.0.0.1:{free_port()}", tmp_path, influx_api="v1")
    async with aiohttp.ClientSession() as session:
        result = await InfluxClient(settings, session).write(b"m v=1 1")
    assert result.outcome is Outcome.RETRY
    assert result.status is None
    assert result.message.startswith("ClientConnectorError")


async def test_a_timeout_is_retryable(tmp_path: Path) -> None:
    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(2)
        return web.Response(status=204)

    async with serving(slow) as url, aiohttp.ClientSession() as session:
        settings = settings_for(url, tmp_path, influx_api="v2", influx_timeout="0.2")
        result = await InfluxClient(settings, session).write(b"m v=1 1")
    assert result.outcome is Outcome.RETRY
    assert result.status is None


# --- the writer over the v2 and v3 APIs ---------------------------------------------------------
async def test_v2_bucket_not_found_keeps_the_data_until_it_exists(
    stub: Stub, tmp_path: Path
) -> None:
    missing: Answer = (404, {}, '{"code":"not found","message":"bucket \\"ha\\" not found"}')
    stub.write_answers = [missing] * 3
    settings = settings_for(
        stub.url, tmp_path, influx_api="v2", influx_token=TOKEN, influx_org="o", influx_bucket="ha"
    )
    async with running_writer(settings) as w:
        await w.add(["m v=1 1", "m v=2 2"])
        await w.drained()
    writes = stub.writes()
    assert len(writes) == 4
    assert all(r.body == b"m v=1 1\nm v=2 2" for r in writes)
    assert not [r for r in stub.requests if r.path == "/query"]  # nothing to create on v2
    assert w.metric("ha_ingestor_write_errors_total", kind="not_found") == 3
    assert w.log.states() == ["connected", "failed", "connected", "stopped"]
    assert w.telemetry.connection("influxdb").last_error == 'HTTP 404: bucket "ha" not found'


async def test_v3_partial_write_dead_letters_only_the_bad_line(stub: Stub, tmp_path: Path) -> None:
    partial: Answer = (400, {}, V3_PARTIAL)
    # 4 lines: refused; 2 good lines: stored; 2 lines: refused; the bad one: refused; then ok.
    stub.write_answers = [partial, (204, {}, ""), partial, partial]
    settings = settings_for(stub.url, tmp_path, influx_api="v3", influx_token=TOKEN)
    async with running_writer(settings) as w:
        await w.add(["m v=1 1", "m v=2 2", "m v=x 3", "m v=4 4"])
        await w.drained()
    assert [r.body for r in stub.writes()] == [
        b"m v=1 1\nm v=2 2\nm v=x 3\nm v=4 4",
        b"m v=1 1\nm v=2 2",
        b"m v=x 3\nm v=4 4",
        b"m v=x 3",
        b"m v=4 4",
    ]
    (dead,) = [json.loads(x) for x in w.writer.dead_letters.path.read_text().splitlines()]
    assert dead["line"] == "m v=x 3"
    assert dead["reason"].startswith("HTTP 400: partial write of line protocol occurred: line 2")


async def test_a_config_error_is_not_bisected(stub: Stub, tmp_path: Path) -> None:
    no_org: Answer = (400, {}, '{"code":"invalid","message":"Please provide either orgID or org"}')
    stub.write_answers = [no_org, no_org]
    settings = settings_for(stub.url, tmp_path, influx_api="v2", influx_token=TOKEN)
    async with running_writer(settings) as w:
        await w.add(["m v=1 1", "m v=2 2"])
        await w.drained()
    assert [r.body for r in stub.writes()] == [b"m v=1 1\nm v=2 2"] * 3
    assert w.metric("ha_ingestor_write_errors_total", kind="config") == 2
    assert w.metric("ha_ingestor_dead_lettered_lines_total") == 0
    assert w.log.states() == ["connected", "failed", "connected", "stopped"]


# --- `ha-ingestor check` -----------------------------------------------------------------------
async def check(url: str, tmp_path: Path, **env: str) -> str:
    async with aiohttp.ClientSession() as session:
        return await InfluxClient(settings_for(url, tmp_path, **env), session).check()


@pytest.mark.parametrize(
    ("answer", "env"),
    [
        ((400, {}, '{"code":"invalid","message":"writing requires points"}'), {"influx_api": "v2"}),
        ((400, {}, "incoming write was empty"), {"influx_api": "v3"}),
        ((204, {}, ""), {"influx_api": "v3"}),
    ],
)
async def test_check_accepts_an_empty_write_refused_for_having_no_data(
    stub: Stub, tmp_path: Path, answer: Answer, env: dict[str, str]
) -> None:
    stub.write_answers = [answer]
    stub.ping_headers = {"X-Influxdb-Version": "3.5.0"}
    summary = await check(stub.url, tmp_path, influx_token=TOKEN, influx_bucket="ha", **env)
    assert summary.startswith("InfluxDB 3.5.0 at http://127.0.0.1:")
    assert f"({env['influx_api']} API)" in summary
    (write,) = stub.writes()
    assert write.body == b""


@pytest.mark.parametrize(
    ("answer", "env", "expected"),
    [
        (
            (401, {}, '{"code":"unauthorized","message":"unauthorized access"}'),
            {"influx_api": "v2", "influx_token": TOKEN},
            "credentials refused (HTTP 401): check HA_INGESTOR_INFLUX_TOKEN",
        ),
        (
            (401, {}, ""),
            {"influx_api": "v3"},
            "credentials refused (HTTP 401): set HA_INGESTOR_INFLUX_TOKEN",
        ),
        (
            (403, {}, '{"code":"forbidden","message":"insufficient permissions"}'),
            {"influx_api": "v2", "influx_token": TOKEN, "influx_bucket": "ha"},
            "not allowed to write to bucket 'ha' (HTTP 403)",
        ),
        (
            (404, {}, '{"code":"not found","message":"bucket \\"ha\\" not found"}'),
            {"influx_api": "v2", "influx_token": TOKEN, "influx_bucket": "ha", "influx_org": "o"},
            "bucket 'ha' or organisation 'o' not found (HTTP 404): bucket \"ha\" not found",
        ),
        (
            (400, {}, '{"code":"invalid","message":"Please provide either orgID or org"}'),
            {"influx_api": "v2", "influx_token": TOKEN},
            "write refused (HTTP 400: Please provide either orgID or org)",
        ),
        (
            (500, {}, "boom"),
            {"influx_api": "v3", "influx_token": TOKEN},
            "write failed (HTTP 500: boom)",
        ),
    ],
)
async def test_check_says_what_is_wrong_without_secrets(
    stub: Stub,
    tmp_path: Path,
    answer: Answer,
    env: dict[str, str],
    expected: str,
) -> None:
    stub.write_answers = [answer]
    with pytest.raises(CheckError) as error:
        await check(stub.url, tmp_path, **env)
    assert expected in str(error.value)
    assert TOKEN not in str(error.value)


async def test_check_of_an_unreachable_influxdb(tmp_path: Path) -> None:
    with pytest.raises(
        CheckError, match=r"cannot reach InfluxDB: http://127\.0\.0\.1:\d+/ping: "
    ) as e:
        await check(f"http://u:{PASSWORD}@127.0.0.1:{free_port()}", tmp_path)
    assert PASSWORD not in str(e.value)


_names = itertools.count()


async def test_check_against_a_real_influxdb_with_authentication(
    influxdb_auth: AuthInfluxDB1, tmp_path: Path
) -> None:
    n = next(_names)
    url = influxdb_auth.url
    admin, admin_password = influxdb_auth.admin
    user, database, other = f"checker{n}", f"check_db_{n}", f"check_missing_{n}"
    influxdb_auth.statement(f"CREATE USER {user} WITH PASSWORD '{PASSWORD}'")

    # An administrator: the database is created, and writing to it works.
    summary = await check(
        url,
        tmp_path,
        influx_username=admin,
        influx_password=admin_password,
        influx_database=database,
    )
    assert summary == f"InfluxDB 1.6.7~rc0 at {url} (v1 API), writing to '{database}'"
    shown = influxdb_auth.statement("SHOW DATABASES")["series"][0]["values"]
    assert [database] in shown

    failures = {
        "wrong password": (
            {"influx_username": user, "influx_password": "wrong", "influx_database": database},
            "credentials refused (HTTP 401): check HA_INGESTOR_INFLUX_USERNAME and "
            "HA_INGESTOR_INFLUX_PASSWORD",
        ),
        "no write grant": (
            {"influx_username": user, "influx_password": PASSWORD, "influx_database": database},
            f"not allowed to write to database '{database}' (HTTP 403)",
        ),
        "missing, may not create": (
            {"influx_username": user, "influx_password": PASSWORD, "influx_database": other},
            f"database '{other}' not found, and creating it failed (HTTP 403: error authorizing "
            "query:",
        ),
        "no credentials": (
            {"influx_database": database},
            "credentials refused (HTTP 401): set HA_INGESTOR_INFLUX_TOKEN",
        ),
    }
    for name, (env, expected) in failures.items():
        with pytest.raises(CheckError) as error:
            await check(url, tmp_path, influx_api="v1", **env)
        assert expected in str(error.value), name
        assert PASSWORD not in str(error.value)

    influxdb_auth.statement(f'GRANT WRITE ON "{database}" TO {user}')
    summary = await check(
        url, tmp_path, influx_username=user, influx_password=PASSWORD, influx_database=database
    )
    assert summary.endswith(f"writing to '{database}'")


async def test_check_against_a_real_influxdb_without_authentication(
    influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    summary = await check(influxdb.url, tmp_path, influx_database=influx_db)
    assert summary == f"InfluxDB 1.6.7~rc0 at {influxdb.url} (v1 API), writing to '{influx_db}'"
    with pytest.raises(
        CheckError, match=r"write refused \(HTTP 500: retention policy not found: nope\)"
    ):
        await check(
            influxdb.url, tmp_path, influx_database=influx_db, influx_retention_policy="nope"
        )


async def test_check_on_v1_detects_creates_the_database_and_sends_an_empty_write(
    tmp_path: Path, stub: Stub
) -> None:
    stub.ping_headers = {"X-Influxdb-Version": "1.8.10"}
    summary = await check(stub.url, tmp_path, influx_database="ha")
    assert summary == f"InfluxDB 1.8.10 at {stub.url} (v1 API), writing to 'ha'"
    assert [(r.path, r.body) for r in stub.requests] == [
        ("/ping", b""),
        ("/query", b"q=CREATE+DATABASE+%22ha%22"),
        ("/write", b""),
    ]
