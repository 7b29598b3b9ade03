"""The writer against a real InfluxDB 1.6.7: retries, bisection into the dead-letter file,
refused credentials, 413 splits, database re-creation, concurrency and shutdown.

A recording proxy in front of influxd injects the faults and proves exactly-once delivery: every
line is in exactly one write that InfluxDB acknowledged."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from ha_ingestor.pipeline.buffer import MemoryBuffer
from ha_ingestor.sinks.writer import count_measurements
from ha_ingestor.telemetry import ConnState
from tests.sinks.conftest import (
    AuthInfluxDB1,
    Fault,
    Proxy,
    Rule,
    Seen,
    make_settings,
    running_writer,
)
from tests.support.servers import InfluxDB1
from tests.support.waiting import wait_for

T0 = 1_700_000_000_000_000_000
_users = itertools.count()


def line(i: int, measurement: str = "mqtt_message") -> str:
    return f"{measurement},topic=t/{i} value={i}.5,n={i}i {T0 + i}"


def stored_numbers(influxdb: InfluxDB1, database: str) -> list[int]:
    return sorted(row["n"] for row in influxdb.rows("SELECT n FROM mqtt_message", database))


def faults(*answers: Fault) -> tuple[list[Fault], Rule]:
    """A proxy rule answering ``answers`` to the first writes, then passing through."""
    queue = list(answers)

    def rule(_: Seen) -> Fault | None:
        return queue.pop(0) if queue else None

    return queue, rule


async def test_5xx_and_503_with_retry_after_are_retried_until_every_line_lands_once(
    proxy: Proxy, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    remaining, proxy.rule = faults(
        (500, {}, '{"error":"injected 500"}'),
        (500, {}, '{"error":"injected 500"}'),
        (502, {}, "bad gateway"),
        (503, {"Retry-After": "1"}, '{"error":"injected 503"}'),
    )
    settings = make_settings(
        proxy.url,
        tmp_path,
        influx_api="v1",
        influx_database=influx_db,
        influx_batch_size="100",
        influx_concurrency="2",
    )
    lines = [line(i) for i in range(1000)]
    async with running_writer(settings, MemoryBuffer(group_lines=100)) as w:
        await w.add(lines)
        await w.drained()

    assert not remaining
    stored = proxy.stored_lines()
    assert len(stored) == 1000
    assert sorted(stored) == sorted(lines)  # every line acknowledged exactly once
    assert stored_numbers(influxdb, influx_db) == list(range(1000))
    assert w.metric("ha_ingestor_write_errors_total", kind="retryable") == 4
    assert w.metric("ha_ingestor_points_written_total", measurement="mqtt_message") == 1000
    assert w.metric("ha_ingestor_dead_lettered_lines_total") == 0
    # Retry-After: the batch refused with 503 came back no sooner than one second later
    # (the backoff alone waits at most 0.05 s here).
    refused = next(r for r in proxy.writes() if r.status == 503)
    retried = next(r for r in proxy.writes() if r.lines == refused.lines and r.forwarded)
    assert retried.started - refused.answered >= 1.0
    states = w.log.states()
    assert "reconnecting" in states
    assert states[-2:] == ["connected", "stopped"]


async def test_bad_lines_are_bisected_out_into_the_dead_letter_file_with_the_reason(
    proxy: Proxy, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    influxdb.create_database(influx_db)
    influxdb.write(influx_db, f"mqtt_message,topic=seed value=1.5,n=-1i {T0 - 1}")
    lines = [line(i) for i in range(100)]
    conflict = f'mqtt_message,topic=t/37 value="text",n=37i {T0 + 37}'  # value is a float field
    unparsable = "mqtt_message,topic=t/80 value= 1"
    lines[37], lines[80] = conflict, unparsable
    settings = make_settings(
        proxy.url, tmp_path, influx_api="v1", influx_database=influx_db, influx_batch_size="200"
    )
    async with running_writer(settings) as w:
        await w.add(lines)
        await w.drained()

    assert stored_numbers(influxdb, influx_db) == [
        -1,
        *(i for i in range(100) if i not in (37, 80)),
    ]
    dead = [json.loads(x) for x in w.writer.dead_letters.path.read_text().splitlines()]
    assert [d["line"] for d in dead] == [conflict, unparsable]
    assert "HTTP 400" in dead[0]["reason"]
    assert "field type conflict" in dead[0]["reason"]
    assert "unable to parse" in dead[1]["reason"]
    assert all(d["time"].endswith("Z") for d in dead)
    assert w.metric("ha_ingestor_dead_lettered_lines_total") == 2
    assert (
        w.metric(
            "ha_ingestor_events_dropped_total", reason="rejected_by_influxdb", intentional="false"
        )
        == 2
    )
    assert w.metric("ha_ingestor_points_written_total", measurement="mqtt_message") == 98
    rejected = [r for r in proxy.writes() if r.status == 400]
    assert w.metric("ha_ingestor_write_errors_total", kind="rejected") == len(rejected)
    # Bisection, not line-by-line: a few dozen requests for 100 lines with two bad ones.
    assert len(proxy.writes()) < 30
    assert len(w.log.named("line rejected by influxdb, dead-lettered")) == 1  # throttled


async def test_refused_credentials_keep_the_data_and_writing_resumes_once_they_work(
    influxdb_auth: AuthInfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    user, password = f"writer{next(_users)}", "s3cret-pw"
    influxdb_auth.statement(f'CREATE DATABASE "{influx_db}"')
    settings = make_settings(
        influxdb_auth.url,
        tmp_path,
        influx_api="v1",
        influx_database=influx_db,
        influx_username=user,
        influx_password=password,
    )
    lines = [line(i) for i in range(50)]
    async with running_writer(settings, auth_log_interval=60.0) as w:
        await w.add(lines)

        def refusals() -> float:
            return w.metric("ha_ingestor_write_errors_total", kind="auth")

        # 1. The user does not exist yet: 401.
        await wait_for(lambda: refusals() >= 5, 30, message="five refused writes")
        connection = w.telemetry.connection("influxdb")
        assert connection.state == ConnState.FAILED
        assert connection.last_error is not None
        assert "HTTP 401" in connection.last_error
        assert w.buffer.depth()[0] == 50

        # 2. The user exists but may not write to the database: 403.
        influxdb_auth.statement(f"CREATE USER {user} WITH PASSWORD '{password}'")
        await wait_for(
            lambda: "HTTP 403" in (w.telemetry.connection("influxdb").last_error or ""),
            30,
            message="403",
        )
        before = refusals()
        await wait_for(lambda: refusals() >= before + 3, 30, message="more refused writes")
        assert w.telemetry.connection("influxdb").state == ConnState.FAILED
        assert w.buffer.depth()[0] == 50

        # 3. Access granted: the same writer, without a restart, writes everything.
        influxdb_auth.statement(f'GRANT WRITE ON "{influx_db}" TO {user}')
        await w.drained()
        assert w.telemetry.connection("influxdb").state == ConnState.CONNECTED

    assert influxdb_auth.count(influx_db, "mqtt_message", "n") == 50
    assert w.metric("ha_ingestor_points_written_total", measurement="mqtt_message") == 50
    assert w.log.states() == ["connected", "failed", "connected", "stopped"]
    # Loud, but once per interval rather than once per retry.
    loud = w.log.named("influxdb refuses writes; data is kept and retried")
    assert len(loud) == 1
    assert "HTTP 401" in loud[0]["error"]
    assert refusals() >= 8
    # The database could not be created by this user: said once, as a warning.
    assert len(w.log.named("influxdb database not created")) == 1
    assert password not in repr(w.log.events)


async def test_413_splits_the_batch_and_a_line_too_large_alone_is_dead_lettered(
    proxy: Proxy, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    limit = 4000

    def too_large(seen: Seen) -> Fault | None:
        size = len("\n".join(seen.lines).encode())
        return (413, {}, '{"error":"Request Entity Too Large"}') if size > limit else None

    proxy.rule = too_large
    lines = [line(i) for i in range(200)]

    def size(chunk: list[str]) -> int:
        return len("\n".join(chunk).encode())

    # 100 lines are too large, 50 are not: 200 → 2 x 100 → 4 x 50.
    assert max(size(lines[i : i + 50]) for i in range(0, 200, 50)) < limit
    assert min(size(lines[i : i + 100]) for i in range(0, 200, 100)) > limit
    settings = make_settings(
        proxy.url, tmp_path, influx_api="v1", influx_database=influx_db, influx_batch_size="200"
    )
    async with running_writer(settings) as w:
        await w.add(lines)
        await w.drained()
        assert w.metric("ha_ingestor_write_errors_total", kind="too_large") == 3  # 200, 2 x 100
        assert sorted(len(r.lines) for r in proxy.writes() if r.forwarded) == [50, 50, 50, 50]
        assert sorted(proxy.stored_lines()) == sorted(lines)

        huge = f'mqtt_message,topic=huge payload="{"x" * 4000}" {T0 - 5}'
        more = [line(i) for i in range(200, 210)]
        await w.add([*more[:5], huge, *more[5:]])
        await w.drained()

    assert stored_numbers(influxdb, influx_db) == list(range(210))
    dead = [json.loads(x) for x in w.writer.dead_letters.path.read_text().splitlines()]
    assert [d["line"] for d in dead] == [huge]
    assert dead[0]["reason"].startswith("HTTP 413")
    assert w.metric("ha_ingestor_dead_lettered_lines_total") == 1
    assert w.metric("ha_ingestor_points_written_total", measurement="mqtt_message") == 210


async def test_a_database_dropped_while_running_is_created_again(
    influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    settings = make_settings(influxdb.url, tmp_path, influx_api="v1", influx_database=influx_db)
    async with running_writer(settings) as w:
        await w.add([line(i) for i in range(10)])
        await w.drained()
        influxdb.query(f'DROP DATABASE "{influx_db}"')
        await w.add([line(i) for i in range(10, 20)])
        await w.drained()

    assert stored_numbers(influxdb, influx_db) == list(range(10, 20))
    assert w.metric("ha_ingestor_write_errors_total", kind="not_found") == 1
    assert len(w.log.named("influxdb database created")) == 1
    assert w.log.states() == ["connected", "stopped"]


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_writes_in_flight_never_exceed_the_concurrency(
    proxy: Proxy, influxdb: InfluxDB1, influx_db: str, tmp_path: Path, concurrency: int
) -> None:
    proxy.delay = 0.15
    settings = make_settings(
        proxy.url,
        tmp_path,
        influx_api="v1",
        influx_database=influx_db,
        influx_batch_size="50",
        influx_concurrency=str(concurrency),
    )
    lines = [line(i) for i in range(500)]
    async with running_writer(settings, MemoryBuffer(group_lines=50)) as w:
        await w.add(lines)
        await w.drained()

    assert proxy.max_in_flight == concurrency
    assert sorted(proxy.stored_lines()) == sorted(lines)
    assert w.metric("ha_ingestor_batch_size_count") == 10
    assert w.metric("ha_ingestor_batch_size_sum") == 500


async def test_a_batch_reaches_influxdb_in_series_order_and_the_later_of_two_points_wins(
    proxy: Proxy, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    settings = make_settings(proxy.url, tmp_path, influx_api="v1", influx_database=influx_db)
    # As messages arrive: series interleaved, and one point sent twice with another value.
    lines = [f"mqtt_message,topic=t/{i % 3} value={i}.5,n={i}i {T0 + i}" for i in range(9)]
    lines.append(f"mqtt_message,topic=t/1 value=99.5,n=99i {T0 + 4}")
    async with running_writer(settings) as w:
        await w.add(lines)
        await w.drained()

    (write,) = proxy.writes()
    assert [int(sent.split("n=")[1].split("i")[0]) for sent in write.lines] == [
        *(0, 3, 6),
        *(1, 4, 7, 99),
        *(2, 5, 8),
    ]
    assert stored_numbers(influxdb, influx_db) == [0, 1, 2, 3, 5, 6, 7, 8, 99]


async def test_a_group_larger_than_the_batch_size_goes_out_in_requests_of_at_most_that_size(
    proxy: Proxy, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    settings = make_settings(
        proxy.url, tmp_path, influx_api="v1", influx_database=influx_db, influx_batch_size="30"
    )
    lines = [line(i) for i in range(250)]
    async with running_writer(settings, MemoryBuffer(group_lines=100)) as w:
        await w.add(lines)
        await w.drained()

    # Groups of 100, 100 and 50 lines, each sent in parts of at most 30.
    assert sorted(len(write.lines) for write in proxy.writes()) == [10, 10, 20, *[30] * 7]
    assert sorted(proxy.stored_lines()) == sorted(lines)
    assert stored_numbers(influxdb, influx_db) == list(range(250))


async def test_gzip_bodies_are_stored_by_influxdb(
    proxy: Proxy, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    settings = make_settings(
        proxy.url, tmp_path, influx_api="v1", influx_database=influx_db, influx_gzip="true"
    )
    lines = [line(i) for i in range(300)]
    async with running_writer(settings) as w:
        await w.add(lines)
        await w.drained()

    (write,) = proxy.writes()
    assert write.headers["Content-Encoding"] == "gzip"
    assert write.raw[:2] == b"\x1f\x8b"
    assert write.raw[8] == 4  # gzip header XFL: compressed with the fastest level
    assert len(write.raw) < len("\n".join(lines)) / 3
    assert stored_numbers(influxdb, influx_db) == list(range(300))


async def test_stop_finishes_the_write_in_flight(
    proxy: Proxy, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    proxy.delay = 0.5
    settings = make_settings(proxy.url, tmp_path, influx_api="v1", influx_database=influx_db)
    lines = [line(i) for i in range(20)]
    async with running_writer(settings) as w:
        await w.add(lines)
        await wait_for(lambda: proxy.in_flight == 1, 10, interval=0.01, message="write in flight")
        started = time.monotonic()
        await w.writer.stop(5.0)
        assert time.monotonic() - started < 2.0
        assert w.buffer.depth() == (0, 0)
    assert stored_numbers(influxdb, influx_db) == list(range(20))


async def test_stop_at_the_deadline_leaves_unwritten_batches_in_the_buffer(
    proxy: Proxy, influxdb: InfluxDB1, influx_db: str, tmp_path: Path
) -> None:
    proxy.rule = lambda seen: (500, {}, '{"error":"down"}')
    settings = make_settings(proxy.url, tmp_path, influx_api="v1", influx_database=influx_db)
    buffer = MemoryBuffer()
    lines = [line(i) for i in range(300)]
    async with running_writer(settings, buffer) as w:
        await w.add(lines)
        await wait_for(lambda: len(proxy.writes()) >= 3, 10, message="three failed writes")
        started = time.monotonic()
        await w.writer.stop(0.3)
        assert 0.3 <= time.monotonic() - started < 1.5
    assert buffer.depth()[0] == 300
    assert proxy.stored_lines() == []

    proxy.rule = lambda seen: None  # InfluxDB is back: a new writer takes the same buffer
    async with running_writer(settings, buffer) as w2:
        await w2.drained()
    assert sorted(proxy.stored_lines()) == sorted(lines)
    assert stored_numbers(influxdb, influx_db) == list(range(300))


def test_points_are_counted_per_measurement_by_their_prefix() -> None:
    lines = [
        line(1),
        line(2, "ha_state"),
        'ha_event,event_type=x data="a\nha_state,b=c" 1',  # a newline inside a string field
        "ha_state_extra,a=b v=1 1",
        "ha_event v=1 1",
        "other v=1 1",
        "mqtt_message v=1 1",
    ]
    assert count_measurements(lines) == {
        "mqtt_message": 2,
        "ha_state": 1,
        "ha_event": 2,
        "other": 2,
    }


async def test_the_dead_letter_file_rotates_at_its_cap(tmp_path: Path) -> None:
    from ha_ingestor.sinks.dead_letter import DeadLetterFile

    dead = DeadLetterFile(tmp_path / "dead-letter.jsonl", max_bytes=1000, backups=2)
    for i in range(12):
        await dead.add([f"m v={i} {'x' * 200}"], "HTTP 400: bad")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["dead-letter.jsonl", "dead-letter.jsonl.1", "dead-letter.jsonl.2"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    newest = [json.loads(x) for x in (tmp_path / "dead-letter.jsonl").read_text().splitlines()]
    assert newest[-1]["line"].startswith("m v=11 ")
    assert newest[-1]["reason"] == "HTTP 400: bad"
    kept = sum(len(p.read_text().splitlines()) for p in tmp_path.iterdir())
    assert kept == 9  # three records per file, the oldest file deleted
